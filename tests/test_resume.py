"""Crash safety: a conversion killed anywhere leaves nothing that looks complete, and a rerun
ends in an artifact that verifies, reusing the layers that were finished."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moepack.convert.pipeline import convert_checkpoint
from moepack.format import MANIFEST
from moepack.runtime.verify import verify_artifact

CRASH_AFTER = """
import os, sys
from moepack.convert import writer
from moepack.convert.pipeline import convert_checkpoint

budget = int(sys.argv[3])
calls = 0

def tick():
    global calls
    calls += 1
    if calls == budget:
        os._exit(137)  # like SIGKILL: no cleanup, no finally blocks

real_write, real_replace = writer._Sink.write, writer.os.replace

def write(self, data):
    tick()
    real_write(self, data)

def replace(a, b):
    tick()
    real_replace(a, b)

writer._Sink.write = write
writer.os.replace = replace
convert_checkpoint(sys.argv[1], sys.argv[2])
print("calls", calls)
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CRASH_AFTER, *args], capture_output=True, text=True, timeout=120
    )


def test_crash_at_random_write_points_then_resume(checkpoints, tmp_path):
    src = str(checkpoints["super"])
    full = _run([src, str(tmp_path / "count"), "0"])
    assert full.returncode == 0, full.stderr
    total = int(full.stdout.split()[-1])
    rng = random.Random(1234)
    points = sorted(rng.sample(range(1, total), 6))
    for point in points:
        out = tmp_path / f"crash-{point}"
        crashed = _run([src, str(out), str(point)])
        assert crashed.returncode == 137, crashed.stderr
        assert not (out / MANIFEST).exists()  # nothing half-written looks complete
        convert_checkpoint(src, out)
        report = verify_artifact(out)
        assert report.exit_code == 0, (point, report.format_text())
        assert not list(out.rglob("*.moepack-tmp")) and not (out / ".moepack-partial").exists()


def test_rerun_keeps_finished_layers(checkpoints, tmp_path, monkeypatch):
    from moepack.convert import pipeline

    src, out = str(checkpoints["super"]), tmp_path / "out"
    real = pipeline.convert_layer
    calls = []

    def interrupted_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "convert_layer", interrupted_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out)
    monkeypatch.setattr(pipeline, "convert_layer", real)
    first = out / "moe" / "layer-00001.safetensors"
    inode = first.stat().st_ino
    convert_checkpoint(src, out)
    assert first.stat().st_ino == inode  # kept, not rewritten
    assert verify_artifact(out).exit_code == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_times(checkpoints, tmp_path, seed):
    src, out = str(checkpoints["gated"]), tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "moepack",
        "convert",
        src,
        "--target",
        "sm120",
        "-o",
        str(out),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    took = time.perf_counter() - t0
    (out / MANIFEST).unlink()
    for rel in [p for p in out.rglob("*") if p.is_file()]:
        rel.unlink()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.3, 1.0) * took)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # Killed before the manifest landed, or after (during cleanup): the rerun finishes either way.
    convert_checkpoint(src, out)
    assert verify_artifact(out).exit_code == 0


def test_partial_directory_is_not_an_artifact(checkpoints, tmp_path):
    out = tmp_path / "out"
    _run([str(checkpoints["nano"]), str(out), "5"])
    report = verify_artifact(out)
    assert report.exit_code == 2 and report.unusable
    assert Path(out).exists()
