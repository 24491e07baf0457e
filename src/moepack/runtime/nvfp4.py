"""NVFP4 in plain PyTorch: E2M1 codes, packing, FP8 E4M3 block scales and dequantization.

An NVFP4 tensor in ModelOpt format is three parts: packed E2M1 codes (two a byte, the low
nibble holds the even column), one FP8 E4M3 scale per 16 consecutive elements of a row, and one
FP32 per-tensor scale (`weight_scale_2`). Everything here is exact integer or table arithmetic so
that layout round trips can be checked bit for bit.
"""

from __future__ import annotations

import torch

from moepack.format.constants import SF_BLOCK

BLOCK = SF_BLOCK
"""Elements sharing one E4M3 block scale."""

E2M1_MAX = 6.0
E4M3_MAX = 448.0

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)
"""Magnitude of codes 0..7; bit 3 of a code is the sign."""

_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
"""Midpoints between neighbouring magnitudes; a tie rounds to the even code (0, 2, 4, 6)."""

_ODD_TIE_BOUNDS = _E2M1_BOUNDS[[1, 3, 5]]


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Values of 4-bit codes (uint8, one code per element) as float32."""
    codes = codes.to(torch.int64)
    mag = E2M1_VALUES.to(codes.device)[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each value, as uint8, the way ModelOpt casts: ties go to the even
    code (0, 2, 4, 6), magnitudes saturate at 6, and the sign bit follows the input's sign even
    when the magnitude rounds to 0 (a small negative value becomes code 8, negative zero)."""
    values = values.to(torch.float32)
    mag = values.abs().clamp(max=E2M1_MAX)
    bounds = _E2M1_BOUNDS.to(values.device)
    code = torch.searchsorted(bounds, mag.contiguous(), right=False)
    code = code + (mag.unsqueeze(-1) == _ODD_TIE_BOUNDS.to(values.device)).any(-1).to(code.dtype)
    return (code + (values < 0).to(code.dtype) * 8).to(torch.uint8)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes `[..., K]` into bytes `[..., K/2]`, even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of columns ({codes.shape[-1]})")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes `[..., K/2]` into codes `[..., K]` (inverse of `pack_fp4`)."""
    packed = packed.view(torch.uint8)
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e4m3_from_float(values: torch.Tensor) -> torch.Tensor:
    """Round float scales to FP8 E4M3 (round to nearest even, saturating at 448)."""
    return values.to(torch.float32).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def block_values(packed: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    """`e2m1(code) * float(block_scale)` for `[..., N, K/2]` codes and `[..., N, >=K/16]` scales.

    The product is exact in float32 (at most 2 + 4 significant bits), so it is the part of a
    dequantized weight that layouts must preserve bit for bit.
    """
    values = decode_e2m1(unpack_fp4(packed))
    k_blocks = values.shape[-1] // BLOCK
    scales = block_scale[..., :k_blocks].to(torch.float32)
    return values * scales.repeat_interleave(BLOCK, dim=-1)


def dequantize(
    packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor | float
) -> torch.Tensor:
    """ModelOpt NVFP4 dequant: `w[n, k] = e2m1(code) * float(block_scale[n, k // 16]) * scale_2`."""
    return block_values(packed, block_scale) * torch.as_tensor(scale_2, dtype=torch.float32)


def quantize(
    weight: torch.Tensor, scale_2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `[..., N, K]` to NVFP4 as ModelOpt does; returns (packed, block_scale, scale_2).

    `scale_2 = amax / (6 * 448)` over the whole tensor unless given; block scales are
    `e4m3((block_amax / 6) / scale_2)`, and 1.0 for an all-zero block; each element takes the
    nearest code of `w / (float(block_scale) * scale_2)`.
    """
    w = weight.to(torch.float32)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"K={w.shape[-1]} is not a multiple of {BLOCK}")
    if scale_2 is None:
        scale_2 = w.abs().amax() / (E2M1_MAX * E4M3_MAX)
    scale_2 = torch.as_tensor(scale_2, dtype=torch.float32).reshape(())
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    per_block = blocks.abs().amax(-1) / E2M1_MAX
    raw = torch.where(per_block == 0, torch.ones_like(per_block), per_block / scale_2)
    block_scale = e4m3_from_float(raw)
    scaled = blocks / (block_scale.to(torch.float32).unsqueeze(-1) * scale_2)
    codes = encode_e2m1(scaled).reshape(w.shape)
    return pack_fp4(codes), block_scale, scale_2
