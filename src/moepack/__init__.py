"""moepack: offline NVFP4 MoE conversion (`moepack.convert`) and zero-copy loading (`moepack.runtime`)."""

__version__ = "0.1.0"
