"""One MoE layer, ModelOpt per-expert tensors -> the artifact's kernel-ready tensors.

The FP4 payload is stored once (padded to `n_p`); block scales are swizzled once for CUTLASS
(and reused by b12x in shared mode); baked mode adds b12x scales with `weight_scale_2` folded in.
Every number the conversion changes is measured against the source and reported as fidelity.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from moepack.format import Geometry
from moepack.runtime import layout, nvfp4, scales

from .checkpoint import CheckpointError
from .moe_layers import MoELayer

FIDELITY_CHUNK = 4
"""Experts per chunk when measuring error: bounds the float32 temporaries (~40 MB a chunk on
Nemotron Super)."""
FIDELITY_WORKERS = 8
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
"""Value of every E4M3 byte (source scales are checked NaN-free before use)."""


@dataclass
class LayerResult:
    """A layer's file tensors, and `measure()` for its fidelity figures: separate so that the
    measurement can run while the tensors are being written."""

    tensors: list[tuple[str, torch.Tensor]]
    measure: Callable[[], dict[str, float | int]]
    gate_up_requantized_experts: int = 0


@dataclass
class _Proj:
    """One projection of all experts: payload and row-major scales padded to their stored shape
    (rows per half when gated), plus what the source said, for measuring changes."""

    payload: torch.Tensor  # uint8 [E, rows, K_p/2]
    sf: torch.Tensor  # e4m3 [E, rows, K_p/16] as stored (after any requantization)
    src_sf: torch.Tensor  # e4m3, the source block scales (the same tensor unless requantized)
    src_ws2: torch.Tensor  # float32 [E, halves]: the source weight_scale_2 of each half
    ws2: torch.Tensor  # float32 [E]: the one weight_scale_2 the kernels get
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
    shape: tuple[int, int, int, int, int],
    device: torch.device,
) -> _Proj:
    """Gather `roles` (stacked as halves in that order) of every expert into padded tensors.

    `shape` is `(experts, rows, padded rows per half, K, padded K)`.
    """
    e_count, rows, rows_p, k, k_p = shape
    halves = len(roles)
    payload = torch.zeros((e_count, rows_p * halves, k_p // 2), dtype=torch.uint8, device=device)
    sf = torch.zeros(
        (e_count, rows_p * halves, k_p // 16), dtype=torch.float8_e4m3fn, device=device
    )
    ws2 = torch.zeros((e_count, halves))
    x_scale = torch.zeros(e_count)
    for e in range(e_count):
        for h, role in enumerate(roles):
            w, s, w2, xs = _expert_part(get, moe, e, role, rows, k)
            payload[e, h * rows_p : h * rows_p + rows, : k // 2] = w.to(device, non_blocking=True)
            sf[e, h * rows_p : h * rows_p + rows, : k // 16] = s.to(device, non_blocking=True)
            ws2[e, h] = w2
            if h and not torch.equal(xs, x_scale[e]):
                raise CheckpointError(
                    f"{moe.tensor(e, role, 'input_scale')}: differs from "
                    f"{moe.tensor(e, roles[0], 'input_scale')} (gate and up share the FC1 input)"
                )
            x_scale[e] = xs
    ws2 = ws2.to(device)
    return _Proj(payload, sf, sf, ws2, ws2[:, 0].contiguous(), x_scale.to(device))


def _unify_gate_up(proj: _Proj, rows_p: int) -> int:
    """One ws2 per expert for `[up; gate]`: max of the two, the other half's scales requantized."""
    unified, f_up, f_gate = scales.unify_scale_2(proj.src_ws2[:, 0], proj.src_ws2[:, 1])
    proj.ws2 = unified
    need_any = bool((f_up != 1).any() or (f_gate != 1).any())
    if not need_any:
        return 0
    proj.sf = proj.src_sf.clone()
    changed = 0
    for h, factor in enumerate((f_up, f_gate)):
        need = factor != 1
        if bool(need.any()):
            rows = slice(h * rows_p, (h + 1) * rows_p)
            part = proj.sf[need, rows].to(torch.float32) * factor[need].reshape(-1, 1, 1)
            proj.sf.view(torch.uint8)[need, rows] = nvfp4.e4m3_from_float(part).view(torch.uint8)
            changed += int(need.sum())
    return changed


_SQ_BYTE = (nvfp4.E2M1_VALUES**2)[torch.arange(256) & 7] + (nvfp4.E2M1_VALUES**2)[
    (torch.arange(256) >> 4) & 7
]
_SQ_PAIR = _SQ_BYTE[torch.arange(65536) & 0xFF] + _SQ_BYTE[torch.arange(65536) >> 8]
"""Sum of the squared E2M1 values of the four codes in any two bytes: one lookup per 2 bytes."""


def _scale_values(sf: torch.Tensor) -> torch.Tensor:
    return (
        _E4M3.to(sf.device).index_select(0, sf.view(torch.uint8).reshape(-1).int()).view(sf.shape)
    )


def _rel_errors(
    proj: _Proj, variants: list[tuple[torch.Tensor, torch.Tensor | None]]
) -> list[torch.Tensor]:
    """Per-expert relative Frobenius error, against the source, of weights dequantized with each
    `(block scales, ws2 or None)` variant (None: ws2 is folded into the scales).

    `sum((e2m1 * (got - ref))^2)` factors per block into `sum(e2m1^2) * (got - ref)^2`, so the
    error is exact without materializing dequantized weights; one pass over the payload serves
    every variant. Chunks of experts run on a thread pool: the table lookup is single-threaded
    inside torch, and the GIL is released while it runs.
    """
    starts = range(0, proj.payload.shape[0], FIDELITY_CHUNK)
    on_cpu = proj.payload.device.type == "cpu"
    workers = min(FIDELITY_WORKERS, os.cpu_count() or 1) if on_cpu else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = list(pool.map(lambda start: _chunk_errors(proj, variants, start), starts))
    return [torch.cat([c[i] for c in chunks]).cpu() for i in range(len(variants))]


def _chunk_errors(
    proj: _Proj, variants: list[tuple[torch.Tensor, torch.Tensor | None]], start: int
) -> list[torch.Tensor]:
    c = slice(start, start + FIDELITY_CHUNK)
    p = proj.payload[c]
    pairs = p.reshape(-1).view(torch.int16).int() & 0xFFFF
    energy = _SQ_PAIR.to(p.device).index_select(0, pairs).view(*p.shape[:2], -1, 4).sum(-1)
    halves = proj.src_ws2.shape[1]
    ws2_rows = proj.src_ws2[c].repeat_interleave(p.shape[1] // halves, dim=1).unsqueeze(-1)
    ref = _scale_values(proj.src_sf[c]) * ws2_rows
    norm = (energy * ref.square()).sum((1, 2))
    out = []
    for sf, ws2 in variants:
        got = _scale_values(sf[c])
        if ws2 is not None:
            got = got * ws2[c].reshape(-1, 1, 1)
        err = (energy * (got - ref).square()).sum((1, 2))
        out.append(torch.where(norm > 0, err / norm, err).sqrt())
    return out


def _baked(proj: _Proj) -> tuple[torch.Tensor, int]:
    """b12x baked scales `e4m3(sf * ws2[e])`, chunked, and how many nonzero scales flushed to 0."""
    baked = torch.empty_like(proj.sf)
    flushed = 0
    for start in range(0, proj.sf.shape[0], FIDELITY_CHUNK):
        c = slice(start, start + FIDELITY_CHUNK)
        baked[c] = scales.bake_block_scales(proj.sf[c], proj.ws2[c])
        flushed += int(
            (
                (proj.sf[c].view(torch.uint8) & 0x7F != 0)
                & (baked[c].view(torch.uint8) & 0x7F == 0)
            ).sum()
        )
    return baked, flushed


def convert_layer(
    get: Callable[[str], torch.Tensor],
    moe: MoELayer,
    geo: Geometry,
    mode: str,
    device: torch.device | str = "cpu",
) -> LayerResult:
    """All tensors of one layer file, in `Geometry.tensor_specs` order, plus fidelity figures.

    The work runs on `device` (a GPU makes it a small fraction of the I/O); results come back
    on the CPU for writing.
    """
    device = torch.device(device)
    e, h, n, n_p = geo.num_experts, geo.hidden, geo.intermediate, geo.intermediate_padded
    fc1 = _load_proj(get, moe, ("up", "gate") if geo.gated else ("up",), (e, n, n_p, h, h), device)
    fc2 = _load_proj(get, moe, ("down",), (e, h, h, n, n_p), device)
    requantized = _unify_gate_up(fc1, n_p) if geo.gated else 0
    tensors: dict[str, torch.Tensor] = {
        "w13": fc1.payload,
        "w2": fc2.payload,
        "w13_sf": layout.swizzle(fc1.sf),
        "w2_sf": layout.swizzle(fc2.sf),
    }
    cut = scales.cutlass_scalars(fc1.input_scale, fc1.ws2, fc2.input_scale, fc2.ws2)
    b12x_13: tuple[torch.Tensor, torch.Tensor | None]
    b12x_2: tuple[torch.Tensor, torch.Tensor | None]
    if mode == "baked":
        baked13, flushed13 = _baked(fc1)
        baked2, flushed2 = _baked(fc2)
        tensors["b12x.w13_sf"] = layout.swizzle(baked13)
        tensors["b12x.w2_sf"] = layout.swizzle(baked2)
        b12x = scales.b12x_baked_scalars(fc1.input_scale, fc2.input_scale, geo.num_experts)
        flushed = flushed13 + flushed2
        b12x_13, b12x_2 = (baked13, None), (baked2, None)
    else:
        b12x = scales.b12x_shared_scalars(fc1.input_scale, fc1.ws2, fc2.input_scale, fc2.ws2)
        flushed = 0
        b12x_13, b12x_2 = (fc1.sf, fc1.ws2), (fc2.sf, fc2.ws2)
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

    def measure() -> dict[str, float | int]:
        err13, requant_err = _rel_errors(fc1, [b12x_13, (fc1.sf, fc1.ws2)])
        (err2,) = _rel_errors(fc2, [b12x_2])
        b12x_err = torch.cat([err13, err2])
        return {
            "b12x_max_rel_err": float(b12x_err.max()),
            "b12x_mean_rel_err": float(b12x_err.mean()),
            "b12x_flushed_scales": flushed,
            "requant_max_rel_err": float(requant_err.max()),
        }

    order = geo.tensor_specs(mode)
    return LayerResult([(name, tensors[name].cpu()) for name in order], measure, requantized)
