"""Reference backend: the NVFP4 W4A4 MoE in plain PyTorch, from the artifact's stored tensors.

It is the correctness oracle and the portable fallback (CPU, SM90). It reads the same tensors the
kernels get, undoing only the layout (inverse swizzle, unpadding to `n`), never the source
checkpoint, so a wrong byte in the artifact shows up in its output.

Numerics, per GEMM (`y = act_quant(x) @ w.T * alpha[e]`):

1. **Activation quantization**, per 16 consecutive elements of a row, with the layer's activation
   scale in the form the kernel takes it:
   - CUTLASS (`multiplier`, `g = 1/a`): `sf = e4m3(amax * (g * (1/6)))`,
     `inv = 1 / (float(sf) * (1/g))` (quantization_utils.cuh, the precise-math branch);
   - b12x (`divisor`, `a` = ModelOpt input_scale): `sf = e4m3(min(amax / (6 * a), 448))`,
     `inv = 1 / (float(sf) * a)` (cute_dsl/fp4_common.py `quantize_block_fp4`);
   codes = nearest E2M1 of `x * inv` (ties to even, saturating at 6; `cvt.rn.satfinite.e2m1`),
   `inv = 0` where `sf == 0`. The GEMM operand is the *unit value* `e2m1(code) * float(sf)`.
2. **GEMM** on unit values of activations and weights (`e2m1 * float(block_scale)`). Each product
   of unit values has at most 12 significant bits, so float64 sums them exactly; the result is
   rounded once to float32. The oracle therefore does not depend on summation order; the kernels
   accumulate in float32 in their own order and agree to float32 accumulation error.
3. **Epilogue**: float32 `acc * alpha[e]`.
4. **Activation**: relu2 `relu(h)^2` in float32; gated SwiGLU `silu(gate) * up` with
   `w13 = [up; gate]`, evaluated in float64 and rounded once (so the value does not depend on
   which vectorized path torch takes).
5. FC2 the same way, with the FC2 activation scale and alpha; then the weighted sum over top-k
   slots in slot order in float32, slots with id -1 skipped, and one rounding to bf16.

The CUTLASS path rounds to bf16 where the CUTLASS MoE stores bf16 (the FC1 GEMM output, the
activation output before requantization, the FC2 GEMM output; cutlass_fused_moe_kernels.cuh
`quantizePackedFPXValue`, `doActivationKernel`).

The b12x path rounds where FlashInfer's static b12x kernel does (moe_static_kernel.py, 0.7.2.x
and 0.7.4): FC1 `alpha * acc` and the activation stay float32 and the activation is stored to
shared memory as bf16 before FC2's FP4 quantization reads it; FC2 runs per retained group of
256 intermediate columns (`_STATIC_RETAINED_GROUP_N`), each group's accumulator is rounded to
bf16, multiplied in bf16 by `bf16(route_weight * alpha2)` (`store_weighted_bf16x8_route`) and
stored as one bf16 contribution per route and group; the finalize sums the contributions in
float32 and rounds once to bf16. The micro kernels (the smallest batches) accumulate with bf16
atomics instead, in an order this oracle cannot reproduce; their results differ from it by bf16
rounding of the partial sums. Read from the source, not run on SM12x hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepack.format import Geometry

from . import nvfp4
from .layout import unpad_halves, unswizzle

CUTLASS_PATH = "cutlass"
B12X_PATH = "b12x"
B12X_GROUP = 256
"""Intermediate columns a b12x static-kernel FC2 contribution covers (`_STATIC_RETAINED_GROUP_N`:
two adjacent 128-column slices)."""


@dataclass(frozen=True)
class Gemm:
    """One grouped GEMM as a kernel sees it, unpadded: `[E, N, K/2]` codes, `[E, N, K/16]` scales."""

    weight: torch.Tensor  # uint8 [E, N, K/2]
    scale: torch.Tensor  # float8_e4m3fn [E, N, K/16], row-major
    alpha: torch.Tensor  # float32 [E], output multiplier
    act_scale: torch.Tensor  # float32 [E], activation global scale (per expert, often all equal)
    act_scale_is_divisor: bool  # True: b12x form (a); False: CUTLASS multiplier form (1/a)


@dataclass(frozen=True)
class MoEPath:
    """Both GEMMs of one kernel path plus how it rounds between them."""

    fc1: Gemm
    fc2: Gemm
    gated: bool
    rounding: str  # CUTLASS_PATH or B12X_PATH: where the kernel rounds to bf16 (module doc)


def quantize_activation(
    x: torch.Tensor, scale: torch.Tensor | float, is_divisor: bool
) -> torch.Tensor:
    """Unit values `e2m1(code) * float(sf)` of `x` `[T, K]` quantized to NVFP4 (see module doc)."""
    x = x.to(torch.float32)
    blocks = x.reshape(x.shape[0], -1, nvfp4.BLOCK)
    amax = blocks.abs().amax(-1)
    s = torch.as_tensor(scale, dtype=torch.float32)
    if is_divisor:
        raw = torch.clamp(amax / (nvfp4.E2M1_MAX * s), max=nvfp4.E4M3_MAX)
        sf = nvfp4.e4m3_from_float(raw).to(torch.float32)
        inv = 1.0 / (sf * s)
    else:
        sixth = torch.tensor(1.0 / nvfp4.E2M1_MAX, dtype=torch.float32)
        sf = nvfp4.e4m3_from_float(amax * (s * sixth)).to(torch.float32)
        inv = 1.0 / (sf * (1.0 / s))
    inv = torch.where(sf > 0, inv, torch.zeros_like(inv))
    codes = nvfp4.encode_e2m1(blocks * inv.unsqueeze(-1))
    return (nvfp4.decode_e2m1(codes) * sf.unsqueeze(-1)).reshape(x.shape)


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` of unit values, summed exactly in float64 and rounded once to float32."""
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.float32)


def activation(h: torch.Tensor, gated: bool) -> torch.Tensor:
    """relu2, or SwiGLU `silu(gate) * up` on `h = [up | gate]` (float64, rounded once)."""
    if not gated:
        return torch.relu(h).square()
    up, gate = h.to(torch.float64).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(torch.float32)


def _bf16(t: torch.Tensor, enabled: bool) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32) if enabled else t


def _gemm(x: torch.Tensor, g: Gemm, e: int, round_bf16: bool) -> torch.Tensor:
    xq = quantize_activation(x, g.act_scale[e], g.act_scale_is_divisor)
    w = nvfp4.block_values(g.weight[e], g.scale[e])
    return _bf16(exact_matmul(xq, w) * g.alpha[e], round_bf16)


def expert_forward(
    path: MoEPath, x: torch.Tensor, e: int, route_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One expert on its tokens `x` `[t, H]`: FC1, activation, FC2 (float32 `[t, H]`).

    CUTLASS path: the expert's output (the caller weights and sums). b12x path: the weighted
    contribution `route_weight` `[t]` gives, as the static kernel forms it (module doc).
    """
    cutlass = path.rounding == CUTLASS_PATH
    h = _gemm(x, path.fc1, e, cutlass)
    a = _bf16(activation(h, path.gated), True)
    if cutlass:
        return _gemm(a, path.fc2, e, True)
    if route_weight is None:
        raise ValueError("the b12x path forms weighted contributions: pass route_weight")
    g = path.fc2
    aq = quantize_activation(a, g.act_scale[e], g.act_scale_is_divisor)
    w = nvfp4.block_values(g.weight[e], g.scale[e])
    scale = _bf16(route_weight.to(torch.float32) * g.alpha[e], True).unsqueeze(-1)
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    for c in range(0, w.shape[1], B12X_GROUP):
        part = _bf16(exact_matmul(aq[:, c : c + B12X_GROUP], w[:, c : c + B12X_GROUP]), True)
        out += _bf16(part * scale, True)
    return out


def moe_forward(
    path: MoEPath, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """`sum_j w[t, j] * expert_{id[t, j]}(x[t])` over slots in order, id -1 skipped; bf16 `[T, H]`."""
    tokens, k = topk_ids.shape
    ids = topk_ids.to(torch.int64)
    y = torch.zeros(tokens, k, x.shape[1], dtype=torch.float32)
    xf = x.to(torch.float32).cpu()
    w = topk_weights.to(torch.float32).cpu()
    b12x = path.rounding == B12X_PATH
    for e in ids[ids >= 0].unique().tolist():
        t_idx, slot = (ids.cpu() == e).nonzero(as_tuple=True)
        route = w[t_idx, slot] if b12x else None
        y[t_idx, slot] = expert_forward(path, xf[t_idx], e, route)
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32)
    for j in range(k):
        live = (ids[:, j] >= 0).cpu()
        out[live] = out[live] + (y[live, j] if b12x else w[live, j : j + 1] * y[live, j])
    return out.to(torch.bfloat16).to(x.device)


def _fc1_operands(
    w13: torch.Tensor, sf: torch.Tensor, geom: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded `[E, R, H/2]` codes and row-major scales from the stored FC1 tensors."""
    n, n_p, h = geom.intermediate, geom.intermediate_padded, geom.hidden
    rows = unswizzle(sf, geom.w13_rows, h // nvfp4.BLOCK)
    if geom.gated:
        return unpad_halves(w13, n, n_p, 2), unpad_halves(rows, n, n_p, 2)
    return w13[:, :n], rows[:, :n]


def _fc2_operands(
    w2: torch.Tensor, sf: torch.Tensor, geom: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded `[E, H, n/2]` codes and row-major scales from the stored FC2 tensors."""
    n, n_p, h = geom.intermediate, geom.intermediate_padded, geom.hidden
    if n % nvfp4.BLOCK:
        raise ValueError(f"intermediate size {n} is not a multiple of {nvfp4.BLOCK}")
    rows = unswizzle(sf, h, n_p // nvfp4.BLOCK)
    return w2[:, :, : n // 2], rows[:, :, : n // nvfp4.BLOCK]


def _per_expert(scale: torch.Tensor, e: int) -> torch.Tensor:
    return scale.to(torch.float32).reshape(-1).expand(e) if scale.numel() == 1 else scale


def _gemms(
    t: dict[str, torch.Tensor], geom: Geometry, sf13: str, sf2: str
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    cpu = {k: t[k].cpu() for k in ("w13", "w2", sf13, sf2)}
    return (
        _fc1_operands(cpu["w13"], cpu[sf13], geom),
        _fc2_operands(cpu["w2"], cpu[sf2], geom),
    )


def cutlass_path(t: dict[str, torch.Tensor], geom: Geometry) -> MoEPath:
    """The prefill path: `w13_sf`/`w2_sf` with the `cutlass.*` scalars (multiplier form)."""
    (w1, s1), (w2, s2) = _gemms(t, geom, "w13_sf", "w2_sf")
    e = geom.num_experts
    fc1 = Gemm(
        w1,
        s1,
        t["cutlass.fc1_alpha"].cpu(),
        _per_expert(t["cutlass.fc1_act_global"].cpu(), e),
        False,
    )
    fc2 = Gemm(
        w2,
        s2,
        t["cutlass.fc2_alpha"].cpu(),
        _per_expert(t["cutlass.fc2_act_global"].cpu(), e),
        False,
    )
    return MoEPath(fc1, fc2, geom.gated, rounding=CUTLASS_PATH)


def b12x_path(t: dict[str, torch.Tensor], geom: Geometry, mode: str) -> MoEPath:
    """The decode path with the `b12x.*` tensors, as `B12xMoEWrapper.run` is called.

    baked: the baked scales, `w1_alpha` quantizes the activation and scales the output.
    shared: the CUTLASS scale bytes, `input_global_scale` quantizes, and the output alpha is the
    wrapper's fold `w1_alpha * input_global_scale`.
    """
    e = geom.num_experts
    w1_alpha = t["b12x.w1_alpha"].cpu()
    if mode == "baked":
        (w1, s1), (w2, s2) = _gemms(t, geom, "b12x.w13_sf", "b12x.w2_sf")
        act1, alpha1 = w1_alpha, w1_alpha
    elif mode == "shared":
        (w1, s1), (w2, s2) = _gemms(t, geom, "w13_sf", "w2_sf")
        act1 = _per_expert(t["b12x.input_global_scale"].cpu(), e)
        alpha1 = w1_alpha.to(torch.float32) * act1
    else:
        raise ValueError(f"unknown b12x scale mode {mode!r}")
    fc1 = Gemm(w1, s1, alpha1, act1, True)
    fc2 = Gemm(
        w2, s2, t["b12x.w2_alpha"].cpu(), _per_expert(t["b12x.fc2_input_scale"].cpu(), e), True
    )
    return MoEPath(fc1, fc2, geom.gated, rounding=B12X_PATH)
