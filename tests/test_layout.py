"""The 128x4 scale swizzle, the b12x MMA view and padding, against FlashInfer's own CPU code."""

from __future__ import annotations

import pytest
import torch
from flashinfer.cute_dsl.utils import convert_sf_from_mma_layout, convert_sf_to_mma_layout
from flashinfer.diffusion_ops.minimax_h3_fc1_swiglu import _swizzle_sf_128x4
from flashinfer.fused_moe.cute_dsl.blackwell_sm12x.moe_w4a16_fp4_helpers import (
    as_grouped_scale_view,
    swizzle_block_scale,
)
from flashinfer.fused_moe.cute_dsl.blackwell_sm12x.moe_w4a16_host import unswizzle_block_scale

from moepack.runtime import layout

SHAPES = [(1, 1, 1), (2, 128, 4), (3, 130, 5), (2, 257, 64), (1, 96, 7), (4, 33, 12), (2, 384, 66)]


def _scales(e: int, r: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(1, 127, (e, r, c), generator=g, dtype=torch.uint8)  # finite positive e4m3
    return raw.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", SHAPES)
def test_swizzle_round_trip_and_padding(shape):
    sf = _scales(*shape)
    sw = layout.swizzle(sf)
    rp, cp = layout.round_up(shape[1], 128), layout.round_up(shape[2], 4)
    assert sw.shape == (shape[0], rp, cp) and sw.dtype == sf.dtype and sw.is_contiguous()
    assert torch.equal(
        layout.unswizzle(sw, shape[1], shape[2]).view(torch.uint8), sf.view(torch.uint8)
    )
    nonzero = int((sw.view(torch.uint8) != 0).sum())
    assert nonzero == sf.numel()  # padding is zero, every scale kept


@pytest.mark.parametrize("shape", SHAPES)
def test_swizzle_equals_index_formula(shape):
    e, r, c = shape
    sf = _scales(*shape, seed=1).view(torch.uint8)
    sw = layout.swizzle(sf)
    cp = sw.shape[2]
    flat = sw.reshape(e, -1)
    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij")
    offsets = torch.tensor(
        [
            layout.swizzle_offset(int(i), int(j), cp)
            for i, j in zip(rows.flatten(), cols.flatten(), strict=True)
        ]
    )
    for x in range(e):
        assert torch.equal(flat[x, offsets], sf[x].flatten())


@pytest.mark.parametrize("shape", SHAPES)
def test_swizzle_equals_flashinfer(shape):
    sf = _scales(*shape, seed=2)
    ours = layout.swizzle(sf)
    assert torch.equal(ours.view(torch.uint8), swizzle_block_scale(sf.view(torch.uint8)))
    for x in range(shape[0]):
        ref = _swizzle_sf_128x4(sf[x].view(torch.uint8))
        assert torch.equal(ours[x].reshape(-1).view(torch.uint8), ref)
        back = unswizzle_block_scale(ours[x], rows=shape[1], cols_blocks=shape[2])
        assert torch.equal(back, sf[x].to(torch.float32))


@pytest.mark.parametrize("e,rows,k", [(1, 128, 64), (3, 256, 1024), (2, 200, 80), (4, 130, 16)])
def test_mma_view_is_flashinfer_view(e, rows, k):
    sf = layout.swizzle(_scales(e, rows, k // 16, seed=3))
    ours = layout.mma_view(sf)
    ref = convert_sf_to_mma_layout(sf.view(e * sf.shape[1], sf.shape[2]), m=rows, k=k, num_groups=e)
    assert ours.shape == ref.shape
    assert ours.stride() == ref.stride()
    assert ours.data_ptr() == ref.data_ptr() == sf.data_ptr()
    assert ours.dtype == ref.dtype
    grouped = as_grouped_scale_view(sf, rows, k)
    assert grouped.stride() == ours.stride() and grouped.data_ptr() == sf.data_ptr()
    back = convert_sf_from_mma_layout(ours, m=rows, k=k, num_groups=e)
    assert torch.equal(back.view(torch.uint8), sf.reshape(-1, sf.shape[2]).view(torch.uint8))
    unview = layout.mma_unview(ours)
    assert unview.data_ptr() == sf.data_ptr() and torch.equal(
        unview.view(torch.uint8), sf.view(torch.uint8)
    )


def test_padded_intermediate_tile_rule():
    assert layout.padded_intermediate(2688) == 2816  # Nemotron 3 Super
    assert layout.padded_intermediate(1856) == 2048  # Nemotron 3 Nano
    assert layout.padded_intermediate(768) == 768
    assert layout.padded_intermediate(80) == 256


def test_pad_halves_round_trip():
    t = torch.arange(2 * 3 * 5).reshape(1, 6, 5)
    p = layout.pad_halves(t, 3, 4, 2)
    assert p.shape == (1, 8, 5)
    assert torch.equal(p[0, 3], torch.zeros(5, dtype=t.dtype)) and torch.equal(p[0, 4], t[0, 3])
    assert torch.equal(layout.unpad_halves(p, 3, 4, 2), t)
    with pytest.raises(ValueError):
        layout.pad_dim(t, 1, 2)
    padded = layout.pad_dim(t, 2, 8)
    assert not padded[..., 5:].any() and torch.equal(layout.unpad_dim(padded, 2, 5), t)
