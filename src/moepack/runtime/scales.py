"""The alpha algebra: per-layer scalars each kernel takes, from ModelOpt's per-expert scales.

Notation (per MoE layer, E experts): `s13[e]`, `s2[e]` are ModelOpt `input_scale` of FC1
(`up_proj`, or gate/up) and FC2 (`down_proj`); `ws2_13[e]`, `ws2_2[e]` their `weight_scale_2`.
Both kernels would accept per-expert activation scales (CUTLASS reads a 1-D activation scale
as per-expert; b12x takes `input_global_scale` as a scalar or `[E]` in FlashInfer 0.7.x, and
`fc2_input_scale` too from 0.7.4 on); moepack chooses one scale per layer,
the max over experts, as vLLM and TensorRT-LLM do: `a13 = max_e s13[e]`, `a2 = max_e s2[e]`.
The max never clips an expert's calibrated range (a smaller per-expert scale would only give
that expert finer steps), and it keeps one 0-d scalar per GEMM for both paths. A GEMM output is `alpha[e] * sum(x_q * w_q)` where
`x_q`, `w_q` are E2M1 codes times their E4M3 block scales, so `alpha[e] = a * ws2[e]`.

All results are float32, contiguous; per-expert vectors are `[E]`, layer scalars 0-d: CUTLASS
rejects a `[1]` activation scale when E > 1 (it reads 1-D as per-expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nvfp4 import e4m3_from_float


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).reshape(-1).contiguous()


def activation_scale(input_scales: torch.Tensor) -> torch.Tensor:
    """One activation scale for a layer: `max_e input_scale[e]`, 0-d."""
    return _f32(input_scales).amax()


@dataclass(frozen=True)
class CutlassScalars:
    """FlashInfer `cutlass_fused_moe` NVFP4 scalars; `quant_scales` is
    `[fc1_act_global, w13_sf, fc1_alpha, fc2_act_global, w2_sf, fc2_alpha]`."""

    fc1_act_global: torch.Tensor  # 0-d  = 1 / a13
    fc1_alpha: torch.Tensor  # [E]  = a13 * ws2_13
    fc2_act_global: torch.Tensor  # 0-d  = 1 / a2
    fc2_alpha: torch.Tensor  # [E]  = a2 * ws2_2


def cutlass_scalars(
    s13: torch.Tensor, ws2_13: torch.Tensor, s2: torch.Tensor, ws2_2: torch.Tensor
) -> CutlassScalars:
    """`fc1_act_global = 1/a13`, `fc1_alpha = a13 * ws2_13`, `fc2_act_global = 1/a2`,
    `fc2_alpha = a2 * ws2_2`."""
    a13, a2 = activation_scale(s13), activation_scale(s2)
    return CutlassScalars(
        fc1_act_global=(1.0 / a13).contiguous(),
        fc1_alpha=(a13 * _f32(ws2_13)).contiguous(),
        fc2_act_global=(1.0 / a2).contiguous(),
        fc2_alpha=(a2 * _f32(ws2_2)).contiguous(),
    )


@dataclass(frozen=True)
class B12xScalars:
    """Arguments of `B12xMoEWrapper.run`: `w1_alpha`, `w2_alpha`, `fc2_input_scale` and, in shared
    mode only, `input_global_scale` (None in baked mode: the kernel then quantizes FC1 input
    with `w1_alpha`)."""

    w1_alpha: torch.Tensor  # [E]
    w2_alpha: torch.Tensor  # [E]
    fc2_input_scale: torch.Tensor  # 0-d
    input_global_scale: torch.Tensor | None  # 0-d or None


def b12x_baked_scalars(s13: torch.Tensor, s2: torch.Tensor, num_experts: int) -> B12xScalars:
    """Baked mode (TensorRT-LLM's SM12x backend): `ws2` lives in the block scales (see
    `bake_block_scales`), so `w1_alpha = a13`, `w2_alpha = a2` for every expert,
    `fc2_input_scale = a2`, no `input_global_scale`."""
    a13, a2 = activation_scale(s13), activation_scale(s2)
    return B12xScalars(
        w1_alpha=a13.expand(num_experts).contiguous(),
        w2_alpha=a2.expand(num_experts).contiguous(),
        fc2_input_scale=a2.clone(),
        input_global_scale=None,
    )


def b12x_shared_scalars(
    s13: torch.Tensor, ws2_13: torch.Tensor, s2: torch.Tensor, ws2_2: torch.Tensor
) -> B12xScalars:
    """Shared mode (exact, reuses the CUTLASS scale bytes): `input_global_scale = a13`,
    `w1_alpha = ws2_13`, `w2_alpha = ws2_2 * a2`, `fc2_input_scale = a2`.

    b12x folds `w1_alpha * input_global_scale` into its FC1 alpha, which is then the CUTLASS
    `fc1_alpha`. Derived from the FlashInfer 0.7.x source; not yet run on SM12x hardware.
    """
    a13, a2 = activation_scale(s13), activation_scale(s2)
    return B12xScalars(
        w1_alpha=_f32(ws2_13).clone(),
        w2_alpha=(_f32(ws2_2) * a2).contiguous(),
        fc2_input_scale=a2.clone(),
        input_global_scale=a13.clone(),
    )


def bake_block_scales(block_scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """`e4m3(float(sf) * ws2[e])` for scales `[E, ...]` and `ws2` `[E]` (lossy: small products
    fall into E4M3's subnormal range or flush to zero)."""
    ws2 = _f32(scale_2).reshape(-1, *([1] * (block_scale.dim() - 1)))
    return e4m3_from_float(block_scale.to(torch.float32) * ws2)


def unify_scale_2(
    scale_2_a: torch.Tensor, scale_2_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One `weight_scale_2` per expert for two halves that carry their own (gate and up).

    Returns `(ws2, factor_a, factor_b)` with `ws2 = max(a, b)` and `factor_x = x / ws2 <= 1`:
    a half's block scales are requantized as `e4m3(float(sf) * factor_x)`, exact where the
    factor is 1.
    """
    a, b = _f32(scale_2_a), _f32(scale_2_b)
    ws2 = torch.maximum(a, b)
    return ws2, a / ws2, b / ws2
