"""Crash safety: a conversion killed anywhere leaves nothing that looks complete, and a rerun
ends in an artifact that verifies, reusing the layers that were finished.

The killed conversions run in child processes forked from one helper interpreter (`ForkServer`)
that has imported moepack and torch and runs a single thread (so forking it is safe): every
crash costs a fork, not a fresh interpreter and a torch import. Where a conversion dies is
chosen by counting its file operations (each `write` of a file's bytes and each rename into
place), so every chosen point lies inside the writing phase.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moepack.convert.pipeline import convert_checkpoint
from moepack.format import MANIFEST
from moepack.runtime.verify import verify_artifact

SERVER = r"""
import json, os, signal, sys, time

from moepack.cli import main
from moepack.convert import writer
from moepack.convert.pipeline import convert_checkpoint


def hook(before, after=lambda: None):
    # Every file operation of the writer: each write of a file's bytes, each rename into place.
    real_write, real_replace = writer._Sink.write, writer.os.replace

    def write(self, data):
        before()
        real_write(self, data)
        after()

    def replace(a, b):
        before()
        real_replace(a, b)
        after()

    writer._Sink.write = write
    writer.os.replace = replace


def child(job, report, ack):
    # In the forked child: never return into the server loop.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        calls = 0
        if job["op"] == "crash":  # os._exit at operation `budget`: like SIGKILL, no cleanup
            def tick():
                nonlocal calls
                calls += 1
                if calls == job["budget"]:
                    os._exit(137)
            hook(tick)
            convert_checkpoint(job["src"], job["out"])
        else:  # "kill": announce each operation, then wait for the go-ahead once it is done
            hook(lambda: os.write(report, b"."), lambda: os.read(ack, 1))
            main(["convert", job["src"], "--target", "sm120", "-o", job["out"]], standalone_mode=False)
        os.write(report, f"done {calls}".encode())
        os._exit(0)
    except BaseException as exc:
        os.write(report, f"error {exc!r}".encode())
        os._exit(3)


def run(job):
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a thread pool would be lost in the child, whose torch would then hang
        return {"report": f"error: the server has {threads} threads, forking is unsafe"}
    r, w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(ack_w)
        child(job, w, ack_r)
    os.close(w)
    os.close(ack_r)
    seen, text = 0, b""
    if job["op"] == "kill":
        # Operations before `tick` go ahead at once; operation `tick` is never let past, so the
        # kill lands `delay` seconds after it was announced: before, during or after it, and
        # never later, however slowly this machine schedules us.
        while (byte := os.read(r, 1)) == b".":
            seen += 1
            if seen == job["tick"]:
                time.sleep(job["delay"])
                os.kill(pid, signal.SIGKILL)
                break
            os.write(ack_w, b".")
        else:
            text = byte
    os.close(ack_w)
    while chunk := os.read(r, 4096):
        text += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out = {"ticks_seen": seen, "report": text.decode(errors="replace").strip(".")}
    if os.WIFSIGNALED(status):
        out["signal"] = os.WTERMSIG(status)
    else:
        out["exit"] = os.WEXITSTATUS(status)
    return out


for line in sys.stdin:
    print(json.dumps(run(json.loads(line))), flush=True)
"""


class ForkServer:
    """A helper interpreter that forks one conversion per request and reports how it ended."""

    def __init__(self) -> None:
        # One intra-op thread: torch then starts no thread pool, and the server stays a single
        # thread, which is what makes forking it safe.
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, timeout: float = 120, **job: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        watchdog = threading.Timer(timeout, self.proc.kill)  # a hung child fails, not hangs
        watchdog.start()
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        finally:
            watchdog.cancel()
        assert line, f"fork server died (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    s = ForkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def operations(server: ForkServer, checkpoints, tmp_path_factory) -> dict[str, int]:
    """How many file operations a full conversion of each checkpoint performs."""
    root = tmp_path_factory.mktemp("count")
    out = {}
    for name in ("super", "gated"):
        res = server.run(op="crash", src=str(checkpoints[name]), out=str(root / name), budget=0)
        assert res.get("exit") == 0 and res["report"].startswith("done "), res
        out[name] = int(res["report"].split()[1])
        assert out[name] > 10, out  # enough points to choose from
    return out


def _leftovers(out: Path) -> list[Path]:
    return [*out.rglob("*.moepack-tmp"), *out.glob(".moepack-partial")]


@pytest.mark.slow
def test_crash_at_random_write_points_then_resume(server, operations, checkpoints, tmp_path):
    src = str(checkpoints["super"])
    points = sorted(random.Random(1234).sample(range(1, operations["super"]), 6))
    for point in points:
        out = tmp_path / f"crash-{point}"
        crashed = server.run(op="crash", src=src, out=str(out), budget=point)
        assert crashed.get("exit") == 137, crashed
        assert not (out / MANIFEST).exists()  # nothing half-written looks complete
        convert_checkpoint(src, out)
        report = verify_artifact(out)
        assert report.exit_code == 0, (point, report.format_text())
        assert not _leftovers(out)


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


KILL_DELAY = 0.002
"""At most this many seconds pass between the chosen operation's announcement and the SIGKILL."""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_times(server, operations, checkpoints, tmp_path, seed):
    """`moepack convert` (the CLI) SIGKILLed from outside at a random moment of its writing
    phase (the first file operation up to the manifest's rename); the kill must land before the
    conversion ends, and the rerun must finish."""
    src, out = str(checkpoints["gated"]), tmp_path / "out"
    rng = random.Random(seed)
    tick = rng.randint(1, operations["gated"])
    res = server.run(op="kill", src=src, out=str(out), tick=tick, delay=rng.uniform(0, KILL_DELAY))
    assert res.get("signal") == signal.SIGKILL and res["ticks_seen"] == tick, res
    assert any(out.rglob("*")), "killed before anything was written"
    # Killed before the manifest landed, or after (during cleanup): the rerun finishes either way.
    convert_checkpoint(src, out)
    assert verify_artifact(out).exit_code == 0
    assert not _leftovers(out)


def test_partial_directory_is_not_an_artifact(server, checkpoints, tmp_path):
    out = tmp_path / "out"
    crashed = server.run(op="crash", src=str(checkpoints["nano"]), out=str(out), budget=5)
    assert crashed.get("exit") == 137, crashed
    report = verify_artifact(out)
    assert report.exit_code == 2 and report.unusable
    assert Path(out).exists()
