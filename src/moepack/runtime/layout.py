"""Scale-factor layouts and intermediate padding, each transform with its inverse.

CUTLASS 128x4 swizzle (per expert, `[Rp, Cp]` with `Rp = pad128(rows)`, `Cp = pad4(K/16)`):
the byte of scale `(r, c)` sits at

    (r // 128) * 128 * Cp + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)

which is `reshape [Rp/128, 4, 32, Cp/4, 4]` then `permute (0, 3, 2, 1, 4)`. The b12x kernels
read the same bytes through a 6-D strided view (`mma_view`), so one copy of the scales serves
both kernels. Padding rows and columns are zero.
"""

from __future__ import annotations

import torch

# The shape arithmetic is the format's (torch-free, shared with the validator); re-exported here
# beside the transforms that use it.
from moepack.format.constants import COL_TILE, PAD_TILE, ROW_TILE
from moepack.format.specs import padded_intermediate, round_up, swizzled_shape

__all__ = [
    "COL_TILE",
    "PAD_TILE",
    "ROW_TILE",
    "mma_unview",
    "mma_view",
    "pad_dim",
    "pad_halves",
    "padded_intermediate",
    "round_up",
    "swizzle",
    "swizzle_offset",
    "swizzled_shape",
    "unpad_dim",
    "unpad_halves",
    "unswizzle",
]


def swizzle_offset(r: int, c: int, padded_cols: int) -> int:
    """Byte offset of scale `(r, c)` inside one expert's swizzled block (explicit index formula)."""
    return (
        (r // 128) * 128 * padded_cols
        + (c // 4) * 512
        + (r % 32) * 16
        + ((r % 128) // 32) * 4
        + (c % 4)
    )


def _as_bytes(sf: torch.Tensor) -> torch.Tensor:
    return sf.view(torch.uint8) if sf.dtype != torch.uint8 else sf


def swizzle(sf: torch.Tensor) -> torch.Tensor:
    """Row-major scales `[E, R, C]` -> swizzled `[E, Rp, Cp]` (contiguous, zero padded, same dtype).

    Row `i` of the result is not row `i` of the matrix: within one expert the `Rp * Cp` bytes are
    in swizzled order (see the module docstring).
    """
    if sf.dim() != 3:
        raise ValueError(f"expected [E, rows, cols] scales, got shape {tuple(sf.shape)}")
    e, rows, cols = sf.shape
    rp, cp = round_up(rows, ROW_TILE), round_up(cols, COL_TILE)
    padded = _as_bytes(sf)
    if (rp, cp) != (rows, cols) or not padded.is_contiguous():
        padded = torch.zeros((e, rp, cp), dtype=torch.uint8, device=sf.device)
        padded[:, :rows, :cols] = _as_bytes(sf)
    # The innermost 4 bytes move together: permute them as one int32 (4x fewer elements).
    words = padded.view(torch.int32).view(e, rp // 128, 4, 32, cp // 4)
    tiles = words.permute(0, 1, 4, 3, 2).reshape(e, rp, cp // 4)
    return tiles.view(torch.uint8).view(sf.dtype)


def unswizzle(sw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `swizzle`: swizzled `[E, Rp, Cp]` -> row-major `[E, rows, cols]`."""
    e, rp, cp = sw.shape
    if rp % ROW_TILE or cp % COL_TILE or rows > rp or cols > cp:
        raise ValueError(f"swizzled shape {tuple(sw.shape)} does not hold [{rows}, {cols}]")
    tiles = _as_bytes(sw).reshape(e, rp // 128, cp // 4, 32, 4, 4).permute(0, 1, 4, 3, 2, 5)
    return tiles.reshape(e, rp, cp)[:, :rows, :cols].contiguous().view(sw.dtype)


def mma_view(sw: torch.Tensor) -> torch.Tensor:
    """The b12x 6-D view `(32, 4, Rp/128, 4, Cp/4, E)` of swizzled scales `[E, Rp, Cp]`.

    Same storage, no copy; equals `flashinfer.cute_dsl.utils.convert_sf_to_mma_layout(
    sw.view(E * Rp, Cp), m=rows, k=K, num_groups=E)` in shape, strides and data pointer.
    """
    e, rp, cp = sw.shape
    return sw.view(e, rp // 128, cp // 4, 32, 4, 4).permute(3, 4, 1, 5, 2, 0)


def mma_unview(view6d: torch.Tensor) -> torch.Tensor:
    """Inverse of `mma_view`: the contiguous `[E, Rp, Cp]` tensor behind a 6-D MMA view."""
    _, _, m_tiles, _, k_tiles, e = view6d.shape
    storage = view6d.permute(5, 2, 4, 0, 1, 3)
    return storage.contiguous().view(e, m_tiles * 128, k_tiles * 4)


def pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `dim` of `t` up to `size`."""
    extra = size - t.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad dim {dim} of size {t.shape[dim]} down to {size}")
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def unpad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Inverse of `pad_dim`: the first `size` entries of `dim`."""
    return t.narrow(dim, 0, size)


def pad_halves(t: torch.Tensor, n: int, n_p: int, halves: int, dim: int = 1) -> torch.Tensor:
    """Pad each of `halves` consecutive `n`-row blocks of `dim` to `n_p` rows (gated `[up; gate]`)."""
    parts = t.split(n, dim=dim)
    if len(parts) != halves:
        raise ValueError(f"expected {halves} x {n} rows on dim {dim}, got {t.shape[dim]}")
    return torch.cat([pad_dim(p, dim, n_p) for p in parts], dim=dim)


def unpad_halves(t: torch.Tensor, n: int, n_p: int, halves: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pad_halves`."""
    return torch.cat([p.narrow(dim, 0, n) for p in t.split(n_p, dim=dim)], dim=dim)
