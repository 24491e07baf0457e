"""The vLLM plugin's pieces against the installed vLLM, without an engine: registration, the
quantization override, which layers moepack takes, refusals and the loader's options.

Skipped without vLLM, unless MOEPACK_REQUIRE_VLLM=1 (the vLLM stage) makes that a failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

if os.environ.get("MOEPACK_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from vllm.config.load import LoadConfig  # noqa: E402
from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402
from vllm.model_executor.layers.quantization import get_quantization_config  # noqa: E402
from vllm.model_executor.layers.quantization.modelopt import (  # noqa: E402
    ModelOptMixedPrecisionConfig,
    ModelOptNvFp4Config,
)
from vllm.model_executor.model_loader import get_model_loader  # noqa: E402

import moepack.integrations.vllm as plugin  # noqa: E402
from moepack.convert.synthetic_engine import config, default_engine_spec  # noqa: E402
from moepack.errors import MoepackError  # noqa: E402
from moepack.integrations.vllm.config import MoepackConfig  # noqa: E402
from moepack.integrations.vllm.loader import (  # noqa: E402
    MoepackLoadError,
    MoepackModelLoader,
    artifact_root,
)
from moepack.integrations.vllm.moe_method import MoepackLayerError, MoepackMoEMethod  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    plugin.register()
    plugin.register()  # every vLLM process may call it again


def _quant_cfg(model: str = "qwen3-moe") -> dict[str, Any]:
    return config(default_engine_spec(model))["quantization_config"]


def test_names_registered() -> None:
    assert get_quantization_config("moepack") is MoepackConfig
    loader = get_model_loader(LoadConfig(load_format="moepack"))
    assert isinstance(loader, MoepackModelLoader)


def test_override_only_when_asked() -> None:
    cfg = _quant_cfg()
    assert MoepackConfig.override_quantization_method(cfg, "moepack") == "moepack"
    # Without --quantization moepack a ModelOpt checkpoint loads as before.
    assert MoepackConfig.override_quantization_method(cfg, None) is None
    assert MoepackConfig.override_quantization_method(cfg, "modelopt_fp4") is None
    fp8 = {**cfg, "quant_algo": "FP8"}
    assert MoepackConfig.override_quantization_method(fp8, "moepack") is None


def test_composed_over_modelopt_nvfp4() -> None:
    cfg = MoepackConfig.from_config(_quant_cfg("nemotron-h"))
    assert isinstance(cfg.inner, ModelOptNvFp4Config)
    assert cfg.get_name() == "moepack"
    assert cfg.packed_modules_mapping is cfg.inner.packed_modules_mapping
    assert cfg.is_nvfp4_experts("model.layers.1.mixer.experts")
    # Everything the checkpoint leaves in BF16 stays with vLLM's ModelOpt config.
    assert not cfg.is_nvfp4_experts("model.layers.1.mixer.shared_experts")
    assert cfg.inner.is_layer_excluded("model.layers.1.mixer.fc1_latent_proj")


def test_composed_over_modelopt_mixed_precision() -> None:
    mixed = {
        "quant_method": "modelopt",
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": None,
        "quantized_layers": {
            "model.layers.1.mixer.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.1.mixer.experts.0.down_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.3.mixer.experts.0.up_proj": {"quant_algo": "FP8"},
        },
    }
    cfg = MoepackConfig.from_config(mixed)
    assert isinstance(cfg.inner, ModelOptMixedPrecisionConfig)
    assert cfg.is_nvfp4_experts("model.layers.1.mixer.experts")
    assert not cfg.is_nvfp4_experts("model.layers.3.mixer.experts")  # FP8 experts: vLLM's


def test_not_modelopt_refused() -> None:
    with pytest.raises(ValueError, match="quant_algo 'FP8'"):
        MoepackConfig.from_config({**_quant_cfg(), "quant_algo": "FP8"})


def _moe_config(tp: int = 1, ep: int = 1, act: MoEActivation = MoEActivation.SILU) -> Any:
    par = SimpleNamespace(tp_size=tp, ep_size=ep, dp_size=1)
    return SimpleNamespace(moe_parallel_config=par, activation=act, experts_per_token=2)


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 4), (2, 2)])
def test_tensor_and_expert_parallel_refused(tp: int, ep: int) -> None:
    with pytest.raises(MoepackLayerError, match="--tensor-parallel-size 1") as err:
        MoepackMoEMethod(_moe_config(tp, ep), "model.layers.0.mlp.experts")
    assert isinstance(err.value, MoepackError)


def test_other_activations_refused() -> None:
    with pytest.raises(MoepackLayerError, match="swigluoai"):
        MoepackMoEMethod(_moe_config(act=MoEActivation.SWIGLUOAI), "x.experts")
    for act in (MoEActivation.SILU, MoEActivation.RELU2_NO_MUL):
        MoepackMoEMethod(_moe_config(act=act), "x.experts")


def test_create_weights_allocates_nothing() -> None:
    import torch

    method = MoepackMoEMethod(_moe_config(), "model.layers.0.mlp.experts")
    layer = torch.nn.Module()
    method.create_weights(layer, 512, 1024, 2688, torch.bfloat16, weight_loader=None)
    params = dict(layer.named_parameters())
    assert set(params) >= {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"}
    assert all(p.numel() == 0 for p in params.values())
    with pytest.raises(MoepackLayerError, match="--load-format moepack"):
        method.process_weights_after_loading(layer)


def test_install_checks_geometry(tmp_path: Path) -> None:
    import torch

    from moepack.convert.pipeline import convert_checkpoint
    from moepack.convert.synthetic_engine import write_engine_checkpoint
    from moepack.runtime import load

    src = write_engine_checkpoint(tmp_path / "src", default_engine_spec("qwen3-moe"))
    convert_checkpoint(src, tmp_path / "art", target="sm120")
    art = load(tmp_path / "art", device="cpu")
    moe = art.moe_layers[0]
    method = MoepackMoEMethod(_moe_config(), "model.layers.0.mlp.experts")
    layer = torch.nn.Module()
    method.create_weights(layer, 8, 128, 96, torch.bfloat16)  # intermediate 96 != 80
    with pytest.raises(MoepackLayerError, match="converted from another model"):
        method.install(layer, moe)
    method.create_weights(layer, 8, 128, 80, torch.bfloat16)
    method.install(layer, moe)
    assert layer.w13_weight.data_ptr() == moe.tensors["w13"].data_ptr()
    assert layer.w2_weight_scale.data_ptr() == moe.tensors["w2_sf"].data_ptr()
    method.process_weights_after_loading(layer)  # installed: nothing to do, no error


def test_loader_options_and_refusals(tmp_path: Path) -> None:
    loader = get_model_loader(
        LoadConfig(load_format="moepack", model_loader_extra_config={"verify": True})
    )
    assert loader.options == {"verify": True}
    assert loader.load_config.load_format == "safetensors"  # what the default loader reads
    with pytest.raises(MoepackLoadError, match="must be bool"):
        get_model_loader(
            LoadConfig(load_format="moepack", model_loader_extra_config={"verify": "yes"})
        )
    (tmp_path / "model").mkdir()
    with pytest.raises(MoepackLoadError, match="manifest.json not found"):
        artifact_root(tmp_path / "model")
    (tmp_path / "manifest.json").write_text("{}")
    assert artifact_root(tmp_path / "model") == tmp_path.resolve()
