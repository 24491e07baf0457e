"""Dependency direction, from the source: the leaf modules (`errors`, `libc`, `sizes`) import
nothing of moepack, `format` only the leaves (and no torch), `runtime` builds on `format` and
never on `convert`, engine integrations build on `runtime` (an engine loads artifacts, it does
not convert), and nothing imports `cli`. Function-level imports count too: a lazy import is
still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moepack

SRC = Path(moepack.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                out.add(node.module or "")
    return out


LEAVES = {"moepack.errors", "moepack.libc", "moepack.sizes"}


def _modules(sub: str) -> list[Path]:
    if sub:
        return sorted((SRC / sub).rglob("*.py"))
    return [SRC / f"{name.split('.')[1]}.py" for name in sorted(LEAVES)]


def _moepack_deps(path: Path) -> set[str]:
    return {".".join(m.split(".")[:2]) for m in _imports(path) if m.split(".")[0] == "moepack"} - {
        "moepack"
    }


@pytest.mark.parametrize(
    "layer,allowed",
    [
        ("", set()),
        ("format", LEAVES | {"moepack.format"}),
        ("runtime", LEAVES | {"moepack.format", "moepack.runtime"}),
        ("recipes", set()),
        ("integrations", LEAVES | {"moepack.format", "moepack.runtime", "moepack.integrations"}),
        (
            "convert",
            LEAVES | {"moepack.format", "moepack.runtime", "moepack.convert", "moepack.recipes"},
        ),
    ],
)
def test_dependency_direction(layer: str, allowed: set[str]) -> None:
    for path in _modules(layer):
        extra = _moepack_deps(path) - allowed
        assert not extra, f"{path.relative_to(SRC)} imports {sorted(extra)}"


def test_format_imports_no_heavy_package() -> None:
    heavy = {"torch", "numpy", "safetensors", "huggingface_hub", "tqdm", "click"}
    for path in _modules("format"):
        roots = {m.split(".")[0] for m in _imports(path)}
        assert not roots & heavy, f"{path.relative_to(SRC)} imports {sorted(roots & heavy)}"
