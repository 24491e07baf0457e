"""Helpers of the vLLM end-to-end tests: in-process engines, recorders and the HF reference.

Only the vLLM test files import this module (it imports vllm and transformers).

The CPU patch. vLLM's CPU build refuses non-gated MoE in `FusedMoEConfig.__post_init__`
("is_act_and_mul=False is supported only for CUDA, XPU and ROCm for now"), which would stop the
Nemotron-H (relu2) test before moepack is ever reached; on CUDA, where moepack's kernels run,
vLLM has no such check. `cpu_allows_non_gated_moe()` lifts exactly that check, test only: during
`__post_init__` alone, the module's `current_platform` answers `is_cuda_alike() -> True` (the
check is the only use of `current_platform` in `__post_init__`, checked against vLLM 0.32's
source). The MoE itself never runs through vLLM's kernels: moepack's method replaces them.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from moepack.integrations.vllm.loader import MoepackModelLoader  # noqa: E402
from moepack.integrations.vllm.moe_method import MoepackMoEMethod  # noqa: E402

ENGINE_KW: dict[str, Any] = {
    "load_format": "moepack",
    "quantization": "moepack",
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 4,
    "seed": 0,
    "kv_cache_memory_bytes": 64 << 20,
}
PROMPTS = [[5, 17, 42, 99], [7, 8, 9], [200, 3, 150, 77, 12, 31]]
MAX_TOKENS = 8


@contextlib.contextmanager
def cpu_allows_non_gated_moe() -> Iterator[None]:
    """Test-only: lift vLLM-CPU's refusal of non-gated MoE (see the module docstring)."""
    from vllm.model_executor.layers.fused_moe import config as moe_config

    original = moe_config.FusedMoEConfig.__post_init__

    class CudaAlike:
        def __init__(self, platform: Any) -> None:
            self.platform = platform

        def is_cuda_alike(self) -> bool:
            return True

        def __getattr__(self, name: str) -> Any:
            return getattr(self.platform, name)

    def post_init(self: Any) -> None:
        real = moe_config.current_platform
        moe_config.current_platform = CudaAlike(real)
        try:
            original(self)
        finally:
            moe_config.current_platform = real

    moe_config.FusedMoEConfig.__post_init__ = post_init
    try:
        yield
    finally:
        moe_config.FusedMoEConfig.__post_init__ = original


FACTORIES = {
    "empty",
    "empty_strided",
    "empty_like",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "new_empty",
    "new_empty_strided",
    "new_zeros",
    "new_ones",
    "new_full",
    "rand",
    "randn",
    "randint",
    "arange",
    "clone",
    "_to_copy",
    "empty_permuted",
}


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside, with its tensor outputs' shapes (allocations among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        shapes = [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, shapes))
        return out

    def allocations(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, s) for name, shapes in self.ops if name in FACTORIES for s in shapes]


@dataclass
class Run:
    """What one engine did: tokens, per-layer MoE calls, op records of the MoE method."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    calls: dict[str, list[tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    create_ops: list[OpRecorder] = field(default_factory=list)
    process_ops: list[OpRecorder] = field(default_factory=list)
    load_allocations: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    model_tensors: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)
    storages: dict[str, tuple[int, int]] = field(default_factory=dict)
    views: dict[str, list[int]] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)
    log: str = ""


@contextlib.contextmanager
def _patched(obj: Any, name: str, wrapper: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


def run_engine(model_dir: Path, prompts: list[list[int]] = PROMPTS) -> Run:
    """One in-process vLLM engine on `model_dir`, greedy decode, everything recorded."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    run = Run([], [])

    def record_apply(original: Any) -> Any:
        def apply(
            self: MoepackMoEMethod,
            layer: Any,
            x: torch.Tensor,
            topk_weights: Any,
            topk_ids: Any,
            *args: Any,
            **kw: Any,
        ) -> torch.Tensor:
            out = original(self, layer, x, topk_weights, topk_ids, *args, **kw)
            run.calls.setdefault(self.prefix, []).append(
                (x.clone(), topk_ids.clone(), topk_weights.clone(), out.clone())
            )
            return out

        return apply

    def record(into: list[OpRecorder]) -> Any:
        def wrap(original: Any) -> Any:
            def hooked(self: Any, *args: Any, **kw: Any) -> Any:
                with OpRecorder() as rec:
                    result = original(self, *args, **kw)
                into.append(rec)
                return result

            return hooked

        return wrap

    def record_load(original: Any) -> Any:
        def load_model(self: Any, *args: Any, **kw: Any) -> Any:
            with OpRecorder() as rec:
                model = original(self, *args, **kw)
            run.load_allocations = rec.allocations()
            _inspect(model, run)
            return model

        return load_model

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(MoepackMoEMethod, "apply", record_apply))
        stack.enter_context(_patched(MoepackMoEMethod, "create_weights", record(run.create_ops)))
        stack.enter_context(
            _patched(MoepackMoEMethod, "process_weights_after_loading", record(run.process_ops))
        )
        stack.enter_context(_patched(MoepackModelLoader, "load_model", record_load))
        llm = LLM(str(model_dir), **ENGINE_KW)
        try:
            params = SamplingParams(
                temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1
            )
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
            for o in outs:
                c = o.outputs[0]
                run.tokens.append(list(c.token_ids))
                run.logprobs.append(
                    [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
                )
        finally:
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
    return run


def _inspect(model: torch.nn.Module, run: Run) -> None:
    """Every parameter and buffer of the loaded model, and where the moepack views point."""
    art = model.moepack_artifact
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        run.model_tensors.append((name, tuple(t.shape), t.untyped_storage().data_ptr()))
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, MoepackMoEMethod):
            moe = method.moe_module
            storage = moe.storage
            run.storages[method.prefix] = (storage.data_ptr(), storage.untyped_storage().nbytes())
            run.views[method.prefix] = [
                getattr(module, n).data_ptr()
                for n in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")
            ]
            run.backends[method.prefix] = moe.backend
    assert art is not None


# -- the independent reference: HF transformers with moepack reference experts ---------------


class ReferenceExperts(torch.nn.Module):
    """An HF experts module replaced by the moepack reference of the same artifact layer."""

    def __init__(self, moe: Any) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> Any:
        x = hidden.to(torch.bfloat16).contiguous()
        y = self.moe(x, idx.to(torch.int32).contiguous(), weights.to(torch.float32).contiguous())
        return y.to(hidden.dtype)


def hf_reference_model(artifact: Path) -> torch.nn.Module:
    """The HF model of `ARTIFACT/model`, MoE experts run by moepack's reference backend loaded
    standalone, every other tensor read from the artifact's model shards (bf16, eager attention)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import moepack.runtime

    model_dir = artifact / "model"
    cfg = AutoConfig.from_pretrained(model_dir)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state |= load_file(str(model_dir / shard))
    # HF's Nemotron-H module is `model`, its checkpoints say `backbone`.
    state = {("model." + k[9:] if k.startswith("backbone.") else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, f"checkpoint tensors the HF model does not have: {unexpected}"
    assert all(".experts." in k for k in missing), f"HF tensors not in the checkpoint: {missing}"
    art = moepack.runtime.load(artifact, device="cpu")
    for rec in art.manifest.layers:
        parent, leaf = rec.source_prefix.replace("backbone.", "model.", 1).rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, ReferenceExperts(art.moe_layers[rec.layer]))
    return model.eval()


def bf16_ulp(x: float) -> float:
    """Spacing of bf16 numbers (8 significant bits) at magnitude |x|."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 2.0**-126))) - 7)


@dataclass
class Reference:
    """Greedy decode of the reference, and its logits along the engine's own tokens."""

    greedy: list[list[int]]
    greedy_margins: list[list[tuple[float, float]]]  # (top-1 minus top-2, top-1) a step
    forced_logits: list[list[torch.Tensor]]


def reference(
    model: torch.nn.Module, prompts: list[list[int]], engine: list[list[int]]
) -> Reference:
    """Greedy by full recomputation (no cache, no EOS handling, nothing shared with vLLM), and
    the reference's logits at every step of the engine's sequences (teacher forcing)."""
    ref = Reference([], [], [])
    with torch.no_grad():
        for p, eng in zip(prompts, engine, strict=True):
            ids, margins = list(p), []
            for _ in range(MAX_TOKENS):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                top = logits.topk(2).values
                margins.append((float(top[0] - top[1]), float(top[0])))
                ids.append(int(logits.argmax()))
            ref.greedy.append(ids[len(p) :])
            ref.greedy_margins.append(margins)
            logits = model(torch.tensor([list(p) + eng])).logits[0].float()
            ref.forced_logits.append([logits[len(p) - 1 + i] for i in range(len(eng))])
    return ref


def token_mismatches(ref: Reference, engine: list[list[int]]) -> list[str]:
    """Where the engine's greedy tokens disagree with the reference.

    - Along the engine's own sequence, every token must be the reference's argmax, or within two
      bf16 ulps of the reference's best logit (vLLM computes logits in bf16: a near-tie may
      break either way).
    - Where the reference's own greedy path has no near-tie (every top-2 margin above two bf16
      ulps), the engine's tokens must equal it exactly.
    """
    bad = []
    for n, (eng, forced) in enumerate(zip(engine, ref.forced_logits, strict=True)):
        for step, (tok, logits) in enumerate(zip(eng, forced, strict=True)):
            best = float(logits.max())
            if float(logits[tok]) < best - 2 * bf16_ulp(best):
                bad.append(
                    f"prompt {n} step {step}: engine token {tok} (ref logit {float(logits[tok]):.4f})"
                    f" vs reference argmax {int(logits.argmax())} ({best:.4f})"
                )
        decisive = all(gap > 2 * bf16_ulp(top) for gap, top in ref.greedy_margins[n])
        if decisive and eng != ref.greedy[n]:
            bad.append(f"prompt {n}: engine {eng} != reference greedy {ref.greedy[n]}")
    return bad
