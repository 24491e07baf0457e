"""`verify_artifact` and `describe` on real conversions of the synthetic checkpoints, and the
manifest schema they must follow.

The `artifacts` fixture (conftest.py) is shared with the integrity campaigns in test_integrity.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from conftest import ARTIFACTS

from moepack.runtime import verify as verify_mod
from moepack.runtime.inspect import describe, format_description
from moepack.runtime.verify import VerifyReport, schema_errors, verify_artifact

SCHEMA = json.loads(verify_mod.SCHEMA_PATH.read_text())


@pytest.fixture
def artifact(artifacts: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the super artifact that a test may damage."""
    return Path(shutil.copytree(artifacts["super"], tmp_path / "a"))


@pytest.mark.parametrize("variant", ARTIFACTS)
@pytest.mark.parametrize("quick", [False, True])
def test_good_artifact_passes(artifacts: dict[str, Path], variant: str, quick: bool) -> None:
    report = verify_artifact(artifacts[variant], quick=quick, jobs=2)
    assert report.problems == [], report.format_text()
    assert report.exit_code == 0 and not report.unusable
    files = _artifact_files(artifacts[variant])
    assert report.files_checked == len(files) >= 2
    assert report.bytes_hashed == (0 if quick else sum(f.stat().st_size for f in files))
    assert report.format_text().startswith("OK: ")


def _artifact_files(root: Path) -> list[Path]:
    return [f for f in root.rglob("*") if f.is_file() and f.name != "manifest.json"]


@pytest.mark.parametrize("variant", ARTIFACTS)
def test_manifest_validates_against_json_schema(artifacts: dict[str, Path], variant: str) -> None:
    manifest = json.loads((artifacts[variant] / "manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA)
    assert list(schema_errors(manifest, SCHEMA)) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("target"),
        lambda m: m.update(format_version=True),
        lambda m: m.update(extra=1),
        lambda m: m["files"][0].update(size=-1),
        lambda m: m["files"][0].update(sha256="A" * 64),
        lambda m: m["files"][0].update(path="../x"),
        lambda m: m["files"][0].update(path="/etc/passwd"),
        lambda m: m["files"][-1]["tensors"]["w13"].update(data_offsets=[0]),
        lambda m: m["model"].update(moe_hidden_size=72),
        lambda m: m["model"].update(gated="yes"),
        lambda m: m["kernel_abi"].update(alignment=4096.5),
        lambda m: m["layers"][0]["fidelity"].pop("b12x_max_rel_err"),
    ],
)
def test_builtin_validator_agrees_with_jsonschema(artifacts: dict[str, Path], mutate) -> None:
    manifest = json.loads((artifacts["super"] / "manifest.json").read_text())
    mutate(manifest)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, SCHEMA)
    assert list(schema_errors(manifest, SCHEMA))


def test_report_json_and_text(artifact: Path) -> None:
    (artifact / "moe" / "stray.bin").write_bytes(b"x")
    report = verify_artifact(artifact)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["exit_code"] == 1 and d["ok"] is False and not d["unusable"]
    assert d["problems"] == [
        {"file": "moe/stray.bin", "tensor": None, "message": d["problems"][0]["message"]}
    ]
    text = report.format_text()
    assert text.startswith("FAILED") and "moe/stray.bin" in text and len(text.splitlines()) == 2


def test_progress_bar_goes_to_stderr(artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify_artifact(artifact, progress=True).exit_code == 0
    assert capsys.readouterr().out == ""


def test_internal_error_becomes_a_problem(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("bug")

    monkeypatch.setattr(verify_mod, "_check_file", boom)
    report = verify_artifact(artifact)
    assert report.exit_code == 2 and "internal error" in report.problems[0].message


def test_report_exit_codes() -> None:
    report = VerifyReport(root="x", quick=False)
    assert report.exit_code == 0
    report.problems.append(verify_mod.Problem("f", None, "bad"))
    assert report.exit_code == 1
    report.unusable = True
    assert report.exit_code == 2


@pytest.mark.parametrize("variant", ARTIFACTS)
def test_describe(artifacts: dict[str, Path], checkpoints: dict[str, Path], variant: str) -> None:
    root = artifacts[variant]
    m = json.loads((root / "manifest.json").read_text())
    source, options = ARTIFACTS[variant]
    d = describe(root)
    assert json.loads(json.dumps(d)) == d
    assert d["format"] == {"name": "moepack", "version": 2}
    assert d["source"]["type"] == "local" and d["source"]["path"] == m["source"]["path"]
    assert Path(d["source"]["path"]).resolve() == checkpoints[source].resolve()
    assert d["b12x_scale_mode"] == options["b12x_scales"]
    assert d["target"] == options.get("target", "sm120")
    assert d["geometry"]["num_experts"] == m["model"]["num_experts"]
    assert d["moe_layers"]["layers"] == m["model"]["moe_layers"] and d["moe_layers"]["count"] >= 2
    files = _artifact_files(root)
    assert d["sizes"]["total"] == sum(f.stat().st_size for f in files)
    assert ("model_shard" in d["sizes"]["by_kind"]) != options.get("moe_only", False)
    moe_bytes = sum(f.stat().st_size for f in (root / "moe").iterdir())
    roles = d["sizes"]["moe_by_role"]
    assert moe_bytes - 4096 * len(m["layers"]) <= sum(roles.values()) < moe_bytes  # headers
    assert (roles["b12x_scales"] > 0) == (options["b12x_scales"] == "baked")
    worst = max(e["fidelity"]["b12x_max_rel_err"] for e in m["layers"])
    assert d["fidelity"]["b12x_max_rel_err"] == worst
    assert [x["layer"] for x in d["fidelity"]["layers"]] == m["model"]["moe_layers"]
    text = format_description(d)
    assert str(root) in text and options["b12x_scales"] in text
    assert f"n_p={m['model']['intermediate_size_padded']}" in text
    assert len(text.splitlines()) < 12


def test_not_a_directory(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path / "file"):
        (tmp_path / "file").write_text("x")
        report = verify_artifact(root)
        assert report.exit_code == 2 and "not a directory" in report.format_text()
