"""moepack runtime: verification and zero-copy loading (torch + safetensors only).

Lazy (PEP 562): `import moepack.runtime` costs nothing, and `moepack.runtime.verify` or
`moepack.runtime.inspect` run without importing torch; `load` and `Artifact` import the loader
(and torch) on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loader import Artifact, load

_LAZY = {"Artifact": "loader", "load": "loader"}

__all__ = ["Artifact", "load"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
