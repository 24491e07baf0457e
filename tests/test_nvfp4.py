"""E2M1/E4M3 codecs and ModelOpt-style quantization."""

from __future__ import annotations

import torch

from moepack.runtime import nvfp4


def test_decode_table_and_sign():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = nvfp4.decode_e2m1(codes)
    assert vals[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert vals[8:].tolist() == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_encode_is_nearest_with_ties_to_even():
    assert nvfp4.encode_e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist() == [
        0,
        2,
        2,
        4,
        4,
        6,
        6,
    ]
    # ModelOpt keeps the sign of a value that rounds to zero: -0.1 -> code 8 (negative zero).
    got = nvfp4.encode_e2m1(torch.tensor([0.26, 0.74, 7.0, -6.5, -0.1]))
    assert got.tolist() == [1, 1, 7, 15, 8]
    x = torch.linspace(-7, 7, 1001)
    got = nvfp4.decode_e2m1(nvfp4.encode_e2m1(x))
    table = torch.cat([nvfp4.E2M1_VALUES, -nvfp4.E2M1_VALUES])
    best = (x.clamp(-6, 6).unsqueeze(1) - table).abs().amin(1)
    assert torch.equal((x.clamp(-6, 6) - got).abs(), best)


def test_pack_low_nibble_is_even_column():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    packed = nvfp4.pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x43]]
    assert torch.equal(nvfp4.unpack_fp4(packed), codes)


def test_quantize_matches_modelopt_recipe():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    packed, sf, ws2 = nvfp4.quantize(w)
    assert packed.shape == (32, 32) and packed.dtype == torch.uint8
    assert sf.shape == (32, 4) and sf.dtype == torch.float8_e4m3fn
    assert torch.allclose(ws2, w.abs().amax() / (6 * 448))
    block_amax = w.reshape(32, 4, 16).abs().amax(-1)
    assert torch.equal(sf, ((block_amax / 6) / ws2).to(torch.float8_e4m3fn))
    zero = torch.zeros(2, 32)
    zero[0, :16] = 1.0
    _, zsf, _ = nvfp4.quantize(zero)
    assert zsf.to(torch.float32)[0, 1] == 1.0 and zsf.to(torch.float32)[1].eq(1.0).all()
    deq = nvfp4.dequantize(packed, sf, ws2)
    assert (deq - w).abs().max() < 0.35 * w.abs().max()
    assert torch.isfinite(deq).all()
    rel = (deq - w).norm() / w.norm()
    assert rel < 0.15
