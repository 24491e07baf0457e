"""moepack inside vLLM: `vllm serve ARTIFACT/model --load-format moepack --quantization moepack`.

Installed with the `vllm` extra, whose `vllm.general_plugins` entry point calls `register()` in
every vLLM process. `register()` adds two names to vLLM and changes nothing else:

- quantization `moepack` (`config.MoepackConfig`): vLLM's ModelOpt config, except that NVFP4
  routed experts run `moepack.runtime.HybridMoE` (`moe_method.MoepackMoEMethod`);
- load format `moepack` (`loader.MoepackModelLoader`): vLLM's default loader for
  `ARTIFACT/model`, after the artifact's MoE layer files were checked and installed as views.

Scope: tensor parallel size 1 and no expert parallelism (an artifact layer holds all experts);
the vLLM versions in `versions.TESTED` (others refused at use, with the reason).
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.moepack")

QUANTIZATION = "moepack"
LOAD_FORMAT = "moepack"
_registered = False


def register() -> None:
    """vLLM plugin entry point: register the quantization config and the load format (idempotent).

    Registration never raises on an untested vLLM (that would break every vLLM start on a
    machine that merely has moepack installed); using `moepack` there is refused instead.
    """
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from .config import MoepackConfig
    from .loader import MoepackModelLoader
    from .versions import UnsupportedVLLM, check_version

    register_quantization_config(QUANTIZATION)(MoepackConfig)
    register_model_loader(LOAD_FORMAT)(MoepackModelLoader)
    _registered = True
    try:
        version = check_version()
    except UnsupportedVLLM as exc:
        log.warning("moepack plugin registered, but it will refuse to run: %s", exc)
        return
    log.info(
        "moepack plugin active (vLLM %s): --quantization %s, --load-format %s",
        version,
        QUANTIZATION,
        LOAD_FORMAT,
    )
