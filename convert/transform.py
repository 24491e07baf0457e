"""One MoE layer, ModelOpt per-expert tensors -> the artifact's kernel-ready tensors.

The FP4 payload is stored once (padded to `n_p`); block scales are swizzled once for CUTLASS
(and reused by b12x in shared mode); baked mode adds b12x scales with `weight_scale_2` folded in.
Every number the conversion changes is measured against the source and reported as fidelity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moepack.runtime import layout, nvfp4, scales
from moepack.runtime.format import Geometry

from .checkpoint import CheckpointError
from .moe_layers import MoELayer

FIDELITY_CHUNK = 16
"""Experts per chunk when measuring error: bounds the float32 temporaries."""


@dataclass
class LayerResult:
    tensors: list[tuple[str, torch.Tensor]]
    fidelity: dict[str, float | int]
    gate_up_requantized_experts: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Proj:
    """One projection of all experts, row-major scales, rows padded (per half when gated)."""

    payload: torch.Tensor  # uint8 [E, rows_p, K/2]
    sf: torch.Tensor  # e4m3 [E, rows_p, K/16] as stored (after any requantization)
    src_scale: torch.Tensor  # float32 [E, rows_p, K/16]: source sf * source ws2 (0 in padding)
    ws2: torch.Tensor  # float32 [E]
    input_scale: torch.Tensor  # float32 [E]


def geometry_of(get: Callable[[str], torch.Tensor], moe: MoELayer) -> Geometry:
    """Layer geometry from expert 0 (every expert is checked against it while loading)."""
    up = get(moe.tensor(0, "up", "weight"))
    down = get(moe.tensor(0, "down", "weight"))
    n, hidden = up.shape[0], up.shape[1] * 2
    if up.dim() != 2 or down.dim() != 2 or tuple(down.shape) != (hidden, n // 2):
        raise CheckpointError(
            f"{moe.tensor(0, 'down', 'weight')}: shape {tuple(down.shape)} does not pair with "
            f"up_proj {tuple(up.shape)} (expected [{hidden}, {n // 2}])"
        )
    if hidden % 16 or n % 16:
        raise CheckpointError(
            f"{moe.prefix}: hidden {hidden} and intermediate {n} must be multiples of 16"
        )
    return Geometry(moe.num_experts, hidden, n, layout.padded_intermediate(n), moe.gated)


def _scalar(get: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
    t = get(name)
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise CheckpointError(f"{name}: expected one float scalar, got {t.dtype}{list(t.shape)}")
    v = t.to(torch.float32).reshape(())
    if not (math.isfinite(float(v)) and float(v) > 0):
        raise CheckpointError(f"{name}: scale {float(v)} is not finite and positive")
    return v


def _expert_part(
    get: Callable[[str], torch.Tensor], moe: MoELayer, e: int, role: str, rows: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load and validate one expert projection: (payload, block scales, ws2, input_scale)."""
    w_name, s_name = moe.tensor(e, role, "weight"), moe.tensor(e, role, "weight_scale")
    w, sf = get(w_name), get(s_name)
    if w.dtype != torch.uint8 or tuple(w.shape) != (rows, k // 2):
        raise CheckpointError(
            f"{w_name}: expected uint8 [{rows}, {k // 2}], got {w.dtype}{list(w.shape)}"
        )
    if sf.dtype != torch.float8_e4m3fn or tuple(sf.shape) != (rows, k // 16):
        raise CheckpointError(
            f"{s_name}: expected float8_e4m3fn [{rows}, {k // 16}], got {sf.dtype}{list(sf.shape)}"
        )
    bits = sf.view(torch.uint8)
    if bool(((bits & 0x7F) == 0x7F).any()):
        raise CheckpointError(f"{s_name}: block scales contain NaN")
    if bool((((bits & 0x80) != 0) & ((bits & 0x7F) != 0)).any()):
        raise CheckpointError(f"{s_name}: block scales are negative")
    ws2 = _scalar(get, moe.tensor(e, role, "weight_scale_2"))
    x_scale = _scalar(get, moe.tensor(e, role, "input_scale"))
    return w, sf, ws2, x_scale


def _load_proj(
    get: Callable[[str], torch.Tensor],
    moe: MoELayer,
    roles: tuple[str, ...],
    shape: tuple[int, int, int, int],
) -> tuple[_Proj, list[torch.Tensor]]:
    """Gather `roles` (stacked as halves in that order) of every expert; per-half ws2 returned.

    `shape` is `(experts, rows, padded rows per half, K)`.
    """
    e_count, rows, rows_p, k = shape
    halves = len(roles)
    payload = torch.zeros((e_count, rows_p * halves, k // 2), dtype=torch.uint8)
    sf = torch.zeros((e_count, rows_p * halves, k // 16), dtype=torch.float8_e4m3fn)
    ws2 = [torch.zeros(e_count) for _ in roles]
    x_scale = torch.zeros(e_count)
    for e in range(e_count):
        for h, role in enumerate(roles):
            w, s, w2, xs = _expert_part(get, moe, e, role, rows, k)
            payload[e, h * rows_p : h * rows_p + rows] = w
            sf[e, h * rows_p : h * rows_p + rows] = s
            ws2[h][e] = w2
            if h and not torch.equal(xs, x_scale[e]):
                raise CheckpointError(
                    f"{moe.tensor(e, role, 'input_scale')}: differs from "
                    f"{moe.tensor(e, roles[0], 'input_scale')} (gate and up share the FC1 input)"
                )
            x_scale[e] = xs
    src = sf.to(torch.float32)
    for h in range(halves):
        src[:, h * rows_p : (h + 1) * rows_p] *= ws2[h].reshape(-1, 1, 1)
    return _Proj(payload, sf, src, ws2[0], x_scale), ws2


def _unify_gate_up(proj: _Proj, ws2_halves: list[torch.Tensor], rows_p: int) -> int:
    """One ws2 per expert for `[up; gate]`: max of the two, the other half's scales requantized."""
    unified, f_up, f_gate = scales.unify_scale_2(ws2_halves[0], ws2_halves[1])
    proj.ws2 = unified
    changed = 0
    for h, factor in enumerate((f_up, f_gate)):
        need = factor != 1
        if bool(need.any()):
            rows = slice(h * rows_p, (h + 1) * rows_p)
            part = proj.sf[need, rows].to(torch.float32) * factor[need].reshape(-1, 1, 1)
            proj.sf.view(torch.uint8)[need, rows] = nvfp4.e4m3_from_float(part).view(torch.uint8)
            changed += int(need.sum())
    return changed


_SQ_SUM = (nvfp4.E2M1_VALUES**2)[torch.arange(256) & 7] + (nvfp4.E2M1_VALUES**2)[
    (torch.arange(256) >> 4) & 7
]
"""Sum of the squared E2M1 values of both codes in a byte, for every byte value."""


def _rel_errors(payload: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-expert relative Frobenius error of `e2m1 * got` against `e2m1 * ref` (scales per block).

    `sum((e2m1 * (got - ref))^2)` factors per block into `sum(e2m1^2) * (got - ref)^2`, so the
    error is exact without materializing dequantized weights.
    """
    out = []
    for start in range(0, payload.shape[0], FIDELITY_CHUNK):
        p = payload[start : start + FIDELITY_CHUNK]
        energy = _SQ_SUM[p.to(torch.int64)].reshape(*p.shape[:2], -1, 8).sum(-1)
        g = got[start : start + FIDELITY_CHUNK].to(torch.float64)
        r = ref[start : start + FIDELITY_CHUNK].to(torch.float64)
        err = (energy * (g - r) ** 2).sum((1, 2))
        norm = (energy * r**2).sum((1, 2))
        out.append(torch.where(norm > 0, (err / norm).sqrt(), err.sqrt()))
    return torch.cat(out)


def convert_layer(
    get: Callable[[str], torch.Tensor], moe: MoELayer, geo: Geometry, mode: str
) -> LayerResult:
    """All tensors of one layer file, in `Geometry.tensor_specs` order, plus fidelity figures."""
    n_p = geo.intermediate_padded
    fc1_roles = ("up", "gate") if geo.gated else ("up",)
    e, h, n = geo.num_experts, geo.hidden, geo.intermediate
    fc1, ws2_halves = _load_proj(get, moe, fc1_roles, (e, n, n_p, h))
    fc2, _ = _load_proj(get, moe, ("down",), (e, h, h, n))
    requantized = _unify_gate_up(fc1, ws2_halves, n_p) if geo.gated else 0
    w2 = layout.pad_dim(fc2.payload, 2, n_p // 2)
    sf2_rm = layout.pad_dim(fc2.sf, 2, n_p // 16)
    src2 = layout.pad_dim(fc2.src_scale, 2, n_p // 16)
    tensors: dict[str, torch.Tensor] = {
        "w13": fc1.payload,
        "w2": w2,
        "w13_sf": layout.swizzle(fc1.sf),
        "w2_sf": layout.swizzle(sf2_rm),
    }
    stored13 = fc1.sf.to(torch.float32) * fc1.ws2.reshape(-1, 1, 1)
    stored2 = sf2_rm.to(torch.float32) * fc2.ws2.reshape(-1, 1, 1)
    cut = scales.cutlass_scalars(fc1.input_scale, fc1.ws2, fc2.input_scale, fc2.ws2)
    if mode == "baked":
        baked13 = scales.bake_block_scales(fc1.sf, fc1.ws2)
        baked2 = scales.bake_block_scales(sf2_rm, fc2.ws2)
        tensors["b12x.w13_sf"] = layout.swizzle(baked13)
        tensors["b12x.w2_sf"] = layout.swizzle(baked2)
        b12x = scales.b12x_baked_scalars(fc1.input_scale, fc2.input_scale, geo.num_experts)
        b13, b2 = baked13.to(torch.float32), baked2.to(torch.float32)
        flushed = int(((fc1.sf.to(torch.float32) > 0) & (b13 == 0)).sum()) + int(
            ((sf2_rm.to(torch.float32) > 0) & (b2 == 0)).sum()
        )
    else:
        b12x = scales.b12x_shared_scalars(fc1.input_scale, fc1.ws2, fc2.input_scale, fc2.ws2)
        b13, b2, flushed = stored13, stored2, 0
    tensors |= {
        "cutlass.fc1_act_global": cut.fc1_act_global,
        "cutlass.fc1_alpha": cut.fc1_alpha,
        "cutlass.fc2_act_global": cut.fc2_act_global,
        "cutlass.fc2_alpha": cut.fc2_alpha,
        "b12x.w1_alpha": b12x.w1_alpha,
        "b12x.w2_alpha": b12x.w2_alpha,
        "b12x.fc2_input_scale": b12x.fc2_input_scale,
    }
    if b12x.input_global_scale is not None:
        tensors["b12x.input_global_scale"] = b12x.input_global_scale
    b12x_err = torch.cat([_rel_errors(fc1.payload, b13, fc1.src_scale), _rel_errors(w2, b2, src2)])
    requant_err = (
        _rel_errors(fc1.payload, stored13, fc1.src_scale) if requantized else torch.zeros(1)
    )
    fidelity = {
        "b12x_max_rel_err": float(b12x_err.max()),
        "b12x_mean_rel_err": float(b12x_err.mean()),
        "b12x_flushed_scales": flushed,
        "requant_max_rel_err": float(requant_err.max()),
    }
    order = geo.tensor_specs(mode)
    return LayerResult([(name, tensors[name]) for name in order], fidelity, requantized)
