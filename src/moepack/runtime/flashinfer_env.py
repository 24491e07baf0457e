"""The installed FlashInfer, as far as the runtime must know it before a kernel runs.

`copy_warning` says, with the numbers, when the installed release would copy an artifact's
weights at run time (the rule of each release is in `moepack.format.flashinfer`);
`check_environment` refuses the FlashInfer backends while a FlashInfer environment variable
that changes how the stored scales are read is set.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from collections.abc import Mapping

from moepack.errors import CompatibilityError
from moepack.format import Manifest
from moepack.format.flashinfer import release, runtime_copy_bytes

log = logging.getLogger("moepack.runtime")

B12X_BACKENDS = frozenset({"hybrid", "b12x"})


class RuntimeCopyWarning(UserWarning):
    """The installed FlashInfer will copy the artifact's weights at run time."""


def installed_flashinfer() -> str | None:
    """The installed flashinfer-python version (from its metadata, without importing it)."""
    try:
        return importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def copy_warning(manifest: Manifest, num_layers: int, version: str | None) -> str | None:
    """Why, and how much, FlashInfer `version`'s b12x path copies `num_layers` layers of this
    artifact on their first call; None when it uses them as stored (or is not a checked release)."""
    if version is None:
        return None
    rel = release(version)
    if rel is None:
        log.info(
            "FlashInfer %s is not a release moepack has checked (%s); whether its b12x path "
            "copies weights at run time is unknown",
            version,
            ", ".join(manifest.kernel_abi.flashinfer_copy_free) or "none",
        )
        return None
    geo = manifest.geometry
    per_layer = runtime_copy_bytes(geo, rel)
    if not per_layer:
        return None
    n_p = geo.intermediate_padded
    free = ", ".join(manifest.kernel_abi.flashinfer_copy_free) or "none of the checked releases"
    return (
        f"FlashInfer {version}'s b12x path copies each MoE layer's weights and scales at run "
        f"time: intermediate_size_padded={n_p} (pad_tile {manifest.kernel_abi.pad_tile}) is "
        f"padded again to {rel.copied_intermediate(n_p)} ({rel.where}). That is "
        f"{per_layer} bytes ({_size(per_layer)}) per layer, {per_layer * num_layers} bytes "
        f"({_size(per_layer * num_layers)}) for the {num_layers} loaded layers, on top of the "
        f"artifact's own memory, allocated on each layer's first b12x call. The artifact is "
        f"used as stored by FlashInfer {free}; or reconvert with `moepack convert --pad-tile "
        f"{rel.tile}`."
    )


def warn_runtime_copies(manifest: Manifest, backends: Mapping[int, str]) -> str | None:
    """Warn (`RuntimeCopyWarning`, and the log) when the installed FlashInfer would copy the
    layers whose backend runs b12x (`backends`: layer -> backend)."""
    count = sum(1 for b in backends.values() if b in B12X_BACKENDS)
    if not count:
        return None
    message = copy_warning(manifest, count, installed_flashinfer())
    if message:
        log.warning("moepack: %s", message)
        warnings.warn(message, RuntimeCopyWarning, stacklevel=3)
    return message


# -- environment variables that change how FlashInfer reads the stored scales -----------------

REFUSED_ENV = {
    "FLASHINFER_B12X_FORCE_MOE_W4A16": (
        "makes FlashInfer's b12x dispatch treat every NVFP4 MoE as W4A16 (bf16 activations, "
        "its own weight preparation; moe_dispatch._normalize_quant_mode), so the artifact's "
        "W4A4 scales and alphas would be read as something else"
    ),
    "FLASHINFER_NVFP4_4OVER6": (
        "switches the NVFP4 activation quantization inside FlashInfer's CUTLASS fused MoE to "
        "the 4over6 recipe (read by cutlass_fused_moe_kernels.cuh; the b12x kernels ignore it), "
        "so the prefill path would quantize against scales made for the standard recipe and "
        "disagree with the decode path"
    ),
}
"""FlashInfer acts on each only when it is exactly "1" (`os.environ.get(name, "0") == "1"` in
moe_dispatch.py; `env_flag_enabled` / `getBoolEnv` for 4over6), in 0.7.2.x and 0.7.4 alike."""


def refused_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `REFUSED_ENV` that FlashInfer would act on, with what they change."""
    env = os.environ if environ is None else environ
    return {name: why for name, why in REFUSED_ENV.items() if env.get(name) == "1"}


def check_environment(backend: str, layer: int | None = None) -> None:
    """Refuse to build a FlashInfer kernel path while a variable that changes how the stored
    scales are read is set."""
    if backend == "reference":
        return
    found = refused_environment()
    if found:
        where = "" if layer is None else f"layer {layer}: "
        raise CompatibilityError(
            f"{where}refusing the {backend!r} backend: "
            + "; ".join(f"{name}=1 {why}" for name, why in found.items())
            + ". Unset it for moepack, or use backend='reference'."
        )
