"""Argument contracts: the exact tensors `HybridMoE` hands to FlashInfer's CUTLASS NVFP4 MoE and to
the b12x SM12x kernels, checked against FlashInfer's own CPU-side code.

No SM12x kernel runs here (no SM120/SM121 GPU, no CUDA): `cutlass_fused_moe` and
`B12xMoEWrapper` are replaced by recorders in the dispatch test, and everything else calls only
FlashInfer's pure-PyTorch helpers and validators. These tests prove the arguments are the ones
the kernels' Python and C++ entry points expect (shapes, dtypes, strides, storage); that the
kernels compute the right thing with them is the reference backend's claim, not verified here.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import flashinfer
import flashinfer.fused_moe
import pytest
import torch
from flashinfer.cute_dsl.utils import convert_sf_to_mma_layout
from flashinfer.fused_moe.cute_dsl.blackwell_sm12x import moe_dispatch
from flashinfer.fused_moe.runners import CutlassNvfp4Runner

from moepack.runtime import load
from moepack.runtime.hybrid import HybridMoE

CASES = [("super", "baked"), ("gated", "shared"), ("nano", "shared")]


def first_layer(root: Path) -> HybridMoE:
    art = load(root, device="cpu")
    return next(iter(art.moe_layers.values()))


def shares_storage(t: torch.Tensor, moe: HybridMoE) -> bool:
    return t.untyped_storage().data_ptr() == moe.storage.untyped_storage().data_ptr()


@pytest.mark.parametrize("case", CASES)
def test_cutlass_arguments(by_mode, case) -> None:
    """FlashInfer's own `CutlassNvfp4Runner._pack_weight_inputs` (run with a stub runner) accepts
    the loaded tensors and yields exactly our views; the binding's C++ checks are mirrored."""
    moe = first_layer(by_mode[case])
    g, t = moe.spec.geometry, moe.tensors
    args = moe.cutlass_arguments()
    stub = SimpleNamespace(
        _required_weight_keys=CutlassNvfp4Runner._required_weight_keys,
        device=moe.storage.device,
        config=SimpleNamespace(
            routing=SimpleNamespace(num_experts=g.num_experts),
            experts=SimpleNamespace(intermediate_size=g.intermediate_padded),
            activation=SimpleNamespace(is_gated=g.gated),
        ),
    )
    stub._validate_weight_storage = lambda ts: CutlassNvfp4Runner._validate_weight_storage(stub, ts)
    view = dict(
        zip(
            CutlassNvfp4Runner._required_weight_keys,
            [
                t["w13"],
                t["w2"],
                t["cutlass.fc1_act_global"],
                t["w13_sf"].view(torch.uint8),
                t["cutlass.fc1_alpha"],
                t["cutlass.fc2_act_global"],
                t["w2_sf"].view(torch.uint8),
                t["cutlass.fc2_alpha"],
            ],
            strict=True,
        )
    )
    packed = CutlassNvfp4Runner._pack_weight_inputs(stub, view, g.hidden)
    ours = [args["fc1_expert_weights"], args["fc2_expert_weights"]]
    for mine, theirs in zip(ours, packed[:2], strict=True):
        assert mine.dtype == theirs.dtype == torch.int64 and mine.shape == theirs.shape
        assert mine.data_ptr() == theirs.data_ptr() and shares_storage(mine, moe)
    qs = args["quant_scales"]
    assert [q.dtype for q in qs] == [torch.float32, torch.int32, torch.float32] * 2
    # BIND:1486-1487: activation scales 0-d (a [1] tensor fails when E > 1); alphas [E].
    assert qs[0].dim() == 0 and qs[3].dim() == 0
    assert qs[2].shape == qs[5].shape == (g.num_experts,)
    # BIND:1488-1531: int32 block scales [E, pad128(rows), pad4(K/16) / 4].
    assert qs[1].shape == (g.num_experts, -(-g.w13_rows // 128) * 128, -(-g.hidden // 64))
    assert qs[4].shape == (
        g.num_experts,
        -(-g.hidden // 128) * 128,
        -(-g.intermediate_padded // 64),
    )
    assert qs[1].data_ptr() == packed[3].data_ptr() and qs[4].data_ptr() == packed[6].data_ptr()
    # BIND:406-420: inter_size = fc2.size(2) * 16; gated fc1 rows = 2 * inter_size.
    inter = ours[1].shape[2] * 16
    assert inter == g.intermediate_padded
    assert ours[0].shape[1] == inter * (2 if g.gated else 1)
    assert all(q.is_contiguous() and shares_storage(q, moe) for q in qs)


@pytest.fixture
def no_capture_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashInfer 0.7.4's first-use preparation asks `torch.cuda.is_current_stream_capturing()`
    whether a CUDA graph is being captured, and CPU torch refuses to answer. This patches exactly
    that one probe, to the true answer on a machine without CUDA (nothing is capturing); every
    other line of `_get_weight_views` runs as released."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


@pytest.mark.parametrize("case", CASES)
def test_b12x_arguments(by_mode, case, no_capture_probe) -> None:
    """The MMA views equal `convert_sf_to_mma_layout` (shape, strides, pointer, values), and
    `moe_dispatch._get_weight_views` (the b12x launch's CPU-side preparation) accepts them."""
    moe = first_layer(by_mode[case])
    g, t = moe.spec.geometry, moe.tensors
    args = moe.b12x_arguments()
    baked = moe.spec.b12x_mode == "baked"
    sources = {
        "w1_weight_sf": (t["b12x.w13_sf" if baked else "w13_sf"], g.w13_rows, g.hidden),
        "w2_weight_sf": (t["b12x.w2_sf" if baked else "w2_sf"], g.hidden, g.intermediate_padded),
    }
    for key, (sf, m, k) in sources.items():
        e, rp, cp = sf.shape
        theirs = convert_sf_to_mma_layout(sf.view(e * rp, cp), m=m, k=k, num_groups=e)
        mine = args[key]
        assert mine.shape == theirs.shape and mine.stride() == theirs.stride()
        assert mine.data_ptr() == theirs.data_ptr() and shares_storage(mine, moe)
        assert mine.dtype == torch.float8_e4m3fn and torch.equal(
            mine.view(torch.uint8), theirs.view(torch.uint8)
        )
    assert ("input_global_scale" in args) == (not baked)
    for key in ("w1_weight", "w2_weight", "w1_alpha", "w2_alpha", "fc2_input_scale"):
        assert shares_storage(args[key], moe)
    assert args["w1_alpha"].shape == args["w2_alpha"].shape == (g.num_experts,)
    views = moe_dispatch._get_weight_views(
        args["w1_weight"],
        args["w1_weight_sf"],
        args["w2_weight"],
        args["w2_weight_sf"],
        args["w1_alpha"],
        args["w2_alpha"],
        n=g.intermediate_padded,
        k=g.hidden,
    )
    e = g.num_experts
    assert torch.equal(
        views._w13_sf_storage.view(torch.uint8).reshape(e, -1),
        sources["w1_weight_sf"][0].view(torch.uint8).reshape(e, -1),
    )
    assert torch.equal(views.w1_alpha, args["w1_alpha"])
    # FlashInfer turns the 6-D views back into contiguous scales: with our views that is the
    # artifact's own memory, not a per-layer copy.
    assert views._w13_sf_storage.data_ptr() == args["w1_weight_sf"].data_ptr()
    assert views._down_sf_storage.data_ptr() == args["w2_weight_sf"].data_ptr()


@pytest.mark.parametrize("case", CASES)
def test_b12x_wrapper_signatures(by_mode, case) -> None:
    """The wrapper config and run arguments bind to the installed FlashInfer's signatures."""
    moe = first_layer(by_mode[case])
    config = moe.b12x_wrapper_config()
    assert config["intermediate_size"] == moe.spec.geometry.intermediate_padded
    assert config["max_num_tokens"] == moe.threshold - 1 and config["use_cuda_graph"]
    inspect.signature(flashinfer.B12xMoEWrapper.__init__).bind(None, **config)
    inspect.signature(flashinfer.B12xMoEWrapper.run).bind(
        None,
        x=None,
        token_selected_experts=None,
        token_final_scales=None,
        **moe.b12x_arguments(),
    )


class _Recorder:
    """Stands in for `B12xMoEWrapper`: records construction and `run` without any kernel."""

    instances: list[_Recorder] = []

    def __init__(self, **config) -> None:
        self.config, self.calls = config, []
        _Recorder.instances.append(self)

    def run(
        self,
        *,
        x,
        w1_weight,
        w1_weight_sf,
        w2_weight,
        w2_weight_sf,
        token_selected_experts,
        token_final_scales,
        w1_alpha,
        w2_alpha,
        fc2_input_scale=None,
        input_global_scale=None,
    ) -> torch.Tensor:
        self.calls.append(dict(locals()))
        return x


def test_hybrid_dispatch_passes_prepared_views(by_mode, monkeypatch) -> None:
    """On a simulated SM120 device: T < threshold calls the layer's one wrapper with the very
    tensor objects prepared at load (no conversion, no allocation); T >= threshold calls
    `cutlass_fused_moe` with the int64/int32 views. Both kernels are replaced by recorders."""
    cutlass_calls = []
    monkeypatch.setattr(flashinfer, "B12xMoEWrapper", _Recorder)
    monkeypatch.setattr(
        flashinfer.fused_moe, "cutlass_fused_moe", lambda **kw: cutlass_calls.append(kw)
    )
    _Recorder.instances.clear()
    art = load(by_mode[("gated", "shared")], device="cpu", capability=(12, 0), threshold=8)
    assert art.backend == "hybrid"
    assert len(_Recorder.instances) == len(art.moe_layers)
    moe = next(iter(art.moe_layers.values()))
    g, k = moe.spec.geometry, moe.spec.top_k
    ids = torch.zeros(4, k, dtype=torch.int32)
    weights = torch.ones(4, k)
    moe(torch.zeros(4, g.hidden, dtype=torch.bfloat16), ids, weights)
    call = moe._wrapper.calls[-1]
    for key, value in moe._b12x_args.items():
        assert call[key] is value
    assert call["input_global_scale"] is moe.tensors["b12x.input_global_scale"]
    x = torch.zeros(8, g.hidden, dtype=torch.bfloat16)
    moe(x, torch.zeros(8, k, dtype=torch.int32), torch.ones(8, k))
    (kw,) = cutlass_calls
    assert kw["fc1_expert_weights"].dtype == torch.int64 and shares_storage(
        kw["fc1_expert_weights"], moe
    )
    assert kw["activation_type"] == flashinfer.tllm_enums.ActivationType.Swiglu
    assert not moe._wrapper.calls[:-1]


# -- run-time copies: the padding table against each release's own dispatch code -------------

COPY_CASES = {
    # name: (variant, intermediate n, pad tile); hidden 128, which FlashInfer 0.7.4's W4A4
    # wrapper requires
    "n304-t128": ("super", 304, 128),  # 384: 0.7.2.x copies (n % 256), 0.7.4 does not
    "n304-t256": ("super", 304, 256),  # 512: nobody copies
    "n80-t128": ("super", 80, 128),  # 128: one 128-slice, every release copies
    "gated-n176-t128": ("gated", 176, 128),  # 256 rows a half
}


@pytest.fixture(scope="module")
def copy_artifacts(tmp_path_factory) -> dict[str, Path]:
    from moepack.convert import synthetic
    from moepack.convert.pipeline import convert_checkpoint

    root = tmp_path_factory.mktemp("copy-artifacts")
    out = {}
    for name, (variant, n, tile) in COPY_CASES.items():
        spec = synthetic.default_spec(variant, hidden=128, moe_hidden=128, intermediate=n)
        ckpt = synthetic.write_checkpoint(root / f"ckpt-{name}", spec)
        out[name] = root / name
        convert_checkpoint(ckpt, out[name], pad_tile=tile, moe_only=True, b12x_scales="shared")
    return out


class _KernelRecorder:
    """Stands in for the b12x kernel launches (`launch_sm120_static_moe`/`_dynamic_moe`):
    everything FlashInfer prepares before a launch runs as released."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kw):
        self.calls.append(kw)
        return kw["scatter_output"]


def _copied_bytes(weights: object, moe: HybridMoE) -> int:
    """Bytes of FP4/scale storage in FlashInfer's prepared views that are not the artifact's."""
    ours = moe.storage.untyped_storage().data_ptr()
    seen: dict[int, int] = {}
    for value in vars(weights).values():
        if isinstance(value, torch.Tensor) and value.dtype != torch.float32:
            storage = value.untyped_storage()
            if storage.data_ptr() != ours:
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("name", COPY_CASES)
def test_b12x_runtime_copies(copy_artifacts, name, monkeypatch, no_capture_probe) -> None:
    """The installed release's real wrapper and dispatch (kernels replaced by a recorder) copy
    exactly what `moepack.format.flashinfer` says, byte for byte, and load warned iff so."""
    import warnings

    from moepack.format.flashinfer import release, runtime_copy_bytes
    from moepack.runtime.flashinfer_env import RuntimeCopyWarning, installed_flashinfer

    rel = release(installed_flashinfer() or "")
    assert rel is not None, f"FlashInfer {installed_flashinfer()} is not in the table"
    kernels = _KernelRecorder()
    monkeypatch.setattr(moe_dispatch, "launch_sm120_static_moe", kernels)
    monkeypatch.setattr(moe_dispatch, "launch_sm120_dynamic_moe", kernels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = load(copy_artifacts[name], device="cpu", capability=(12, 0))
    warned = [w for w in caught if issubclass(w.category, RuntimeCopyWarning)]
    moe = next(iter(art.moe_layers.values()))
    g, k = moe.spec.geometry, moe.spec.top_k
    x = torch.zeros(2, g.hidden, dtype=torch.bfloat16)
    moe(x, torch.zeros(2, k, dtype=torch.int32), torch.ones(2, k))
    (call,) = kernels.calls
    expected = runtime_copy_bytes(g, rel)
    assert _copied_bytes(call["weights"], moe) == expected
    assert len(warned) == (1 if expected else 0)
    assert call["n"] == rel.copied_intermediate(g.intermediate_padded) or (
        # 0.7.4 launches at the true extent and gives only the static family the copy
        not rel.copy_free(g.intermediate_padded) and call["n"] == g.intermediate_padded
    )
