"""Real-geometry synthetic checkpoints in seconds, for throughput benchmarks.

`synthetic.write_checkpoint` quantizes every expert exactly as ModelOpt does (about 5 minutes a
Super layer on the dev box), which the correctness tests need and a throughput benchmark does
not: conversion and loading cost the same on any valid bytes. This writes the same files (names,
shapes, dtypes, shards, config, index) with random FP4 payload bytes, random finite positive
E4M3 block scales and positive float scalars, by swapping the per-expert tensor maker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

from moepack.convert import synthetic

E4M3_LO, E4M3_HI = 0x20, 0x60
"""Block-scale bytes drawn from here: positive normal E4M3 values (0.0078 to 2.0)."""


def _random_linear(g: torch.Generator, name: str, n: int, k: int) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight": torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
        f"{name}.weight_scale": torch.randint(
            E4M3_LO, E4M3_HI, (n, k // 16), generator=g, dtype=torch.uint8
        ).view(torch.float8_e4m3fn),
        f"{name}.weight_scale_2": (torch.rand((), generator=g) * 1e-3 + 1e-4).reshape(()),
        f"{name}.input_scale": (torch.rand((), generator=g) * 1e-2 + 1e-3).reshape(()),
    }


def _random_expert(
    g: torch.Generator, spec: synthetic.SyntheticSpec, base: str
) -> dict[str, torch.Tensor]:
    h, n = spec.moe_hidden, spec.intermediate
    out = _random_linear(g, f"{base}.up_proj", n, h)
    if spec.variant == "gated":
        out |= _random_linear(g, f"{base}.gate_proj", n, h)
        out[f"{base}.gate_proj.input_scale"] = out[f"{base}.up_proj.input_scale"].clone()
    return out | _random_linear(g, f"{base}.down_proj", h, n)


def write_fast_checkpoint(out: Path, spec: synthetic.SyntheticSpec) -> Path:
    """`synthetic.write_checkpoint` with random expert bytes (see the module docstring)."""

    def experts(g: torch.Generator, s: synthetic.SyntheticSpec, layer: int) -> Iterator[dict]:
        for e in range(s.num_experts):
            yield _random_expert(g, s, f"{synthetic._prefix(s, layer)}.experts.{e}")

    with mock.patch.object(synthetic, "_experts", experts):
        return synthetic.write_checkpoint(out, spec)


def super_checkpoint(root: Path, layers: int) -> Path:
    """A Super-geometry checkpoint with `layers` MoE layers at `root` (made once, then reused)."""
    spec = synthetic.super_layer_spec()
    spec = synthetic.SyntheticSpec(
        **{**spec.__dict__, "pattern": "E" * layers, "shards": 4 * layers}
    )
    if not (root / "config.json").exists():
        write_fast_checkpoint(root, spec)
    return root
