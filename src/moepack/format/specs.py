"""What a layer file must hold: the geometry of a MoE layer and the tensor specs it implies.

Pure shape arithmetic, no torch: the writer, the validator (`verify`, `load`, `inspect`) and the
loader all derive a layer file's tensors from here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import ALIGNMENT, COL_TILE, PAD_TILE, ROW_TILE, SF_BLOCK

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
"""Bytes per element of every safetensors dtype name."""

TensorSpec = tuple[str, tuple[int, ...]]
"""(safetensors dtype, shape) of one tensor."""


def round_up(value: int, tile: int) -> int:
    return -(-value // tile) * tile


def aligned(offset: int) -> int:
    return round_up(offset, ALIGNMENT)


def padded_intermediate(n: int, tile: int = PAD_TILE) -> int:
    """Intermediate size the artifact stores: `n` rounded up to the kernel tile."""
    return round_up(n, tile)


def swizzled_shape(rows: int, k: int) -> tuple[int, int]:
    """`(Rp, Cp)` of one expert's swizzled scales for a `[rows, k]` weight."""
    return round_up(rows, ROW_TILE), round_up(-(-k // SF_BLOCK), COL_TILE)


@dataclass(frozen=True)
class Geometry:
    """Shape of one MoE layer's converted tensors. The manifest spells it in `model`
    (`ModelInfo.geometry` / `ModelInfo.with_geometry`, the only mapping)."""

    num_experts: int
    hidden: int  # H: K of FC1, N of FC2 (the latent size on latent-MoE models)
    intermediate: int  # n
    intermediate_padded: int  # n_p
    gated: bool

    @property
    def w13_rows(self) -> int:
        return self.intermediate_padded * (2 if self.gated else 1)

    def tensor_specs(self, b12x_mode: str) -> dict[str, TensorSpec]:
        """Every non-filler tensor of a layer file: name -> (safetensors dtype, shape), in file order."""
        e, h, n_p = self.num_experts, self.hidden, self.intermediate_padded
        sf13 = (e, *swizzled_shape(self.w13_rows, h))
        sf2 = (e, *swizzled_shape(h, n_p))
        specs: dict[str, TensorSpec] = {
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
