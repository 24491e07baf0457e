"""The one validator: `load` refuses every defect `verify --quick` refuses, with the same exit
code, and never with a bare KeyError; the typed manifest round-trips what the writer writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ARTIFACTS
from test_integrity import HOSTILE, LAYER, UNUSABLE, _mutate, _plant, _with_header, record

from moepack.errors import ManifestError, MoepackError, VerificationError
from moepack.format import Manifest, read_manifest, validate_artifact
from moepack.runtime import load
from moepack.runtime.verify import verify_artifact


def _copy(artifacts: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifacts["super"], tmp_path / "art", symlinks=True))


def _scalar_as_vector(root: Path) -> None:
    """A 0-d scale stored as `[1]`: same bytes and offsets, manifest kept in step."""
    _plant(root, LAYER, _with_header(root, lambda h: h["cutlass.fc1_act_global"].update(shape=[1])))


def _move_out(rel: str) -> Callable[[Path, Path], None]:
    def apply(root: Path, outside: Path) -> None:
        shutil.move(root / rel, outside / "moved")
        (root / rel).symlink_to(outside / "moved")

    return apply


def _edit_listing(m: dict[str, Any]) -> None:
    tensors = record(m, LAYER)["tensors"]
    tensors["w2"]["dtype"] = "I8"
    tensors["ghost"] = tensors.pop("cutlass.fc1_alpha")


DEFECTS: dict[str, Callable[[Path, Path], None]] = {
    **{f"manifest {k}": (lambda root, _o, f=f: f(root)) for k, f in UNUSABLE.items()},
    **{
        f"header {k}": (lambda root, _o, k=k: _plant(root, LAYER, HOSTILE[k](root)))
        for k in HOSTILE
    },
    "num_experts as string": lambda r, _o: _mutate(lambda m: m["model"].update(num_experts="4"))(r),
    "top_k missing": lambda r, _o: _mutate(lambda m: m["model"].pop("top_k"))(r),
    "target missing": lambda r, _o: _mutate(lambda m: m.pop("target"))(r),
    "layers missing": lambda r, _o: _mutate(lambda m: m.pop("layers"))(r),
    "gated as string": lambda r, _o: _mutate(lambda m: m["model"].update(gated="yes"))(r),
    "[1]-shaped scalar": lambda r, _o: _scalar_as_vector(r),
    "wrong tensor listing": lambda r, _o: _mutate(_edit_listing)(r),
    "truncated layer": lambda r, _o: (r / LAYER).write_bytes((r / LAYER).read_bytes()[:-1]),
    "truncated shard": lambda r, _o: (r / "model/model-00001-of-00003.safetensors").write_bytes(
        b"\0" * 8
    ),
    "deleted layer": lambda r, _o: (r / LAYER).unlink(),
    "renamed layer": lambda r, _o: (r / LAYER).rename(r / "moe/layer-00002.safetensors"),
    "extra file": lambda r, _o: (r / "model/notes.txt").write_text("x"),
    "leftover": lambda r, _o: (r / "moe/layer-00005.safetensors.moepack-tmp").write_text("x"),
    "directory for a file": lambda r, _o: ((r / LAYER).unlink(), (r / LAYER).mkdir()),
    "symlinked layer escaping": _move_out(LAYER),
    "symlinked directory escaping": _move_out("moe"),
    "symlinked manifest escaping": _move_out("manifest.json"),
}


@pytest.mark.parametrize("defect", DEFECTS, ids=list(DEFECTS))
def test_load_refuses_what_verify_quick_refuses(
    artifacts: dict[str, Path], tmp_path: Path, defect: str
) -> None:
    root = _copy(artifacts, tmp_path)
    (tmp_path / "outside").mkdir()
    DEFECTS[defect](root, tmp_path / "outside")
    report = verify_artifact(root, quick=True)
    assert report.exit_code in (1, 2), report.format_text()
    with pytest.raises(MoepackError) as refused:
        load(root, device="cpu")
    assert not isinstance(refused.value, KeyError)
    assert refused.value.exit_code == report.exit_code, str(refused.value)
    assert isinstance(refused.value, ManifestError if report.unusable else VerificationError)
    # The message names what verify names.
    named = {p.file for p in report.problems if p.file}
    assert not named or any(name in str(refused.value) for name in named), str(refused.value)


def test_hash_mismatch_is_the_only_thing_load_without_verify_skips(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    root = _copy(artifacts, tmp_path)
    _mutate(lambda m: record(m, LAYER).update(sha256="0" * 64))(root)
    assert verify_artifact(root, quick=True).exit_code == 0
    assert verify_artifact(root).exit_code == 1
    assert load(root, device="cpu").moe_layers  # bytes are not hashed without verify=True
    with pytest.raises(VerificationError):
        load(root, device="cpu", verify=True)


@pytest.mark.parametrize("variant", ARTIFACTS)
def test_typed_manifest_round_trips(artifacts: dict[str, Path], variant: str) -> None:
    raw = json.loads((artifacts[variant] / "manifest.json").read_text())
    m = read_manifest(artifacts[variant])
    assert m.to_json() == raw
    assert json.dumps(m.to_json(), indent=2) == json.dumps(raw, indent=2)  # key order too
    assert Manifest.from_json(raw) == m
    g = m.geometry
    assert (g.num_experts, g.hidden, g.intermediate) == (
        raw["model"]["num_experts"],
        raw["model"]["moe_hidden_size"],
        raw["model"]["intermediate_size"],
    )
    assert validate_artifact(artifacts[variant]).manifest == m


def test_from_json_lists_every_violation() -> None:
    with pytest.raises(ManifestError) as bad:
        Manifest.from_json({"format": "moepack", "format_version": 1, "complete": True})
    text = str(bad.value)
    assert "required key 'target' is missing" in text and "required key 'model'" in text
