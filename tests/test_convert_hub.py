"""`moepack convert` through the Hub code path, against the loopback FakeHub.

The recipe alias resolves to the real Nemotron repo id, which FakeHub serves from a synthetic
checkpoint: the CLI runs exactly as a user would run it, with HF_ENDPOINT pointing at loopback.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_moepack
from fake_hub import FakeHub

from moepack.convert.pipeline import convert_checkpoint
from moepack.runtime.verify import verify_artifact

pytestmark = pytest.mark.usefixtures("isolated_hf")

SUPER_REPO = "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4"


def test_cli_alias_through_hub_matches_local_conversion(checkpoints, by_mode, tmp_path):
    with FakeHub() as hub:
        commit = hub.add_repo(SUPER_REPO, checkpoints["super"])
        out = tmp_path / "art"
        res = run_moepack(
            "convert",
            "nemotron-super-nvfp4",
            "--target",
            "sm120",
            "-o",
            str(out),
            "--json",
            env=hub.client_env(tmp_path / "hf"),
        )
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["source"]["repo_id"] == SUPER_REPO and summary["source"]["commit"] == commit
        # Only files of the repo were asked for, all pinned to the resolved commit.
        gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
        assert gets and all(f"/resolve/{commit}/" in r.path for r in gets)
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["type"] == "hub" and m["source"]["revision"] == "main"
    assert {f["path"] for f in m["source"]["files"]} >= {"config.json", "hf_quant_config.json"}
    assert verify_artifact(out).exit_code == 0
    local = by_mode[("super", "baked")]  # the same checkpoint converted from disk
    for rec in m["files"]:
        assert (out / rec["path"]).read_bytes() == (local / rec["path"]).read_bytes(), rec["path"]


def test_unsupported_model_refused_before_any_weight(checkpoints, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in checkpoints["super"].iterdir():
        (repo / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((repo / "config.json").read_text())
    cfg["mlp_hidden_act"] = "gelu"
    (repo / "config.json").write_text(json.dumps(cfg))
    with FakeHub() as hub:
        hub.add_repo("acme/gelu-moe", repo)
        with pytest.raises(Exception, match="activation 'gelu' is not supported"):
            convert_checkpoint(
                "acme/gelu-moe",
                tmp_path / "o",
                endpoint=hub.endpoint,
                cache_dir=tmp_path / "cache",
                token=False,
            )
        assert not [r for r in hub.requests if r.path.endswith(".safetensors")]


def test_corrupted_shard_is_refused_with_a_clear_error(checkpoints, tmp_path):
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        hub.corrupt("model-00002-of-00003.safetensors")
        res = run_moepack(
            "convert",
            "acme/super",
            "--target",
            "sm120",
            "-o",
            str(tmp_path / "o"),
            env=hub.client_env(tmp_path / "hf"),
        )
    assert res.returncode == 2
    assert "model-00002-of-00003.safetensors" in res.stderr and "sha256" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_interrupted_download_resumes_and_converts(
    checkpoints, tmp_path, monkeypatch, retry_sleeps
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        hub.interrupt_once("model-00001-of-00003.safetensors", after_bytes=20000)
        convert_checkpoint(
            "acme/super",
            tmp_path / "o",
            endpoint=hub.endpoint,
            cache_dir=tmp_path / "cache",
            token=False,
        )
        ranges = [r.range for r in hub.file_requests("model-00001-of-00003.safetensors") if r.range]
    assert ranges, "the cut transfer was resumed with a Range request"
    assert verify_artifact(tmp_path / "o").exit_code == 0
