"""moepack artifact format v1, torch-free: names and constants, tensor specs, the typed
`Manifest`, the one validator and the safetensors header reader.

`runtime` (load) and `convert` (write) build on this package; it imports neither. Importing it
costs milliseconds, which is why `moepack inspect` and `moepack verify` start fast.
"""

from .constants import (
    ACTIVATIONS,
    ALIGNMENT,
    B12X_MODES,
    FILE_KINDS,
    FLASHINFER_RANGE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_DIR,
    MOE_DIR,
    PAD_PREFIX,
    PAD_TILE,
    PREFILL_MIN_TOKENS,
    SF_BLOCK,
    SF_LAYOUT,
    TARGETS,
    layer_file,
)
from .header import Header, TensorEntry, read_header
from .manifest import (
    Fidelity,
    FileRecord,
    KernelAbi,
    LayerRecord,
    Manifest,
    ModelInfo,
    SourceFile,
    SourceInfo,
    TensorRecord,
    ToolInfo,
)
from .specs import DTYPE_SIZES, Geometry, TensorSpec, aligned, padded_intermediate, swizzled_shape
from .validate import Problem, ValidArtifact, read_manifest, validate_artifact

__all__ = [
    "ACTIVATIONS",
    "ALIGNMENT",
    "B12X_MODES",
    "DTYPE_SIZES",
    "FILE_KINDS",
    "FLASHINFER_RANGE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODEL_DIR",
    "MOE_DIR",
    "PAD_PREFIX",
    "PAD_TILE",
    "PREFILL_MIN_TOKENS",
    "SF_BLOCK",
    "SF_LAYOUT",
    "TARGETS",
    "Fidelity",
    "FileRecord",
    "Geometry",
    "Header",
    "KernelAbi",
    "LayerRecord",
    "Manifest",
    "ModelInfo",
    "Problem",
    "SourceFile",
    "SourceInfo",
    "TensorEntry",
    "TensorRecord",
    "TensorSpec",
    "ToolInfo",
    "ValidArtifact",
    "aligned",
    "layer_file",
    "padded_intermediate",
    "read_header",
    "read_manifest",
    "swizzled_shape",
    "validate_artifact",
]
