"""moepack runtime: the artifact format, verification and zero-copy loading (torch + safetensors only)."""

from .loader import Artifact, load

__all__ = ["Artifact", "load"]
