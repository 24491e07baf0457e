"""The `moepack` load format: vLLM's default loader for `ARTIFACT/model`, plus the MoE layer files.

`vllm serve ARTIFACT/model --load-format moepack --quantization moepack`:

1. Before any weight is read, `moepack.runtime.load(ARTIFACT)` checks `ARTIFACT/manifest.json`
   (format version, target SM against the device, backends, the FlashInfer the kernels need, every
   layer file's header; every byte too with `verify`) and reads each MoE layer file into one
   device allocation whose tensors are views.
2. Each artifact layer's source prefix goes through the model's `hf_to_vllm_mapper`
   (`backbone.layers.1.mixer.experts` -> `model.layers.1.mixer.experts` on Nemotron-H) and
   is joined to the `MoepackMoEMethod` of that vLLM layer; any layer left over on either side is
   an error.
3. vLLM's default loader then reads the non-expert shards of `ARTIFACT/model` as usual.

Options (`--model-loader-extra-config '{"verify": true}'`, or `model_loader_extra_config=` of
`vllm.LLM`): `verify` (bool, check every byte against the manifest first), `backend`
("hybrid" | "cutlass" | "b12x" | "reference", default by device), `threshold` (tokens from which
a batch runs CUTLASS instead of b12x, default 64), `artifact` (the artifact directory, default
the parent of the model directory). Other keys go to vLLM's default loader.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

import moepack.runtime
from moepack.errors import UsageError

from .moe_method import MoepackLayerError, MoepackMoEMethod
from .versions import check_version

log = logging.getLogger("vllm.moepack")

NAME = "moepack"
MANIFEST = "manifest.json"
OPTIONS: dict[str, type] = {"verify": bool, "backend": str, "threshold": int, "artifact": str}


class MoepackLoadError(UsageError):
    """The artifact cannot be loaded into this vLLM model; the message says what to change."""


def artifact_root(model_dir: str | Path, override: str | None = None) -> Path:
    """The artifact directory of `ARTIFACT/model` (or `override`), refused without a manifest."""
    root = Path(override) if override else Path(model_dir).resolve().parent
    if not (root / MANIFEST).is_file():
        raise MoepackLoadError(
            f"{root / MANIFEST} not found: --load-format moepack serves ARTIFACT/model of a "
            f"moepack artifact (`moepack convert ... -o ARTIFACT`), got model {model_dir}"
        )
    return root


def map_prefix(mapper: Any, name: str) -> str | None:
    """A checkpoint module name as the vLLM model names it (None: dropped by the mapper)."""
    return name if mapper is None else mapper.map_name(name)


def moepack_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, MoepackMoEMethod]]:
    """vLLM prefix -> (RoutedExperts layer, its MoepackMoEMethod), for every such layer."""
    found = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, MoepackMoEMethod):
            found[method.prefix] = (module, method)
    return found


class MoepackModelLoader(DefaultModelLoader):
    """vLLM's default loader, preceded by the artifact's MoE layers (views, one buffer a layer)."""

    def __init__(self, load_config: Any) -> None:
        check_version()
        extra = dict(load_config.model_loader_extra_config or {})
        self.options: dict[str, Any] = {}
        for key, kind in OPTIONS.items():
            if key in extra:
                value = extra.pop(key)
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise MoepackLoadError(
                        f"model_loader_extra_config[{key!r}] must be {kind.__name__}, got {value!r}"
                    )
                self.options[key] = value
        # The default loader knows safetensors, not "moepack", and rejects unknown extra keys.
        inner = dataclasses.replace(
            load_config, load_format="safetensors", model_loader_extra_config=extra
        )
        super().__init__(inner)
        self.artifact: moepack.runtime.Artifact | None = None

    def download_model(self, model_config: Any) -> None:
        artifact_root(model_config.model, self.options.get("artifact"))
        super().download_model(model_config)

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        root = artifact_root(model_config.model, self.options.get("artifact"))
        layers = moepack_layers(model)
        if model_config.quantization != NAME or not layers:
            raise MoepackLoadError(
                f"--load-format moepack needs --quantization moepack (got "
                f"{model_config.quantization!r}, {len(layers)} moepack MoE layers in the model)"
            )
        start = time.perf_counter()
        art = moepack.runtime.load(
            root,
            device=next(iter(layers.values()))[1].device,
            verify=bool(self.options.get("verify", False)),
            backend=self.options.get("backend"),
            threshold=int(self.options.get("threshold", 64)),
        )
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        by_prefix: dict[str, int] = {}
        for rec in art.manifest.layers:
            name = map_prefix(mapper, rec.source_prefix)
            if name is not None:
                by_prefix[name] = rec.layer
        missing, extra = sorted(set(layers) - set(by_prefix)), sorted(set(by_prefix) - set(layers))
        if missing or extra:
            raise MoepackLayerError(
                f"{root}: artifact MoE layers {sorted(by_prefix)} do not match the model's "
                f"{sorted(layers)} (model layers without artifact layer: {missing}; artifact "
                f"layers without model layer: {extra})"
            )
        for prefix, (layer, method) in layers.items():
            method.install(layer, art.moe_layers[by_prefix[prefix]])
        self.artifact = art
        model.moepack_artifact = art  # type: ignore[assignment]  # for inspection and tests
        backends = sorted({m.backend for m in art.moe_layers.values()})
        log.info(
            "moepack: %d MoE layers from %s on %s, backend %s, b12x scales %s, %.3f GiB in "
            "%.2f s (one allocation a layer, views installed, nothing converted)",
            len(layers),
            root,
            art.device,
            "/".join(backends),
            art.manifest.b12x_scale_mode,
            art.nbytes / 2**30,
            time.perf_counter() - start,
        )
        if art.device.type == "cuda" and torch.cuda.get_device_properties(art.device).is_integrated:
            # vLLM's profiler sees these bytes (psutil `available` drops), torch's allocator not.
            log.info(
                "moepack: unified memory: the %.2f GiB of MoE layers are pinned host memory; "
                "vLLM counts them as consumed when sizing the KV cache, but not in its "
                "'Model loading took' figure",
                art.nbytes / 2**30,
            )
        super().load_weights(model, model_config)
