"""Warm-up before CUDA-graph capture, and the FlashInfer environment variables refused, tested on
CPU as far as it goes.

The installed FlashInfer's real `B12xMoEWrapper` and dispatch run on CPU (construction,
first-use preparation, the capture guard); only the kernel launches
(`launch_sm120_static_moe`/`_dynamic_moe`) and `cutlass_fused_moe` are replaced by recorders,
and `torch.cuda.is_current_stream_capturing` is patched: to its true CPU answer (False), or to
True to simulate a capture. What only SM12x hardware can confirm: that the kernels compile and
run, and that a real CUDA graph captured after warm-up replays correctly.
"""

from __future__ import annotations

from pathlib import Path

import flashinfer
import flashinfer.fused_moe
import pytest
import torch
from flashinfer.fused_moe.cute_dsl.blackwell_sm12x import moe_dispatch
from torch.profiler import ProfilerActivity, profile

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint
from moepack.errors import CompatibilityError
from moepack.runtime import load
from moepack.runtime.flashinfer_env import REFUSED_ENV, refused_environment

GUARDED = hasattr(moe_dispatch, "_refuse_during_capture")
"""FlashInfer 0.7.4 refuses first-use preparation inside a capture; 0.7.2.x has no such guard."""


@pytest.fixture(scope="module")
def warm_artifacts(tmp_path_factory) -> dict[str, Path]:
    """hidden 128 (FlashInfer 0.7.4's W4A4 wrapper requires it), default pad tile."""
    root = tmp_path_factory.mktemp("warmup")
    out = {}
    for variant, mode in (("super", "shared"), ("gated", "baked")):
        spec = synthetic.default_spec(variant, hidden=128, moe_hidden=128)
        ckpt = synthetic.write_checkpoint(root / f"ckpt-{variant}", spec)
        out[mode] = root / f"{variant}-{mode}"
        convert_checkpoint(ckpt, out[mode], b12x_scales=mode, moe_only=True)
    return out


@pytest.fixture
def kernels(monkeypatch):
    """Recorders in place of the kernel launches; capture probe answering like CPU torch."""
    calls: list[str] = []

    def b12x(**kw):
        calls.append("b12x")
        return kw["scatter_output"]

    def cutlass(**kw):
        calls.append("cutlass")
        return kw["output"]

    monkeypatch.setattr(moe_dispatch, "launch_sm120_static_moe", b12x)
    monkeypatch.setattr(moe_dispatch, "launch_sm120_dynamic_moe", b12x)
    monkeypatch.setattr(flashinfer.fused_moe, "cutlass_fused_moe", cutlass)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return calls


def _decode(moe, t: int = 3):
    g, k = moe.spec.geometry, moe.spec.top_k
    x = torch.randn(t, g.hidden).to(torch.bfloat16)
    ids = torch.arange(t * k, dtype=torch.int32).remainder_(g.num_experts).view(t, k)
    return x, ids, torch.full((t, k), 0.5)


def _allocations(fn) -> int:
    """Bytes torch allocated while `fn` ran (CPU allocator, from the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def _first_layer(root: Path, **kw):
    art = load(root, device="cpu", capability=(12, 0), **kw)
    return art, next(iter(art.moe_layers.values()))


def test_default_warmup_covers_each_path(warm_artifacts, kernels) -> None:
    _, moe = _first_layer(warm_artifacts["baked"])
    assert moe.warmup() == [("b12x", 1), ("b12x", moe.max_decode_tokens), ("cutlass", 64)]
    assert kernels == ["b12x", "b12x", "cutlass"]
    assert moe.warmup([2, 5]) == [("b12x", 2), ("b12x", 5)]


def test_load_offers_warmup(warm_artifacts, kernels) -> None:
    art, _ = _first_layer(warm_artifacts["baked"], warmup=[4])
    assert kernels == ["b12x"] * len(art.moe_layers)


@pytest.mark.parametrize("mode", ["shared", "baked"])
def test_decode_forward_allocates_nothing_after_warmup(warm_artifacts, kernels, mode) -> None:
    """After warm-up a decode forward allocates nothing, and passes under a simulated capture.
    Before it, the shared-mode first call allocates (FlashInfer folds w1_alpha *
    input_global_scale into a new tensor) and, on 0.7.4, is refused inside a capture."""
    _, moe = _first_layer(warm_artifacts[mode])
    x, ids, w = _decode(moe)
    if GUARDED:
        torch.cuda.is_current_stream_capturing = lambda: True
        with pytest.raises(RuntimeError, match="eager warm-up"):
            moe(x, ids, w)
        torch.cuda.is_current_stream_capturing = lambda: False
    _, cold = _first_layer(warm_artifacts[mode])
    first = _allocations(lambda: cold(x, ids, w))
    if mode == "shared":
        assert first > 0
    moe.warmup([x.shape[0]])
    assert _allocations(lambda: moe(x, ids, w)) == 0
    torch.cuda.is_current_stream_capturing = lambda: True  # restored by the fixture
    out = moe(x, ids, w)
    assert out.shape == x.shape


@pytest.mark.parametrize("name", sorted(REFUSED_ENV))
def test_refused_environment(warm_artifacts, kernels, monkeypatch, name) -> None:
    """Set to "1" (the only value FlashInfer acts on), a variable refuses every FlashInfer
    backend before a byte is read; other values and the reference backend are not refused."""
    monkeypatch.setenv(name, "1")
    with pytest.raises(CompatibilityError, match=name):
        load(warm_artifacts["baked"], device="cpu", capability=(12, 0))
    with pytest.raises(CompatibilityError, match=name):
        load(warm_artifacts["baked"], device="cpu", capability=(12, 0), backend="cutlass")
    load(warm_artifacts["baked"], device="cpu", capability=(12, 0), backend="reference")
    for value in ("0", "", "true"):
        monkeypatch.setenv(name, value)
        load(warm_artifacts["baked"], device="cpu", capability=(12, 0))


@pytest.mark.parametrize("value", ["1", "0", "", "true", "yes"])
def test_refused_values_are_flashinfers(monkeypatch, value) -> None:
    """Our predicate is the installed FlashInfer's: W4A16 forced exactly when its dispatch says
    so, 4over6 on exactly when its own env flag reader says so."""
    from flashinfer.quantization.nvfp4_quantization_utils import env_flag_enabled

    monkeypatch.setenv("FLASHINFER_B12X_FORCE_MOE_W4A16", value)
    monkeypatch.setenv("FLASHINFER_NVFP4_4OVER6", value)
    found = refused_environment()
    forced = moe_dispatch._normalize_quant_mode("nvfp4") == "w4a16"
    assert ("FLASHINFER_B12X_FORCE_MOE_W4A16" in found) == forced
    assert ("FLASHINFER_NVFP4_4OVER6" in found) == env_flag_enabled("FLASHINFER_NVFP4_4OVER6")
