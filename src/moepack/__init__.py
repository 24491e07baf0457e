"""moepack: offline NVFP4 MoE conversion (`moepack.convert`) and zero-copy loading (`moepack.runtime`).

`moepack.format` is the torch-free artifact format, `moepack.errors` the error hierarchy. The
version is stated once, in pyproject.toml; `__version__` reads it from the installed package's
metadata on first access (importlib.metadata costs tens of milliseconds of start-up otherwise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    __version__: str

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("moepack")
        except PackageNotFoundError:  # imported from a source tree that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
