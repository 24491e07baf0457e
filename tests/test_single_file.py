"""Single-file checkpoints (one `model.safetensors`, no index): the layout ModelOpt's own export
writes for small models. They once crashed `Checkpoint.__init__` (a header read before the
header cache existed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from moepack.cli import main
from moepack.convert.checkpoint import Checkpoint
from moepack.format import read_manifest
from moepack.runtime.loader import load
from moepack.runtime.verify import verify_artifact


@pytest.fixture(scope="module")
def single(artifact_factory) -> Path:
    return artifact_factory.checkpoint("super", "single")


def test_layout_is_one_file_without_index(single: Path, checkpoints) -> None:
    assert (single / "model.safetensors").is_file()
    assert not (single / "model.safetensors.index.json").exists()
    assert not list(single.glob("model-*.safetensors"))
    ckpt = Checkpoint(single)
    assert ckpt.shards == ["model.safetensors"]
    sharded = Checkpoint(checkpoints["super"])
    assert set(ckpt.weight_map) == set(sharded.weight_map)
    name = next(n for n in ckpt.weight_map if n.endswith("experts.3.down_proj.weight"))
    assert ckpt.get(name).equal(sharded.get(name))
    ckpt.close()
    sharded.close()


def test_convert_verify_load_single_file(single: Path, tmp_path: Path, by_mode) -> None:
    out = tmp_path / "art"
    result = CliRunner().invoke(main, ["convert", str(single), "--target", "sm120", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert verify_artifact(out).exit_code == 0
    m = read_manifest(out).to_json()
    assert [f["path"] for f in m["source"]["files"] if f["path"].endswith(".safetensors")] == [
        "model.safetensors"
    ]
    assert (out / "model" / "model.safetensors").is_file()
    # Same tensors as the sharded layout: the layer files are byte-identical.
    ref = by_mode[("super", "baked")]
    for rec in m["layers"]:
        assert (out / rec["file"]).read_bytes() == (ref / rec["file"]).read_bytes()
    art = load(out, device="cpu", backend="reference")
    assert sorted(art.moe_layers) == m["model"]["moe_layers"]
