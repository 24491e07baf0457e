"""The `moepack` quantization config: vLLM's ModelOpt config, with NVFP4 routed experts taken over.

`--quantization moepack` on a ModelOpt NVFP4 (or MIXED_PRECISION) checkpoint builds vLLM's own
ModelOpt config from the checkpoint's `quantization_config` and wraps it. Every layer keeps
vLLM's ModelOpt method (linears, latent projections, shared experts, attention / KV cache)
except routed-expert layers that ModelOpt quantizes as NVFP4, which get `MoepackMoEMethod`.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.modelopt import (
    ModelOptMixedPrecisionConfig,
    ModelOptNvFp4Config,
    ModelOptQuantConfigBase,
)

from .moe_method import MoepackMoEMethod
from .versions import check_version

NAME = "moepack"
ALGOS = {"NVFP4": ModelOptNvFp4Config, "MIXED_PRECISION": ModelOptMixedPrecisionConfig}
"""Checkpoint quant_algo -> the vLLM ModelOpt config that serves its other layers."""


def modelopt_algo(hf_quant_cfg: dict[str, Any] | None) -> str | None:
    """The ModelOpt quant_algo of a checkpoint's quantization config, upper-cased (or None)."""
    if not hf_quant_cfg or not str(hf_quant_cfg.get("quant_method", "")).startswith("modelopt"):
        return None
    inner = hf_quant_cfg.get("quantization", hf_quant_cfg)
    return str(inner.get("quant_algo", "")).upper() if isinstance(inner, dict) else None


class MoepackConfig(QuantizationConfig):
    """`--quantization moepack`: composed over (never replacing) vLLM's ModelOpt config."""

    def __init__(self, inner: ModelOptQuantConfigBase) -> None:
        super().__init__()
        self.inner = inner
        # Models write their fused-module mapping into the config they are given; the inner
        # ModelOpt config must see it, so both share one dict.
        self.packed_modules_mapping = inner.packed_modules_mapping

    # -- identity ----------------------------------------------------------------------------

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return ModelOptNvFp4Config.get_min_capability()

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["hf_quant_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoepackConfig:
        check_version()
        algo = modelopt_algo({"quant_method": "modelopt", **config})
        if algo not in ALGOS:
            raise ValueError(
                f"--quantization moepack serves ModelOpt {sorted(ALGOS)} checkpoints; this one "
                f"declares quant_algo {algo!r}"
            )
        return cls(ALGOS[algo].from_config(config))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Let `--quantization moepack` win over the checkpoint's `quant_method: modelopt`;
        without it, ModelOpt checkpoints load exactly as before."""
        if user_quant == NAME and modelopt_algo(hf_quant_cfg) in ALGOS:
            return NAME
        return None

    # -- per layer ---------------------------------------------------------------------------

    def is_nvfp4_experts(self, prefix: str) -> bool:
        """Whether vLLM's ModelOpt config would serve these routed experts as NVFP4."""
        inner = self.inner
        if inner.is_layer_excluded(prefix):
            return False
        if isinstance(inner, ModelOptMixedPrecisionConfig):
            return inner._resolve_quant_algo(prefix) == "NVFP4"
        return getattr(inner, "quant_method", None) == "NVFP4"

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, RoutedExperts) and self.is_nvfp4_experts(prefix):
            return MoepackMoEMethod(layer.moe_config, prefix)
        return self.inner.get_quant_method(layer, prefix)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        self.inner.apply_vllm_mapper(hf_to_vllm_mapper)

    def __getattr__(self, name: str) -> Any:
        # Attributes vLLM reads off the checkpoint's config (kv_cache_quant_algo, group_size,
        # exclude_modules, ...) come from the ModelOpt config underneath.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
