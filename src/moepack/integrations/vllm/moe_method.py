"""`MoepackMoEMethod`: vLLM's routed-expert hook, running a preloaded `moepack.runtime.HybridMoE`.

vLLM builds each `RoutedExperts` layer by asking its quantization method to `create_weights`,
fills them from the checkpoint, then calls `process_weights_after_loading` (where vLLM's own
ModelOpt method stacks, pads and swizzles) and finally `apply(x, topk_weights, topk_ids)`.
Here:

- `create_weights` registers the usual parameter names as empty placeholders: nothing of the
  checkpoint's shape is allocated, so the transient growth of a conversion never happens.
- the `moepack` load format (`loader.py`) calls `install`, which replaces the four weight and
  block-scale placeholders by views of the layer's one buffer and keeps the `HybridMoE`;
- `process_weights_after_loading` converts nothing: it only checks that `install` happened;
- `apply` hands vLLM's `(x bf16 [T, H], topk_ids int32 [T, k], topk_weights fp32 [T, k])` to
  `HybridMoE.forward` unchanged.

The router, the routed scaling factor, latent projections and shared experts stay vLLM's (the
runner around this method runs them). vLLM's own `ModelOptNvFp4FusedMoE` is never constructed:
its constructor selects a kernel backend and raises where none fits (CPU, or SM12x without one).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from moepack.errors import CompatibilityError
from moepack.runtime.hybrid import HybridMoE

log = logging.getLogger("vllm.moepack")

PLACEHOLDERS: dict[str, torch.dtype] = {
    "w13_weight": torch.uint8,
    "w2_weight": torch.uint8,
    "w13_weight_scale": torch.float8_e4m3fn,
    "w2_weight_scale": torch.float8_e4m3fn,
    "w13_weight_scale_2": torch.float32,
    "w2_weight_scale_2": torch.float32,
    "w13_input_scale": torch.float32,
    "w2_input_scale": torch.float32,
}
"""vLLM's ModelOpt NVFP4 MoE parameter names, registered empty so name lookups keep working."""

VIEWS = {
    "w13_weight": "w13",
    "w2_weight": "w2",
    "w13_weight_scale": "w13_sf",
    "w2_weight_scale": "w2_sf",
}
"""Placeholders that `install` replaces by views of the artifact tensors of the same meaning
(kernel layout: padded, `[up; gate]`, 128x4-swizzled scales). The per-expert scalars have no
one-to-one artifact tensor (the artifact stores the kernels' folded alphas) and stay empty."""

ACTIVATIONS = {"silu": "silu", "relu2_no_mul": "relu2"}
"""vLLM `MoEActivation` value -> moepack manifest activation."""


class MoepackLayerError(CompatibilityError):
    """A routed-expert layer and its artifact layer do not fit together, or were never joined."""


def _placeholder(dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)


class MoepackMoEMethod(FusedMoEMethodBase):
    """Routed experts of one layer, served by the artifact's `HybridMoE` (TP = EP = 1 only)."""

    supports_pre_processed_weights = True

    def __init__(self, moe_config: Any, prefix: str) -> None:
        super().__init__(moe_config)
        self.prefix = prefix
        par = moe_config.moe_parallel_config
        tp, ep, dp = int(par.tp_size), int(par.ep_size), int(par.dp_size)
        if tp > 1 or ep > 1:
            raise MoepackLayerError(
                f"{prefix}: moepack serves tensor_parallel_size = 1 and no expert parallelism "
                f"only (got TP={tp}, EP={ep}, DP={dp}): an artifact layer holds all experts and "
                "pre-sharded artifacts do not exist yet. Run with --tensor-parallel-size 1 and "
                "without --enable-expert-parallel."
            )
        act = moe_config.activation.value
        if act not in ACTIVATIONS:
            raise MoepackLayerError(
                f"{prefix}: MoE activation {act!r} is not supported by moepack "
                f"(only {sorted(ACTIVATIONS)}: SwiGLU and relu2)"
            )
        self.activation = ACTIVATIONS[act]
        self.moe_module: HybridMoE | None = None
        self.geometry: dict[str, int] = {}
        self.device = torch.device("cpu")

    # -- vLLM hooks --------------------------------------------------------------------------

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Empty placeholders only: the expected geometry is remembered for `install`."""
        self.geometry = {
            "num_experts": int(num_experts),
            "hidden": int(hidden_size),
            "intermediate": int(intermediate_size_per_partition),
            "top_k": int(self.moe.experts_per_token),
        }
        for name, dtype in PLACEHOLDERS.items():
            param = _placeholder(dtype)  # on vLLM's load device (its default-device context)
            layer.register_parameter(name, param)
        self.device = param.device

    def install(self, layer: torch.nn.Module, moe: HybridMoE) -> None:
        """Join this layer to its artifact layer: geometry checked, views installed, no copy."""
        spec = moe.spec
        found = {
            "num_experts": spec.geometry.num_experts,
            "hidden": spec.geometry.hidden,
            "intermediate": spec.geometry.intermediate,
            "top_k": spec.top_k,
        }
        if found != self.geometry or spec.activation != self.activation:
            raise MoepackLayerError(
                f"{self.prefix}: the artifact's layer {spec.layer} has {found} "
                f"activation={spec.activation}, the model expects {self.geometry} "
                f"activation={self.activation}: the artifact was converted from another model"
            )
        for name, tensor_name in VIEWS.items():
            param = torch.nn.Parameter(moe.tensors[tensor_name], requires_grad=False)
            layer.register_parameter(name, param)
        self.moe_module = moe

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Nothing to convert (the artifact is in kernel format); refuse a layer left empty."""
        if self.moe_module is None:
            raise MoepackLayerError(
                f"{self.prefix}: no moepack artifact layer was installed. Load with "
                "--load-format moepack (vllm.LLM(..., load_format='moepack')) from ARTIFACT/model."
            )
        log.info("moepack: %s -> %s", self.prefix, self.moe_module.extra_repr())

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        """No vLLM modular kernel runs this layer, so there is no kernel quant config."""
        return None

    @property
    def topk_indices_dtype(self) -> torch.dtype:
        """HybridMoE (and both SM12x kernels) take int32 expert ids."""
        return torch.int32

    @property
    def method_name(self) -> str:
        return "moepack"

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any,
        shared_experts_input: torch.Tensor | None,
    ) -> torch.Tensor:
        """Routed experts only; vLLM's runner runs the shared experts itself."""
        moe = self.moe_module
        if moe is None:
            raise MoepackLayerError(f"{self.prefix}: forward before the artifact was installed")
        return moe(x, topk_ids, topk_weights)
