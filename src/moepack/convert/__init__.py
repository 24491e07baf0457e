"""moepack convert: read ModelOpt NVFP4 checkpoints (local or hub) and write moepack artifacts."""
