"""`HybridMoE`: one MoE layer over the loaded artifact tensors, dispatching per batch size.

Prefill chunks (`T >= threshold`) run FlashInfer's CUTLASS NVFP4 grouped GEMM, decode chunks
(`T < threshold`) the b12x SM12x kernels through one `B12xMoEWrapper` per layer, built at
construction with preallocated buffers. FlashInfer still prepares on a wrapper's first call
(alpha fold, scale views, kernel compile): after `warmup()` (one eager call per path and batch
size, also `load(..., warmup=True)`) the decode forward allocates nothing and can be captured in
a CUDA graph; FlashInfer 0.7.4 refuses first-use preparation inside a capture. Every argument handed to a kernel is a view of the layer's one buffer,
prepared once here (`cutlass_arguments`, `b12x_arguments`), so forward does no conversion.

Backends by device: SM120/SM121 `hybrid`; SM100 `cutlass` only (b12x is SM12x-only); anything
else, CPU included, `reference` (src/moepack/runtime/reference.py). Users may force one per layer (third-party
reports say some FlashInfer CUTLASS FP4 paths misbehave on SM121).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from moepack.errors import BackendError
from moepack.format import ACTIVATIONS, Geometry

from . import reference
from .flashinfer_env import check_environment
from .layout import mma_view

log = logging.getLogger("moepack.runtime")

BACKENDS = ("hybrid", "cutlass", "b12x", "reference")
Capability = tuple[int, int] | None
"""`(major, minor)` compute capability of the device, None for CPU."""


def default_backend(capability: Capability) -> str:
    """SM12x hybrid, SM100 CUTLASS, everything else the reference backend."""
    if capability is not None and capability[0] == 12:
        return "hybrid"
    if capability is not None and capability[0] == 10:
        return "cutlass"
    return "reference"


def check_backend(backend: str, capability: Capability) -> None:
    """Refuse a backend whose kernels do not exist for this device."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    major = None if capability is None else capability[0]
    if backend in ("hybrid", "b12x") and major != 12:
        raise BackendError(
            f"backend {backend!r} needs an SM120/SM121 GPU (b12x kernels); this device is "
            f"{_describe(capability)}: use 'cutlass' (SM100/SM12x) or 'reference'"
        )
    if backend == "cutlass" and major not in (10, 12):
        raise BackendError(
            f"backend 'cutlass' needs an SM100 or SM12x GPU (NVFP4 tensor cores); this device is "
            f"{_describe(capability)}: use 'reference'"
        )


def _describe(capability: Capability) -> str:
    return "a CPU" if capability is None else f"SM{capability[0]}{capability[1]}"


@dataclass(frozen=True)
class LayerSpec:
    """What a layer needs from the manifest besides its tensors."""

    layer: int
    geometry: Geometry
    top_k: int
    activation: str  # "relu2" | "silu"
    b12x_mode: str  # "baked" | "shared"


class HybridMoE(torch.nn.Module):
    """One MoE layer: `forward(x bf16 [T, H], topk_ids int32 [T, k], topk_weights fp32 [T, k])`.

    `tensors` are the views of the layer file (names as in FORMAT.md) and `storage` the one
    device buffer they share; `backend` is fixed at construction and visible as `.backend`.
    """

    def __init__(
        self,
        spec: LayerSpec,
        tensors: dict[str, torch.Tensor],
        storage: torch.Tensor,
        backend: str,
        threshold: int = 64,
        max_decode_tokens: int | None = None,
        ep_size: int = 1,
    ) -> None:
        super().__init__()
        if ep_size != 1:
            raise BackendError(
                f"expert parallelism (ep_size={ep_size}) is not supported: every rank holds all "
                "experts of a layer"
            )
        if spec.activation not in ACTIVATIONS:
            raise BackendError(
                f"layer {spec.layer}: activation {spec.activation!r} is not supported "
                f"(only {ACTIVATIONS}; the gpt-oss SwiGLU variant is rejected too)"
            )
        if spec.activation == "silu" and not spec.geometry.gated:
            raise BackendError(f"layer {spec.layer}: silu needs a gated [up; gate] w13")
        self.spec = spec
        self.tensors = tensors
        self.storage = storage
        self.backend = backend
        self.threshold = threshold
        self.max_decode_tokens = threshold - 1 if max_decode_tokens is None else max_decode_tokens
        self._paths: dict[str, reference.MoEPath] = {}
        check_environment(backend, spec.layer)
        uses_b12x = backend in ("hybrid", "b12x")
        self._b12x_args = self.b12x_arguments() if uses_b12x else {}
        self._wrapper = self._make_wrapper() if uses_b12x else None

    def extra_repr(self) -> str:
        g = self.spec.geometry
        return (
            f"layer={self.spec.layer}, backend={self.backend}, experts={g.num_experts}, "
            f"hidden={g.hidden}, intermediate={g.intermediate}->{g.intermediate_padded}, "
            f"activation={self.spec.activation}, b12x={self.spec.b12x_mode}, "
            f"threshold={self.threshold}"
        )

    # -- kernel arguments: views only, built once ------------------------------------------

    def cutlass_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `flashinfer.fused_moe.cutlass_fused_moe` besides the inputs.

        `activation_type` is left out (it needs flashinfer); see `_activation_type`.
        """
        t = self.tensors
        return {
            "fc1_expert_weights": t["w13"].view(torch.int64),
            "fc2_expert_weights": t["w2"].view(torch.int64),
            "quant_scales": [
                t["cutlass.fc1_act_global"],
                t["w13_sf"].view(torch.int32),
                t["cutlass.fc1_alpha"],
                t["cutlass.fc2_act_global"],
                t["w2_sf"].view(torch.int32),
                t["cutlass.fc2_alpha"],
            ],
        }

    def b12x_arguments(self) -> dict[str, Any]:
        """Weight and scale arguments of `B12xMoEWrapper.run` for the manifest's scale mode."""
        t = self.tensors
        baked = self.spec.b12x_mode == "baked"
        sf13 = t["b12x.w13_sf"] if baked else t["w13_sf"]
        sf2 = t["b12x.w2_sf"] if baked else t["w2_sf"]
        args: dict[str, Any] = {
            "w1_weight": t["w13"],
            "w1_weight_sf": mma_view(sf13),
            "w2_weight": t["w2"],
            "w2_weight_sf": mma_view(sf2),
            "w1_alpha": t["b12x.w1_alpha"],
            "w2_alpha": t["b12x.w2_alpha"],
            "fc2_input_scale": t["b12x.fc2_input_scale"],
        }
        if not baked:
            args["input_global_scale"] = t["b12x.input_global_scale"]
        return args

    def b12x_wrapper_config(self) -> dict[str, Any]:
        """Constructor arguments of this layer's `B12xMoEWrapper` (intermediate = padded n)."""
        g = self.spec.geometry
        return {
            "num_experts": g.num_experts,
            "top_k": self.spec.top_k,
            "hidden_size": g.hidden,
            "intermediate_size": g.intermediate_padded,
            "use_cuda_graph": True,
            "max_num_tokens": self.max_decode_tokens,
            "activation": self.spec.activation,
            "device": str(self.storage.device),
        }

    def _make_wrapper(self) -> Any:
        from flashinfer import B12xMoEWrapper

        return B12xMoEWrapper(**self.b12x_wrapper_config())

    # -- warm-up ----------------------------------------------------------------------------

    def warmup_token_counts(self) -> list[int]:
        """Default `warmup` batch sizes: 1 and `max_decode_tokens` for the b12x path (the
        smallest and largest decode batch), `threshold` for the CUTLASS path."""
        counts: set[int] = set()
        if self.backend in ("hybrid", "b12x", "reference") and self.max_decode_tokens >= 1:
            counts |= {1, self.max_decode_tokens}
        if self.backend in ("hybrid", "cutlass", "reference"):
            counts.add(self.threshold)
        return sorted(counts)

    def warmup(self, token_counts: Iterable[int] | None = None) -> list[tuple[str, int]]:
        """One eager forward per kernel path and batch size, before any CUDA-graph capture.

        FlashInfer prepares on a wrapper's first call (b12x: the folded FC1 alpha in shared
        mode, the converted scale views, any padded copy, the workspace, compiling the kernel
        its dispatch picks for that many routed rows; CUTLASS: its own first-use work). From
        0.7.4 on it refuses to do that inside a capture; 0.7.2.x would do it silently there.
        After `warmup`, a decode forward of a warmed batch size allocates nothing and may be
        captured. Pass the batch sizes you will capture (FlashInfer picks its static, dynamic or
        micro kernel by routed rows, each compiled on first use); default
        `warmup_token_counts()`. Inputs are zeros routed round-robin over the experts. Returns
        the `(path, tokens)` pairs run.
        """
        counts = self.warmup_token_counts() if token_counts is None else sorted(set(token_counts))
        g, k, dev = self.spec.geometry, self.spec.top_k, self.storage.device
        done = []
        for t in counts:
            if t < 1 or (self.backend == "b12x" and t > self.max_decode_tokens):
                raise ValueError(f"layer {self.spec.layer}: cannot warm up {t} tokens here")
            x = torch.zeros(t, g.hidden, dtype=torch.bfloat16, device=dev)
            ids = torch.arange(t * k, dtype=torch.int32, device=dev).remainder_(g.num_experts)
            weights = torch.full((t, k), 1.0 / k, dtype=torch.float32, device=dev)
            self.forward(x, ids.view(t, k), weights)
            done.append((self.route(t), t))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return done

    # -- forward ----------------------------------------------------------------------------

    def route(self, num_tokens: int) -> str:
        """Which kernel path a batch of `num_tokens` takes: 'cutlass' or 'b12x'."""
        if self.backend in ("cutlass", "b12x"):
            return self.backend
        return "cutlass" if num_tokens >= self.threshold else "b12x"

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        path = self.route(x.shape[0])
        self._check_inputs(x, topk_ids, topk_weights, path)
        if self.backend == "reference":
            return reference.moe_forward(self._reference_path(path), x, topk_ids, topk_weights)
        if path == "cutlass":
            return self._cutlass(x, topk_ids, topk_weights)
        return self._b12x(x, topk_ids, topk_weights)

    def _check_inputs(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, path: str
    ) -> None:
        """Validate without converting: a conversion here would allocate in the decode path."""
        if x.dtype == torch.uint8:
            raise BackendError(
                f"pre-quantized FP4 activations are not supported on the {path} path: pass bf16"
            )
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.spec.geometry.hidden:
            raise ValueError(
                f"x must be bf16 [T, {self.spec.geometry.hidden}], got {x.dtype} {tuple(x.shape)}"
            )
        if ids.dtype != torch.int32 or weights.dtype != torch.float32:
            raise ValueError(
                f"topk_ids must be int32 and topk_weights float32, got {ids.dtype}, {weights.dtype}"
            )
        if ids.shape != (x.shape[0], self.spec.top_k) or weights.shape != ids.shape:
            raise ValueError(
                f"routing must be [T, {self.spec.top_k}], got ids {tuple(ids.shape)}, "
                f"weights {tuple(weights.shape)}"
            )
        if path == "b12x" and self.backend != "reference" and x.shape[0] > self.max_decode_tokens:
            raise ValueError(
                f"{x.shape[0]} tokens exceed the b12x wrapper's max_num_tokens "
                f"({self.max_decode_tokens}); raise max_decode_tokens or use the hybrid backend"
            )

    def _reference_path(self, path: str) -> reference.MoEPath:
        """Reference emulation of a kernel path, built on first use (unswizzled scale copies)."""
        if path not in self._paths:
            g = self.spec.geometry
            self._paths[path] = (
                reference.cutlass_path(self.tensors, g)
                if path == "cutlass"
                else reference.b12x_path(self.tensors, g, self.spec.b12x_mode)
            )
        return self._paths[path]

    def _activation_type(self) -> Any:
        from flashinfer.tllm_enums import ActivationType

        return ActivationType.Swiglu if self.spec.geometry.gated else ActivationType.Relu2

    def _cutlass(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        from flashinfer.fused_moe import cutlass_fused_moe

        out = torch.empty_like(x)
        cutlass_fused_moe(
            input=x,
            token_selected_experts=ids,
            token_final_scales=weights,
            output_dtype=torch.bfloat16,
            activation_type=self._activation_type(),
            output=out,
            **self.cutlass_arguments(),
        )
        return out

    def _b12x(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self._wrapper is None:  # only hybrid and b12x layers build one; route() never asks
            raise BackendError(
                f"layer {self.spec.layer}: backend {self.backend!r} has no b12x path"
            )
        return self._wrapper.run(
            x=x, token_selected_experts=ids, token_final_scales=weights, **self._b12x_args
        )
