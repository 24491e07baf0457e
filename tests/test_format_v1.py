"""Format version 1 stays readable: artifacts as moepack 0.1.0 wrote them verify and load, and
the fields version 2 added are required only of version-2 manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moepack.format.flashinfer import copy_free_releases
from moepack.runtime.loader import load
from moepack.runtime.verify import verify_artifact

DATA = Path(__file__).resolve().parent / "data"
GOLDEN_V1 = DATA / "golden-v1"
CASES = sorted(p.name for p in GOLDEN_V1.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES)
def test_version_1_golden_artifacts_verify_and_load(case: str) -> None:
    """moepack 0.1.0's own output (no sha256 chains, no `flashinfer_copy_free`) verifies and
    loads; the copy-free releases are derived from the padded size."""
    art = GOLDEN_V1 / case / "artifact"
    raw = json.loads((art / "manifest.json").read_text())
    assert raw["format_version"] == 1 and "flashinfer_copy_free" not in raw["kernel_abi"]
    report = verify_artifact(art)
    assert report.exit_code == 0, report.format_text()
    loaded = load(art, device="cpu", backend="reference")
    assert loaded.manifest.format_version == 1 and loaded.moe_layers
    n_p = raw["model"]["intermediate_size_padded"]
    assert loaded.manifest.kernel_abi.flashinfer_copy_free == copy_free_releases(n_p)


def _without_copy_free(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["kernel_abi"]["flashinfer_copy_free"]
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def test_version_2_must_record_copy_free_releases(tmp_path: Path) -> None:
    """Only version 1 may omit `flashinfer_copy_free`: a version-2 manifest without it is refused
    by verify and by load alike, naming the key."""
    art = _without_copy_free(DATA / "golden" / "relu2-baked" / "artifact", tmp_path / "v2")
    report = verify_artifact(art, quick=True)
    assert report.exit_code == 2 and "flashinfer_copy_free" in report.format_text()
    with pytest.raises(ValueError, match="flashinfer_copy_free"):
        load(art, device="cpu", verify=False)
