"""One source object: a conversion reads config.json, the quant config and the index once, and a
hub source downloads each file once; `verify --source` reads a hub repo through the same object."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub

from moepack.convert import checkpoint, source
from moepack.convert.crosscheck import crosscheck
from moepack.convert.pipeline import convert_checkpoint
from moepack.convert.source import open_source
from moepack.errors import SourceError, UnsupportedModel

CONFIGS = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each JSON file of the checkpoint is parsed, wherever it is parsed."""
    seen: Counter[str] = Counter()
    original: Callable[[Path], dict[str, Any]] = checkpoint.read_json

    def counting(path: Path) -> dict[str, Any]:
        seen[Path(path).name] += 1
        return original(path)

    monkeypatch.setattr(checkpoint, "read_json", counting)
    monkeypatch.setattr(source, "read_json", counting)
    return seen


def test_local_conversion_reads_each_config_once(
    checkpoints: dict[str, Path], tmp_path: Path, reads: Counter[str]
) -> None:
    convert_checkpoint(checkpoints["super"], tmp_path / "art")
    assert {name: reads[name] for name in CONFIGS} == dict.fromkeys(CONFIGS, 1)


@pytest.mark.usefixtures("isolated_hf")
def test_hub_conversion_reads_and_downloads_each_file_once(
    checkpoints: dict[str, Path], tmp_path: Path, reads: Counter[str]
) -> None:
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        convert_checkpoint(
            "acme/super",
            tmp_path / "art",
            endpoint=hub.endpoint,
            cache_dir=tmp_path / "cache",
            token=False,
        )
        resolves = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
        gets = Counter(r.path.rsplit("/", 1)[-1] for r in resolves if r.range is None)
        # Besides the one download of each file: one ranged read of each shard's header
        # (planning needs them before the shards are there), never more than its first bytes.
        ranged = Counter(r.path.rsplit("/", 1)[-1] for r in resolves if r.range is not None)
        assert all(
            r.range == f"bytes=0-{source.HEAD_READ - 1}" for r in resolves if r.range is not None
        )
    assert {name: reads[name] for name in CONFIGS} == dict.fromkeys(CONFIGS, 1)
    assert gets and max(gets.values()) == 1, gets
    assert set(ranged) == {n for n in gets if n.endswith(".safetensors")}, ranged
    assert max(ranged.values()) == 1, ranged


@pytest.mark.usefixtures("isolated_hf")
def test_verify_source_reads_a_hub_repo_at_the_artifacts_commit(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        hub_args = {"endpoint": hub.endpoint, "cache_dir": tmp_path / "cache", "token": False}
        art = tmp_path / "art"
        convert_checkpoint("acme/super", art, **hub_args)
        src = open_source("acme/super", None, **hub_args)
        assert src.kind == "hub" and src.repo is not None
        assert crosscheck(art, "acme/super", sample=1, hub=hub_args) == []


def test_source_refusals(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="absent: no such directory"):
        open_source(str(tmp_path / "absent"))
    with pytest.raises(SourceError, match="not a recipe alias"):
        open_source("no-such-alias")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"hidden_act": "gelu"}')
    with pytest.raises(UnsupportedModel, match="gelu"):
        open_source(str(bad))
    src = open_source(str(checkpoints["super"]))
    assert src.kind == "local" and [m.layer for m in src.moe_layers]
    assert set(src.files(moe_only=True)) < set(src.files(moe_only=False))
