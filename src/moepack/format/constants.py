"""Names and numbers of artifact format v1 (`docs/FORMAT.md` is the normative text)."""

from __future__ import annotations

FORMAT_NAME = "moepack"
FORMAT_VERSION = 2
"""The version this moepack writes. 2 is 1 plus an optional `sha256_chain` per file (the
SHA-256 state every 64 MiB, so one large file verifies on all cores); 1 is still read."""
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ALIGNMENT = 4096
"""Every tensor's data starts at a file offset that is a multiple of this."""
PAD_PREFIX = "__pad__."
"""Filler tensors (U8, zeros) that keep the next tensor aligned; safetensors allows no gaps."""
MOE_DIR = "moe"
MODEL_DIR = "model"
TARGETS = ("sm120", "sm121")
B12X_MODES = ("baked", "shared")
ACTIVATIONS = ("relu2", "silu")
FILE_KINDS = ("moe_layer", "model_shard", "model_file")
FLASHINFER_RANGE = ">=0.7.2,<0.8"
PREFILL_MIN_TOKENS = 64
SF_BLOCK = 16
"""NVFP4 block size: one E4M3 scale per 16 consecutive FP4 values of a row."""
SF_LAYOUT = "cutlass_128x4"
ROW_TILE = 128
COL_TILE = 4
PAD_TILE = 256
"""Default intermediate-size tile (`kernel_abi.pad_tile`; `--pad-tile` offers 128 too): FlashInfer
0.7.2.x's b12x static path copies every weight of a layer unless `n % 256 == 0`, which is what
the engines pin today. The rule of each release is in `moepack.format.flashinfer`."""
LEFTOVER_MARKERS = (".moepack-tmp", ".moepack-partial")
"""Names a conversion uses while it runs; their presence means it was interrupted."""


def layer_file(layer: int) -> str:
    """Relative path of the file holding MoE layer `layer`."""
    return f"{MOE_DIR}/layer-{layer:05d}.safetensors"
