"""A hub conversion overlaps the download: layers convert as their shards arrive, verified.

Every point is observed through the loopback FakeHub's request log and its `stall` (a file's
body held at a byte offset until released), never through timing: the first layer converts
while the last shard is held mid-transfer, which could not happen if conversion waited for the
whole download.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_moepack
from fake_hub import FakeHub

from moepack.convert import pipeline, prefetch
from moepack.convert.checkpoint import Checkpoint
from moepack.convert.hub import HubRepo
from moepack.convert.moe_layers import find_moe_layers
from moepack.convert.pipeline import convert_checkpoint
from moepack.convert.prefetch import download_order
from moepack.errors import HubError
from moepack.format import layer_file
from moepack.runtime.verify import verify_artifact

pytestmark = pytest.mark.usefixtures("isolated_hf")

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
LAST = SHARDS[2]  # holds experts of the last MoE layer (3) only; layer 1 lies in shards 1-2
HELD_AT = 25 * 4096  # past a shard's header read (64 KiB), a multiple of the test chunk size


def _downloads(hub: FakeHub) -> list[str]:
    """The files whose whole body was asked for, in request order (ranged reads left out)."""
    names = []
    for r in hub.requests:
        if r.method == "GET" and r.range is None and r.server == "cdn":
            names.append(r.query["filename"][0])
    return names


def _same_bytes(art: Path, reference: Path) -> None:
    m = json.loads((art / "manifest.json").read_text())
    for rec in m["files"]:
        assert (art / rec["path"]).read_bytes() == (reference / rec["path"]).read_bytes()


def _hub_args(hub: FakeHub, tmp_path: Path) -> dict[str, Any]:
    return {"endpoint": hub.endpoint, "cache_dir": tmp_path / "cache", "token": False}


def test_first_layer_converts_while_the_last_shard_is_held(
    checkpoints, by_mode, tmp_path, monkeypatch
):
    seen: list[tuple[int, bool, bool]] = []
    intervals = [sys.getswitchinterval()]
    real = pipeline.convert_layer

    def convert_layer(ckpt: Checkpoint, moe: Any, *args: Any, **kwargs: Any) -> Any:
        if moe.layer == 1:
            waiting.wait(60)  # the download reaches the hold in the last shard
        last_done = any((tmp_path / "cache").glob(f"*/blobs/{sha}"))
        seen.append((moe.layer, waiting.is_set(), last_done))
        if moe.layer == 1:
            intervals.append(sys.getswitchinterval())
        result = real(ckpt, moe, *args, **kwargs)
        hub.release(LAST)  # layer 1 is converted; let the download finish
        return result

    monkeypatch.setattr(pipeline, "convert_layer", convert_layer)
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        sha = hub.file_entry("acme/super", LAST).sha256
        waiting = hub.stall(LAST, at=HELD_AT)
        guard = threading.Timer(60, hub.release, [LAST])  # a conversion that waited: no hang
        guard.start()
        try:
            summary = convert_checkpoint("acme/super", tmp_path / "art", **_hub_args(hub, tmp_path))
        finally:
            guard.cancel()
        order = _downloads(hub)
    # Layer 1 converted while the last shard was held mid-transfer; layer 3 once it was there.
    assert seen == [(1, True, False), (3, True, True)], seen
    assert order == SHARDS, order  # each shard once, in the order the layers need them
    # The GIL is handed over more often while the download runs, as before once it is done.
    assert intervals == [intervals[0], prefetch.SWITCH_INTERVAL_S], intervals
    assert sys.getswitchinterval() == intervals[0]
    assert summary["moe_layers"] == 2
    assert verify_artifact(tmp_path / "art").exit_code == 0
    _same_bytes(tmp_path / "art", by_mode[("super", "baked")])


def _renamed(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """`src` with its shards renamed (`names`), the index rewritten to match."""
    shutil.copytree(src, dst)
    for old, new in names.items():
        (dst / old).rename(dst / f"{new}.tmp")
    for new in names.values():
        (dst / f"{new}.tmp").rename(dst / new)
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: names.get(v, v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return dst


def test_download_order_follows_the_layers_not_the_names(checkpoints, tmp_path):
    # Shards 1 and 3 swapped: layer 1 now lies in shards 3 and 2, layer 3 in 2 and 1.
    ckpt = _renamed(
        checkpoints["super"], tmp_path / "swapped", {SHARDS[0]: SHARDS[2], SHARDS[2]: SHARDS[0]}
    )
    local = Checkpoint(ckpt)
    layers = find_moe_layers(local.weight_map, local.quant, local.config)
    files = [*SHARDS, "config.json", "tokenizer_config.json"]
    assert download_order(files, local.weight_map, layers) == [
        SHARDS[1],
        SHARDS[2],
        SHARDS[0],
        "config.json",
        "tokenizer_config.json",
    ]
    # Layer 1 kept by an earlier run: its shards that layer 3 does not need come after.
    assert download_order(files, local.weight_map, layers[1:])[:3] == [
        SHARDS[0],
        SHARDS[1],
        SHARDS[2],
    ]
    local.close()
    with FakeHub() as hub:
        hub.add_repo("acme/swapped", ckpt)
        convert_checkpoint("acme/swapped", tmp_path / "art", **_hub_args(hub, tmp_path))
        assert _downloads(hub) == [SHARDS[1], SHARDS[2], SHARDS[0]]
    assert verify_artifact(tmp_path / "art").exit_code == 0


def test_single_file_checkpoint_from_the_hub(artifact_factory, tmp_path):
    single = artifact_factory.checkpoint("super", "single")
    with FakeHub() as hub:
        hub.add_repo("acme/single", single)
        convert_checkpoint("acme/single", tmp_path / "art", **_hub_args(hub, tmp_path))
        whole = [r for r in hub.file_requests("model.safetensors", "GET") if r.range is None]
        assert len([r for r in whole if r.server == "cdn"]) == 1  # downloaded once
    assert verify_artifact(tmp_path / "art").exit_code == 0
    _same_bytes(tmp_path / "art", artifact_factory.artifact("super", layout="single"))


def test_a_header_that_differs_from_the_download_is_refused(checkpoints, tmp_path, monkeypatch):
    real = HubRepo.read_range

    def other_header(self: HubRepo, filename: str, start: int, end: int) -> bytes:
        data = real(self, filename, start, end)
        return data.replace(b'"format":"pt"', b'"format":"tf"') if filename == LAST else data

    monkeypatch.setattr(HubRepo, "read_range", other_header)
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        with pytest.raises(HubError, match=f"'{LAST}' as downloaded has another header"):
            convert_checkpoint("acme/super", tmp_path / "art", **_hub_args(hub, tmp_path))
    assert not (tmp_path / "art" / "manifest.json").exists()


def test_corrupted_last_shard_fails_cleanly_and_a_rerun_keeps_layer_1(
    checkpoints, by_mode, tmp_path
):
    out = tmp_path / "art"
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        hub.corrupt(LAST)
        res = run_moepack(
            "convert",
            "acme/super",
            "--target",
            "sm120",
            "-o",
            str(out),
            env=hub.client_env(tmp_path / "hf"),
        )
        assert res.returncode == 2, res.stderr
        assert LAST in res.stderr and "sha256" in res.stderr
        assert "Traceback" not in res.stderr
        assert not (out / "manifest.json").exists()
        assert verify_artifact(out).exit_code != 0
        state = json.loads((out / pipeline.STATE).read_text())
        assert layer_file(1) in state["done"]  # converted while the download went on
        assert layer_file(3) not in state["done"]
        hub.clear_faults()
        summary = convert_checkpoint(
            "acme/super", out, endpoint=hub.endpoint, cache_dir=tmp_path / "hf" / "hub", token=False
        )
    assert summary["kept_layers"] == 1
    assert verify_artifact(out).exit_code == 0
    _same_bytes(out, by_mode[("super", "baked")])


def _saved(cache: Path, sha256: str) -> int:
    """How many bytes of a held shard its `.part` file in the HF `cache` holds (all the whole
    4 KiB chunks sent before the hold; the client's reader may keep back the last one)."""
    parts = list(cache.glob(f"*/blobs/{sha256}.part"))
    return parts[0].stat().st_size if parts else 0


CHILD = """
import signal, sys
# Ctrl-C reaches a foreground process; one started with SIGINT ignored (a background job of a
# non-interactive shell, as a CI runner may start pytest) would keep ignoring it.
signal.signal(signal.SIGINT, signal.default_int_handler)
from huggingface_hub import constants
constants.DOWNLOAD_CHUNK_SIZE = 4096  # so that a held transfer leaves its bytes in .part
from moepack.cli import main
main()
"""


def _recorded(out: Path) -> set[str]:
    """The files an (interrupted) conversion at `out` has recorded as finished."""
    try:
        return set(json.loads((out / pipeline.STATE).read_text())["done"])
    except (OSError, ValueError, KeyError):
        return set()


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_stopped_during_the_download_a_rerun_resumes_it_and_keeps_layer_1(
    checkpoints, by_mode, tmp_path, how
):
    out, home = tmp_path / "art", tmp_path / "hf"
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        sha = hub.file_entry("acme/super", LAST).sha256
        waiting = hub.stall(LAST, at=HELD_AT)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, "convert", "acme/super", "--target", "sm120"]
            + ["-o", str(out)],
            env=hub.client_env(home) | {"HF_HUB_DOWNLOAD_TIMEOUT": "120"},  # held, not timed out
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Layer 1 is converted and recorded while the last shard's download is held.
            deadline = time.monotonic() + 120
            while not (
                waiting.is_set()
                and layer_file(1) in _recorded(out)
                and _saved(home / "hub", sha) >= HELD_AT - 4096
            ):
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline, "layer 1 was not recorded during the download"
                time.sleep(0.05)
            saved = _saved(home / "hub", sha)
            child.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
            _, err = child.communicate(timeout=60)  # the downloader thread does not hold exit
        finally:
            if child.poll() is None:
                child.kill()
        if how == "ctrl-c":
            assert child.returncode == 130, err
            assert "kept 1 of 2 finished MoE layers" in err and "Traceback" not in err
        assert _saved(home / "hub", sha) == saved  # the partial transfer is still there
        hub.clear_faults()
        hub.clear_requests()
        summary = convert_checkpoint(
            "acme/super", out, endpoint=hub.endpoint, cache_dir=home / "hub", token=False
        )
        ranges = [r.range for r in hub.file_requests(LAST, "GET") if r.server == "cdn"]
    assert f"bytes={saved}-" in ranges, ranges  # resumed where the stopped run left off
    assert summary["kept_layers"] == 1
    assert verify_artifact(out).exit_code == 0
    _same_bytes(out, by_mode[("super", "baked")])


def test_a_failed_conversion_stops_its_download(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # a progress update a chunk
    real = prefetch.Prefetch.wait

    def interrupted(self: prefetch.Prefetch, name: str) -> Path:
        if name == SHARDS[1]:  # Ctrl-C while layer 1 waits for its second shard, held mid-way
            deadline = time.monotonic() + 60
            while _saved(tmp_path / "cache", sha) < HELD_AT - 4096:
                assert time.monotonic() < deadline, "the held shard's bytes never arrived"
                time.sleep(0.05)
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(prefetch.Prefetch, "wait", interrupted)
    with FakeHub() as hub:
        hub.add_repo("acme/super", checkpoints["super"])
        sha = hub.file_entry("acme/super", SHARDS[1]).sha256
        size = hub.file_entry("acme/super", SHARDS[1]).size
        waiting = hub.stall(SHARDS[1], at=HELD_AT)
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint("acme/super", tmp_path / "art", **_hub_args(hub, tmp_path))
        assert waiting.wait(60)
        hub.release(SHARDS[1])  # bytes flow again: the stopped download ends at the next chunk
        deadline = time.monotonic() + 60
        while any(t.name == "moepack-download" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the download went on after the conversion failed"
            time.sleep(0.05)
        assert SHARDS[2] not in _downloads(hub), "a shard was fetched after the stop"
    assert not list((tmp_path / "cache").glob(f"*/blobs/{sha}"))  # never completed
    assert HELD_AT - 4096 <= _saved(tmp_path / "cache", sha) < size  # kept for a rerun
