"""moepack runtime: the artifact format, verification and zero-copy loading (torch + safetensors only)."""
