"""Artifact format v1: names, paths and tensor specs shared by the writer, `verify` and the loader.

`docs/FORMAT.md` is the normative description; this module is its executable form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moepack.errors import ManifestError

from .layout import round_up, swizzled_shape

FORMAT_NAME = "moepack"
FORMAT_VERSION = 1
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
FLASHINFER_RANGE = ">=0.7.2,<0.8"
PREFILL_MIN_TOKENS = 64


def layer_file(layer: int) -> str:
    """Relative path of the file holding MoE layer `layer`."""
    return f"{MOE_DIR}/layer-{layer:05d}.safetensors"


@dataclass(frozen=True)
class Geometry:
    """Shape of one MoE layer's converted tensors."""

    num_experts: int
    hidden: int  # H: K of FC1, N of FC2 (the latent size on latent-MoE models)
    intermediate: int  # n
    intermediate_padded: int  # n_p
    gated: bool

    @property
    def w13_rows(self) -> int:
        return self.intermediate_padded * (2 if self.gated else 1)

    def tensor_specs(self, b12x_mode: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every non-filler tensor of a layer file: name -> (safetensors dtype, shape), in file order."""
        e, h, n_p = self.num_experts, self.hidden, self.intermediate_padded
        sf13 = (e, *swizzled_shape(self.w13_rows, h))
        sf2 = (e, *swizzled_shape(h, n_p))
        specs: dict[str, tuple[str, tuple[int, ...]]] = {
            "w13": ("U8", (e, self.w13_rows, h // 2)),
            "w2": ("U8", (e, h, n_p // 2)),
            "w13_sf": ("F8_E4M3", sf13),
            "w2_sf": ("F8_E4M3", sf2),
        }
        if b12x_mode == "baked":
            specs["b12x.w13_sf"] = ("F8_E4M3", sf13)
            specs["b12x.w2_sf"] = ("F8_E4M3", sf2)
        specs.update(
            {
                "cutlass.fc1_act_global": ("F32", ()),
                "cutlass.fc1_alpha": ("F32", (e,)),
                "cutlass.fc2_act_global": ("F32", ()),
                "cutlass.fc2_alpha": ("F32", (e,)),
                "b12x.w1_alpha": ("F32", (e,)),
                "b12x.w2_alpha": ("F32", (e,)),
                "b12x.fc2_input_scale": ("F32", ()),
            }
        )
        if b12x_mode == "shared":
            specs["b12x.input_global_scale"] = ("F32", ())
        return specs

    @classmethod
    def from_manifest(cls, model: dict[str, Any]) -> Geometry:
        return cls(
            num_experts=int(model["num_experts"]),
            hidden=int(model["moe_hidden_size"]),
            intermediate=int(model["intermediate_size"]),
            intermediate_padded=int(model["intermediate_size_padded"]),
            gated=bool(model["gated"]),
        )


TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "I64": torch.int64,
    "F64": torch.float64,
}
"""safetensors dtype names and their torch dtypes (those torch has on every platform)."""

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def aligned(offset: int) -> int:
    return round_up(offset, ALIGNMENT)


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse `root/manifest.json` and check the format name, version and completeness marker."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest (not a moepack artifact, or unfinished)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not a moepack manifest (format != {FORMAT_NAME!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {version!r} is not supported (this moepack reads {FORMAT_VERSION})"
        )
    if data.get("complete") is not True:
        raise ManifestError(f"{path}: completeness marker missing: the conversion did not finish")
    return data
