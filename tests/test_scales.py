"""Alpha algebra: dequantizing through the stored layouts reproduces the ModelOpt source."""

from __future__ import annotations

import torch

from moepack.runtime import layout, nvfp4, scales


def _experts(e: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    packed, sfs, ws2s = [], [], []
    for _ in range(e):
        w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 2)
        p, sf, ws2 = nvfp4.quantize(w)
        packed.append(p)
        sfs.append(sf)
        ws2s.append(ws2)
    s = torch.rand(e, generator=g) * 0.01 + 1e-3
    return torch.stack(packed), torch.stack(sfs), torch.stack(ws2s), s


def _through_layout(packed, sf_swizzled, n, k):
    sf = layout.unswizzle(sf_swizzled, n, k // 16)
    return nvfp4.block_values(packed, sf)


def test_cutlass_and_shared_b12x_are_bit_exact():
    e, n, k = 4, 80, 64
    n_p = layout.padded_intermediate(n)
    p13, sf13, ws13, s13 = _experts(e, n, k, 0)
    p2, sf2, ws2, s2 = _experts(e, k, n, 1)
    stored_w13 = layout.pad_dim(p13, 1, n_p)
    stored_sf13 = layout.swizzle(layout.pad_dim(sf13, 1, n_p))
    stored_w2 = layout.pad_dim(p2, 2, n_p // 2)
    stored_sf2 = layout.swizzle(layout.pad_dim(sf2, 2, n_p // 16))
    cut = scales.cutlass_scalars(s13, ws13, s2, ws2)
    shared = scales.b12x_shared_scalars(s13, ws13, s2, ws2)
    a13 = s13.max()
    assert torch.equal(cut.fc1_act_global, 1 / a13)
    assert torch.equal(shared.input_global_scale, a13)
    # What the kernels multiply accumulators by must be the same fp32 numbers.
    assert torch.equal(shared.w1_alpha * shared.input_global_scale, cut.fc1_alpha)
    assert torch.equal(shared.w2_alpha, cut.fc2_alpha)
    src13 = nvfp4.block_values(p13, sf13)
    src2 = nvfp4.block_values(p2, sf2)
    got13 = _through_layout(stored_w13, stored_sf13, n_p, k)
    got2 = _through_layout(stored_w2, stored_sf2, k, n_p)
    assert torch.equal(got13[:, :n], src13) and not got13[:, n:].any()
    assert torch.equal(got2[:, :, :n], src2) and not got2[:, :, n:].any()
    alpha = (a13 * ws13).reshape(e, 1, 1)
    assert torch.equal(got13[:, :n] * cut.fc1_alpha.reshape(e, 1, 1), src13 * alpha)
    # Shared mode: w1_alpha is weight_scale_2 itself, so weights dequantize bit for bit.
    src_deq = torch.stack([nvfp4.dequantize(p13[i], sf13[i], ws13[i]) for i in range(e)])
    assert torch.equal(got13[:, :n] * shared.w1_alpha.reshape(e, 1, 1), src_deq)


def test_baked_mode_error_is_reported_not_hidden():
    e, n, k = 3, 128, 64
    p, sf, ws2, s = _experts(e, n, k, 2)
    baked = scales.bake_block_scales(sf, ws2)
    bs = scales.b12x_baked_scalars(s, s, e)
    assert bs.input_global_scale is None and torch.equal(bs.w1_alpha, s.max().expand(e))
    exact = torch.stack([nvfp4.dequantize(p[i], sf[i], ws2[i]) for i in range(e)])
    approx = nvfp4.block_values(p, baked)
    rel = (approx - exact).norm(dim=(1, 2)) / exact.norm(dim=(1, 2))
    # ws2 ~ 1e-3..1e-2 pushes many scales into e4m3 subnormals: the error is real and large.
    assert rel.max() > 1e-3
    assert torch.isfinite(rel).all()


def test_unify_scale_2_takes_the_max():
    ws2, fa, fb = scales.unify_scale_2(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))
    assert ws2.tolist() == [2.0, 2.0] and fa.tolist() == [0.5, 1.0] and fb.tolist() == [1.0, 1.0]
