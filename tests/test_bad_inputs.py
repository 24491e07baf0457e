"""The bad-input campaign (issue 10): one row per hostile input a new user met.

Every row runs one bad call (the `moepack` CLI in-process through click's runner, or the library
call a user makes) and states what must come back:

- the exit code (library rows: the raised `MoepackError`'s `exit_code`; anything else raised
  fails the row as an unanticipated error);
- a message naming what is wrong (regular expressions searched in stderr, or in the JSON error
  object with `--json`);
- no traceback;
- nothing left behind that verifies as complete (every path a row lists is checked: no
  manifest, or a manifest that `verify` rejects, or the row's own post-condition).

Rows that need a real process (an import-blocked runtime-only install, `python -m moepack`) run a
subprocess. Disk full is simulated two ways, both stated in their rows: a free-space figure
patched into `moepack.convert.outdir.free_bytes` with ENOSPC raised by the writer's sink
(always), and a real tiny tmpfs (only where this process may mount one, e.g. root in a
container; skipped elsewhere with the reason).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moepack.cli import main
from moepack.convert import writer
from moepack.convert.outdir import LOCK, OutputLock
from moepack.errors import MoepackError
from moepack.format import MANIFEST
from moepack.runtime.verify import verify_artifact


@dataclass
class Outcome:
    """What one bad call gave back, CLI or library alike."""

    code: int
    stdout: str = ""
    stderr: str = ""
    error: BaseException | None = None

    @property
    def message(self) -> str:
        """The error text a user sees: stderr, the JSON error object's message, or str(exc)."""
        text = self.stderr
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text += "\n" + json.loads(self.stdout)["error"]["message"]
        if self.error is not None:
            text += "\n" + str(self.error)
        return text


@dataclass
class Ctx:
    """The world of one row: a scratch directory and tiny synthetic checkpoints."""

    tmp: Path
    ckpt: Path
    single: Path
    monkeypatch: pytest.MonkeyPatch
    notes: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def artifact(self, name: str = "art") -> Path:
        out = self.tmp / name
        assert cli("convert", self.ckpt, "--target", "sm120", "-o", out).code == 0
        return out


def cli(*args: object, env: dict[str, str] | None = None) -> Outcome:
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # an escape past the CLI boundary fails the row with its traceback
    return Outcome(res.exit_code, res.stdout, res.stderr)


def library(call: Callable[[], Any]) -> Outcome:
    """A library call that must refuse with a `MoepackError` (its exit code is the row's)."""
    try:
        call()
    except MoepackError as exc:
        return Outcome(exc.exit_code, error=exc)
    return Outcome(0)


def verifies_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and verify_artifact(path).exit_code == 0


@dataclass
class Row:
    """One issue-10 item: `act` makes the bad call; `after` checks what it left (optional)."""

    id: str
    act: Callable[[Ctx], Outcome]
    code: int
    says: tuple[str, ...]
    leaves: Callable[[Ctx], list[Path]] = lambda ctx: [ctx.path("out")]
    after: Callable[[Ctx, Outcome], None] | None = None


# -- rows: output directory ----------------------------------------------------------------------


def _into_foreign_dir(ctx: Ctx, *extra: str) -> Outcome:
    out = ctx.path("out")
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", out, *extra)


def _notes_untouched(ctx: Ctx, _: Outcome) -> None:
    out = ctx.path("out")
    assert (out / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _finished_artifact_plus_foreign_file(ctx: Ctx) -> Outcome:
    out = ctx.artifact("out")
    (out / "notes.txt").write_text("mine\n")
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", out, "--overwrite")


def _artifact_kept_with_notes(ctx: Ctx, _: Outcome) -> None:
    out = ctx.path("out")
    assert (out / "notes.txt").read_text() == "mine\n"
    (out / "notes.txt").unlink()
    assert verifies_complete(out)  # the refused --overwrite touched nothing


def _source_unchanged(ctx: Ctx, _: Outcome) -> None:
    assert sorted(p.name for p in ctx.ckpt.iterdir()) == ctx.notes["source_files"]


def _out_is_source(ctx: Ctx) -> Outcome:
    ctx.notes["source_files"] = sorted(p.name for p in ctx.ckpt.iterdir())
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.ckpt)


def _out_inside_source(ctx: Ctx) -> Outcome:
    ctx.notes["source_files"] = sorted(p.name for p in ctx.ckpt.iterdir())
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.ckpt / "artifact")


def _corrupted_rerun(ctx: Ctx) -> Outcome:
    out = ctx.artifact("out")
    layer = out / "moe" / "layer-00003.safetensors"
    data = bytearray(layer.read_bytes())
    data[-7] ^= 0x10  # one flipped bit in the last tensor's bytes: size unchanged
    layer.write_bytes(bytes(data))
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", out)


def _corrupted_rerun_repaired(ctx: Ctx, res: Outcome) -> None:
    assert "rewrote 1: moe/layer-00003.safetensors" in res.stdout
    assert "after checking their size and sha256" in res.stdout
    assert verifies_complete(ctx.path("out"))


def _clean_rerun_checks(ctx: Ctx) -> Outcome:
    out = ctx.artifact("out")
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", out, "--json")


def _clean_rerun_checked(ctx: Ctx, res: Outcome) -> None:
    summary = json.loads(res.stdout)
    assert summary["kept_layers"] == 2 and summary["written_files"] == []
    assert len(summary["kept_files"]) == summary["files"]
    assert verifies_complete(ctx.path("out"))


def _second_conversion(ctx: Ctx) -> Outcome:
    out = ctx.path("out")
    with OutputLock(out):  # the first conversion, holding the lock for the whole call
        return cli("convert", ctx.ckpt, "--target", "sm120", "-o", out)


def _lock_named_holder(ctx: Ctx, res: Outcome) -> None:
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in res.message
    assert list(ctx.path("out").iterdir()) == []  # the refused one wrote nothing; lock released


# -- rows: devices ------------------------------------------------------------------------------


def _convert_on(device: str) -> Callable[[Ctx], Outcome]:
    def act(ctx: Ctx) -> Outcome:
        return cli(
            "convert", ctx.ckpt, "--target", "sm120", "-o", ctx.path("out"), "--device", device
        )

    return act


def _no_out_dir(ctx: Ctx, _: Outcome) -> None:
    assert not ctx.path("out").exists()


def _load(**kwargs: Any) -> Callable[[Ctx], Outcome]:
    def act(ctx: Ctx) -> Outcome:
        from moepack.runtime import load

        art = ctx.artifact("art")
        return library(lambda: load(art, **kwargs))

    return act


def _artifact_repr(ctx: Ctx) -> Outcome:
    from moepack.runtime import load

    art = load(ctx.artifact("art"), device="cpu", backend="reference")
    ctx.notes["repr"] = repr(art)
    return Outcome(0)


def _repr_is_short(ctx: Ctx, _: Outcome) -> None:
    text = ctx.notes["repr"]
    assert len(text) < 300 and "\n" not in text, text
    assert "moe_layers=[1, 3]" in text and "device=cpu" in text and "sm120" in text


# -- rows: resources and interruption -------------------------------------------------------------


def _interrupt_at_second_layer(ctx: Ctx) -> Outcome:
    """Ctrl-C while layer 3 is being converted (layer 1 converted and being written)."""
    from moepack.convert import pipeline

    real, calls = pipeline.convert_layer, []

    def convert_layer(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ctx.monkeypatch.setattr(pipeline, "convert_layer", convert_layer)
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.path("out"))


def _interrupt_kept_layer_1(ctx: Ctx, _: Outcome) -> None:
    ctx.monkeypatch.undo()
    res = cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.path("out"), "--json")
    summary = json.loads(res.stdout)
    assert res.code == 0 and summary["kept_layers"] == 1, res.stdout
    assert "moe/layer-00003.safetensors" in summary["written_files"]
    assert "moe/layer-00001.safetensors" in summary["kept_files"]
    assert verifies_complete(ctx.path("out"))


def _little_free_space(ctx: Ctx) -> Outcome:
    """Disk full, simulated: the filesystem reports 1 MiB free (patched statvfs figure)."""
    ctx.monkeypatch.setattr("moepack.convert.outdir.free_bytes", lambda _path: 1 << 20)
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.path("out"))


def _enospc_in_second_layer(ctx: Ctx) -> Outcome:
    """Disk full, simulated: the writer's sink raises ENOSPC once layer 3's file is 64 KiB in
    (the free-space pre-check passes: the disk filled up after it)."""
    real = writer._Sink.write

    def write(self: Any, data: Any) -> None:
        if "layer-00003" in self.f.name and self.size > 64 << 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    ctx.monkeypatch.setattr(writer._Sink, "write", write)
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.path("out"))


def _no_tmp_left(ctx: Ctx, _: Outcome) -> None:
    out = ctx.path("out")
    assert not list(out.rglob("*.moepack-tmp"))
    assert not (out / LOCK).exists()
    assert (out / "moe" / "layer-00001.safetensors").is_file()  # the finished layer is kept


ROWS: list[Row] = [
    Row(
        "convert into a non-empty directory that is not moepack's",
        lambda ctx: _into_foreign_dir(ctx),
        2,
        (r"notes\.txt", r"moepack did not write", r"choose an empty directory"),
        after=_notes_untouched,
    ),
    Row(
        "--overwrite into a non-empty directory that is not moepack's",
        lambda ctx: _into_foreign_dir(ctx, "--overwrite"),
        2,
        (r"notes\.txt", r"--overwrite replaces only moepack's own files"),
        after=_notes_untouched,
    ),
    Row(
        "--overwrite over a finished artifact someone added a file to",
        _finished_artifact_plus_foreign_file,
        2,
        (r"notes\.txt", r"moepack did not write"),
        leaves=lambda ctx: [],
        after=_artifact_kept_with_notes,
    ),
    Row(
        "-o equal to the source directory",
        _out_is_source,
        2,
        (r"-o is the source checkpoint directory",),
        leaves=lambda ctx: [ctx.ckpt],
        after=_source_unchanged,
    ),
    Row(
        "-o inside the source directory",
        _out_inside_source,
        2,
        (r"-o is inside the source checkpoint",),
        leaves=lambda ctx: [ctx.ckpt, ctx.ckpt / "artifact"],
        after=_source_unchanged,
    ),
    Row(
        "rerun over a finished artifact with a corrupted byte",
        _corrupted_rerun,
        0,
        (),
        leaves=lambda ctx: [],
        after=_corrupted_rerun_repaired,
    ),
    Row(
        "rerun over a finished artifact checks what it keeps",
        _clean_rerun_checks,
        0,
        (),
        leaves=lambda ctx: [],
        after=_clean_rerun_checked,
    ),
    Row(
        "two conversions into one directory",
        _second_conversion,
        2,
        (r"another conversion is writing here", r"pid \d+ on host"),
        after=_lock_named_holder,
    ),
    Row(
        "convert --device cuda without CUDA",
        _convert_on("cuda"),
        2,
        (r"device 'cuda'", r"no CUDA", r"--device cpu"),
        after=_no_out_dir,
    ),
    Row(
        "convert --device gpu0",
        _convert_on("gpu0"),
        2,
        (r"device 'gpu0' is not a device name", r"cpu, cuda or cuda:N"),
        after=_no_out_dir,
    ),
    Row(
        "load(device='cuda') on CPU torch",
        _load(device="cuda"),
        2,
        (r"device 'cuda'", r"without CUDA", r"available: cpu", r"backend='reference'"),
        leaves=lambda ctx: [],
    ),
    Row(
        "load(device='mps') would leave tensors on the CPU",
        _load(device="mps"),
        2,
        (r"device 'mps'", r"'cpu' or 'cuda' only"),
        leaves=lambda ctx: [],
    ),
    Row(
        "load(layers=[])",
        _load(device="cpu", backend="reference", layers=[]),
        2,
        (r"layers=\[\] selects no layer", r"\[1, 3\]"),
        leaves=lambda ctx: [],
    ),
    Row(
        "repr(Artifact) is one short line",
        _artifact_repr,
        0,
        (),
        leaves=lambda ctx: [],
        after=_repr_is_short,
    ),
    Row(
        "Ctrl-C during convert",
        _interrupt_at_second_layer,
        130,
        (r"interrupted", r"kept 1 of 2 finished MoE layers \(1\)", r"rerun the same command"),
        after=_interrupt_kept_layer_1,
    ),
    Row(
        "not enough free space before writing (simulated: patched free-space figure)",
        _little_free_space,
        2,
        (r"not enough free space", r"writes \d+(\.\d+)? KiB more", r"1\.00 MiB free"),
        after=_no_out_dir,
    ),
    Row(
        "disk fills up while writing (simulated: ENOSPC raised by the writer)",
        _enospc_in_second_layer,
        2,
        (
            r"moe/layer-00003\.safetensors: no space left on device",
            r"the file needs \d+(\.\d+)? KiB",
            r"kept 1 of 2 finished MoE layers",
        ),
        after=_no_tmp_left,
    ),
]


@pytest.fixture(scope="module")
def sources(artifact_factory) -> dict[str, Path]:
    return {
        layout: artifact_factory.checkpoint("super", layout) for layout in ("sharded", "single")
    }


@pytest.fixture
def ctx(sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    # A private copy per row: rows that must not touch the source can then be checked.
    ckpt = Path(shutil.copytree(sources["sharded"], tmp_path / "ckpt"))
    yield Ctx(tmp_path, ckpt, sources["single"], monkeypatch)


def check(row: Row, ctx: Ctx, res: Outcome) -> None:
    text = res.stdout + res.stderr
    assert res.code == row.code, f"{row.id}: exit {res.code}, expected {row.code}\n{text}"
    assert "Traceback" not in text, text
    for pattern in row.says:
        assert re.search(pattern, res.message), f"{row.id}: {pattern!r} not in {res.message!r}"
    if row.code != 0:
        for path in row.leaves(ctx):
            assert not verifies_complete(path), f"{row.id}: {path} verifies as complete"
    if row.after is not None:
        row.after(ctx, res)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, ctx: Ctx) -> None:
    check(row, ctx, row.act(ctx))


# -- disk full on a real filesystem ---------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `where`; skips the test where mounting is not allowed."""
    where.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real tiny filesystem needs root on Linux (mount -t tmpfs)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_on_a_real_tiny_filesystem(ctx: Ctx) -> None:
    """Disk full, for real: a 256 KiB tmpfs. First the pre-check refuses (the artifact does not
    fit with its margin); then, with the pre-check told the disk is large, the kernel's own
    ENOSPC mid-file is reported naming the file and its size, and nothing verifies."""
    with tiny_tmpfs(ctx.path("fs"), "256k") as fs:
        out = fs / "art"
        res = cli("convert", ctx.ckpt, "--target", "sm120", "-o", out)
        assert res.code == 2 and "not enough free space" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and not out.exists()

        ctx.monkeypatch.setattr("moepack.convert.outdir.free_bytes", lambda _path: 1 << 40)
        res = cli("convert", ctx.ckpt, "--target", "sm120", "-o", out)
        assert res.code == 2, res.stdout + res.stderr
        assert re.search(r"\.safetensors: no space left on device while writing it", res.stderr)
        assert re.search(r"the file needs \d+(\.\d+)? KiB", res.stderr), res.stderr
        assert "Errno" not in res.stderr and "Traceback" not in res.stderr
        assert not verifies_complete(out)
        assert not list(out.rglob("*.moepack-tmp")) if out.exists() else True
