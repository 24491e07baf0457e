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
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moepack.cli import main
from moepack.convert import synthetic, writer
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


def _disk_already_full(ctx: Ctx) -> Outcome:
    """Disk full, simulated: 0 bytes free and every write of the lock's holder record fails
    with ENOSPC (os.pwrite patched for the call: in moepack only the lock record uses it)."""
    import moepack.convert.outdir as outdir

    def pwrite(*_args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(outdir, "free_bytes", lambda _path: 0)
    ctx.monkeypatch.setattr(outdir.os, "pwrite", pwrite)
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


# -- rows: checkpoints and sources ----------------------------------------------------------------


def _single_file_checkpoint(ctx: Ctx) -> Outcome:
    return cli("convert", ctx.single, "--target", "sm120", "-o", ctx.path("out"))


def _single_file_converted(ctx: Ctx, res: Outcome) -> None:
    assert verifies_complete(ctx.path("out")), res.stdout


def _single_file_from_hub(ctx: Ctx) -> Outcome:
    """The same layout served by a (loopback) hub: the index is absent there too."""
    from fake_hub import FakeHub

    from moepack.convert.pipeline import convert_checkpoint

    with FakeHub() as hub:
        hub.add_repo("acme/tiny-single", ctx.single)
        return library(
            lambda: convert_checkpoint(
                "acme/tiny-single",
                ctx.path("out"),
                endpoint=hub.endpoint,
                cache_dir=ctx.path("hf"),
                token=False,
            )
        )


def _misshapen_expert(ctx: Ctx) -> Outcome:
    """Expert 5 of layer 1 (the first MoE layer) has a down_proj weight of the wrong shape (the layer spans shards)."""
    from safetensors.torch import load_file, save_file

    index = json.loads((ctx.ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = "backbone.layers.1.mixer.experts.5.down_proj.weight"
    shard = ctx.ckpt / index[name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :-8].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ctx.notes["shard"] = index[name]
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.path("new/dirs/out"))


def _names_shard_no_dir(ctx: Ctx, res: Outcome) -> None:
    assert ctx.notes["shard"] in res.stderr
    # It failed after -o (and the directories above it) were made: all removed again.
    assert not ctx.path("new").exists()


def _verify_source(where: Callable[[Ctx], str], *extra: str) -> Callable[[Ctx], Outcome]:
    def act(ctx: Ctx) -> Outcome:
        art = ctx.artifact("art")
        return cli("verify", art, "--source", where(ctx), *extra)

    return act


def _other_model(ctx: Ctx) -> str:
    return str(synthetic.write_checkpoint(ctx.path("nano"), synthetic.default_spec("nano")))


def _same_shape_other_weights(ctx: Ctx) -> str:
    spec = synthetic.default_spec("super", seed=11)
    return str(synthetic.write_checkpoint(ctx.path("other"), spec))


def _headline_failed(ctx: Ctx, res: Outcome) -> None:
    first = res.stdout.splitlines()[0]
    assert first.startswith("FAILED:") and "OK" not in res.stdout, res.stdout
    assert "moe/layer-00001.safetensors" in res.stdout


def _json_error_object(ctx: Ctx, res: Outcome) -> None:
    obj = json.loads(res.stdout)
    assert obj["ok"] is False and obj["exit_code"] == 2
    assert obj["error"]["type"] == "SourceError" and obj["error"]["path"].endswith("missing")


def _unknown_hub_id(ctx: Ctx) -> Outcome:
    """`verify --source nvidia/foo` against a loopback hub that has no such repo."""
    from fake_hub import FakeHub
    from huggingface_hub import constants

    art = ctx.artifact("art")
    with FakeHub() as hub:
        ctx.monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        ctx.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(ctx.path("hf")))
        return cli("verify", art, "--source", "nvidia/foo", "--json")


def _hub_cut_before_first_byte(ctx: Ctx) -> Outcome:
    """A hub transfer that dies before its first byte: nothing saved, so no resume promised."""
    from fake_hub import FakeHub
    from huggingface_hub import constants, file_download

    from moepack.convert.pipeline import convert_checkpoint

    ctx.monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    ctx.monkeypatch.setattr(file_download.time, "sleep", lambda _s: None)
    with FakeHub() as hub:
        hub.add_repo("acme/tiny-moe", ctx.ckpt)
        hub.interrupt("model-00002-of-00003.safetensors", after_bytes=0, times=50)
        return library(
            lambda: convert_checkpoint(
                "acme/tiny-moe",
                ctx.path("out"),
                endpoint=hub.endpoint,
                cache_dir=ctx.path("hf"),
                token=False,
            )
        )


def _no_resume_promise(ctx: Ctx, res: Outcome) -> None:
    assert "resume" not in res.message, res.message
    assert not ctx.path("out").exists()


# -- rows: messages and output ----------------------------------------------------------------------


def _out_under_a_file(ctx: Ctx) -> Outcome:
    (ctx.tmp / "plain").write_text("a file, not a directory\n")
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.tmp / "plain" / "art")


def _no_errno(ctx: Ctx, res: Outcome) -> None:
    assert "Errno" not in res.message and "[" not in res.stderr, res.stderr


def _sizes_printed(ctx: Ctx) -> Outcome:
    out = ctx.path("out")
    texts = [cli("convert", ctx.ckpt, "--target", "sm120", "-o", out).stdout]
    texts += [cli("verify", out).stdout, cli("inspect", out).stdout]
    ctx.notes["texts"] = texts
    return Outcome(0)


def _human_sizes(ctx: Ctx, _: Outcome) -> None:
    for text in ctx.notes["texts"]:
        assert not re.search(r"\b0\.0+ [GM]B\b", text), text
        assert re.search(r"\d+(\.\d+)? [KM]iB", text), text
    inspect = ctx.notes["texts"][2]
    # flushed b12x scales come with the count they are out of
    assert re.search(r"b12x scales flushed to zero \d[\d,]* of [\d,]+ \(\d+\.\d+%\)", inspect)


def _manifest_path(rel: str) -> Callable[[Ctx], Outcome]:
    def act(ctx: Ctx) -> Outcome:
        art = ctx.artifact("art")
        manifest = json.loads((art / MANIFEST).read_text())
        manifest["files"][0]["path"] = rel
        (art / MANIFEST).write_text(json.dumps(manifest))
        return cli("inspect", art)

    return act


def _escaping_symlink(ctx: Ctx) -> Outcome:
    art = ctx.artifact("art")
    (art / "model" / "config.json").unlink()
    (art / "model" / "config.json").symlink_to(ctx.ckpt / "config.json")
    return cli("inspect", art)


def _different_artifact(*extra: str) -> Callable[[Ctx], Outcome]:
    """A finished full artifact at -o, then a --moe-only conversion (another job) into it."""

    def act(ctx: Ctx) -> Outcome:
        out = ctx.artifact("out")
        return cli("convert", ctx.ckpt, "--target", "sm120", "-o", out, "--moe-only", *extra)

    return act


def _old_artifact_intact(ctx: Ctx, _: Outcome) -> None:
    assert verifies_complete(ctx.path("out"))  # refused: the old artifact is untouched
    assert (ctx.path("out") / "model").is_dir()


def _replaced_by_moe_only(ctx: Ctx, _: Outcome) -> None:
    out = ctx.path("out")
    assert verifies_complete(out)
    assert not (out / "model").exists()  # what the old job wrote and this one does not: gone


def _out_is_a_file(ctx: Ctx) -> Outcome:
    (ctx.tmp / "plain").write_text("a file\n")
    return cli("convert", ctx.ckpt, "--target", "sm120", "-o", ctx.tmp / "plain")


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
        "convert into a finished artifact of another job, without --overwrite",
        _different_artifact(),
        2,
        (r"already holds a different artifact", r"--overwrite"),
        leaves=lambda ctx: [],
        after=_old_artifact_intact,
    ),
    Row(
        "--overwrite replaces an artifact of another job with only what this job writes",
        _different_artifact("--overwrite"),
        0,
        (),
        leaves=lambda ctx: [],
        after=_replaced_by_moe_only,
    ),
    Row(
        "-o is an existing file",
        _out_is_a_file,
        2,
        (r"plain: exists and is not a directory",),
        leaves=lambda ctx: [],
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
        (r"device 'cuda'", r"without CUDA", r"available: cpu", r"--device cpu"),
        after=_no_out_dir,
    ),
    Row(
        "convert --device mps",
        _convert_on("mps"),
        2,
        (r"device 'mps'", r"conversion runs on 'cpu' or 'cuda' only", r"--device cpu"),
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
        "load(device='gpu0')",
        _load(device="gpu0"),
        2,
        (r"device 'gpu0' is not a device name", r"cpu, cuda or cuda:N"),
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
        (r"not enough free space", r"writes \d+(\.\d+)? [KM]iB more", r"1\.00 MiB free"),
        after=_no_out_dir,
    ),
    Row(
        "disk already full: not even the lock's holder record fits (simulated)",
        _disk_already_full,
        2,
        (r"not enough free space", r"0 B free"),
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
    Row(
        "single-file checkpoint (model.safetensors, no index)",
        _single_file_checkpoint,
        0,
        (),
        leaves=lambda ctx: [],
        after=_single_file_converted,
    ),
    Row(
        "single-file checkpoint from the hub",
        _single_file_from_hub,
        0,
        (),
        leaves=lambda ctx: [],
        after=_single_file_converted,
    ),
    Row(
        "tensor error names its shard file; the failed conversion leaves no directory",
        _misshapen_expert,
        2,
        (r"model-0000\d-of-00003\.safetensors: backbone\.layers\.1\.mixer\.experts\.5\.down_proj",),
        leaves=lambda ctx: [ctx.path("new/dirs/out")],
        after=_names_shard_no_dir,
    ),
    Row(
        "verify --source: missing directory",
        _verify_source(lambda ctx: str(ctx.path("missing"))),
        2,
        (r"missing: no such directory",),
        leaves=lambda ctx: [],
    ),
    Row(
        "verify --source --json: missing directory gives a JSON error object",
        _verify_source(lambda ctx: str(ctx.path("missing")), "--json"),
        2,
        (r"no such directory",),
        leaves=lambda ctx: [],
        after=_json_error_object,
    ),
    Row(
        "verify --source: another model",
        _verify_source(_other_model),
        2,
        (r"not the checkpoint this artifact was converted from", r"\[0, 3\].*\[1, 3\]"),
        leaves=lambda ctx: [],
    ),
    Row(
        "verify --source: unknown hub id",
        _unknown_hub_id,
        2,
        (r"nvidia/foo", r"repository not found"),
        leaves=lambda ctx: [],
    ),
    Row(
        "verify --source: differences are not headlined OK",
        _verify_source(_same_shape_other_weights),
        1,
        (),
        leaves=lambda ctx: [],
        after=_headline_failed,
    ),
    Row(
        "hub failure that saved nothing does not say 'rerun to resume'",
        _hub_cut_before_first_byte,
        2,
        (r"model-00002-of-00003\.safetensors", r"nothing of this file was saved"),
        after=_no_resume_promise,
    ),
    Row(
        "OS errors are not raw errno text",
        _out_under_a_file,
        2,
        (r"plain.*: (not a directory|file exists)",),
        leaves=lambda ctx: [],
        after=_no_errno,
    ),
    Row(
        "sizes print in human units; inspect gives the flushed-scale total",
        _sizes_printed,
        0,
        (),
        leaves=lambda ctx: [],
        after=_human_sizes,
    ),
    Row(
        "inspect flags a manifest path verify rejects (..)",
        _manifest_path("../escape.json"),
        2,
        (r"\.\./escape\.json",),
        leaves=lambda ctx: [ctx.path("art")],
    ),
    Row(
        "inspect flags an absolute manifest path",
        _manifest_path("/etc/passwd"),
        2,
        (r"/etc/passwd",),
        leaves=lambda ctx: [ctx.path("art")],
    ),
    Row(
        "inspect flags a listed file that is a symlink out of the artifact",
        _escaping_symlink,
        2,
        (r"model/config\.json", r"outside the artifact"),
        leaves=lambda ctx: [ctx.path("art")],
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


# -- the command line as a process: python -m, runtime-only install, progress on a terminal -------

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("huggingface_hub", "tqdm", "hf_xet", "httpx2")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (runtime-only install)", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""
"""A sitecustomize that makes the [convert] extra's modules unimportable: a runtime-only install
(`pip install moepack`) without building a second environment."""


def _process(
    args: list[str], env: dict[str, str] | None = None, stderr: int | None = None
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE",)}
    full.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "moepack", *args],
        env=full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def built(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "art"
    assert cli("convert", sources["sharded"], "--target", "sm120", "-o", out).code == 0
    return out


def test_python_dash_m_moepack(built: Path) -> None:
    res = _process(["--version"])
    assert res.returncode == 0 and res.stdout.startswith("moepack, version"), res.stderr
    res = _process(["verify", str(built)])
    assert res.returncode == 0 and res.stdout.startswith("OK:"), res.stdout + res.stderr


def test_runtime_only_install_verifies_and_inspects(built: Path, tmp_path: Path) -> None:
    """Runtime-only install simulated by blocking huggingface_hub, tqdm (and their helpers) at
    import time in the child process."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {"PYTHONPATH": path}
    probe = subprocess.run(
        [sys.executable, "-c", "import tqdm"], env=os.environ | env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "runtime-only install" in probe.stderr  # the block holds
    for args in (["--help"], ["verify", str(built)], ["inspect", str(built)], ["recipes"]):
        res = _process(args, env)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
    res = _process(["convert", "nvidia/foo", "--target", "sm120", "-o", str(tmp_path / "o")], env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "pip install 'moepack[convert]'" in res.stderr
    assert not (tmp_path / "o").exists()


def test_quiet_and_no_progress_on_every_command(ctx: Ctx) -> None:
    for command in ("convert", "verify", "inspect", "recipes", "demo"):
        res = cli(command, "--help")
        assert "--quiet" in res.stdout and "--no-progress" in res.stdout, command
    out = ctx.path("out")
    res = cli("convert", ctx.ckpt, "--target", "sm120", "-o", out, "--quiet", "--no-progress")
    assert res.code == 0 and res.stdout == "" and res.stderr == "", res
    res = cli("verify", out, "-q")
    assert res.code == 0 and res.stdout == "", res
    assert cli("inspect", out, "--no-progress").stdout.startswith("moepack artifact")
    # A failed check still says what failed under --quiet.
    layer = out / "moe" / "layer-00001.safetensors"
    layer.write_bytes(layer.read_bytes()[:-1] + b"\x01")
    res = cli("verify", out, "--quiet")
    assert res.code == 1 and "layer-00001.safetensors" in res.stdout


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run with stderr on a pseudo-terminal (what a user watching sees) and return it; the
    terminal is read while the child runs (Linux drops unread pty output once it exits)."""
    pty = pytest.importorskip("pty")
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    master, slave = pty.openpty()
    # A real terminal has a size; tqdm draws nothing on a 0-column one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once the child's side is closed
            while data := os.read(master, 65536):
                chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        res = _process(args, env, stderr=slave)
    finally:
        os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    assert res.returncode == 0, res.stdout
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    "how",
    [
        {},
        {"env": {"TQDM_DISABLE": "1"}},
        {"env": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}},
        {"args": ["--no-progress"]},
        {"args": ["--quiet"]},
    ],
    ids=[
        "terminal",
        "TQDM_DISABLE=1",
        "HF_HUB_DISABLE_PROGRESS_BARS=1",
        "--no-progress",
        "--quiet",
    ],
)
@pytest.mark.parametrize("command", ["verify", "convert"])
def test_progress_bars_on_a_terminal(
    built: Path, ctx: Ctx, command: str, how: dict[str, Any]
) -> None:
    """verify's hashing bar and convert's layer bar, each with every way to turn it off."""
    if command == "verify":
        args, bar = ["verify", str(built)], "sha256"
    else:
        args = ["convert", str(ctx.ckpt), "--target", "sm120", "-o", str(ctx.path("out"))]
        bar = "convert"
    seen = _stderr_on_a_terminal([*args, *how.get("args", [])], how.get("env", {}))
    if how:
        assert f"{bar}:" not in seen, seen
    else:
        assert f"{bar}:" in seen, seen  # the bar the other rows turn off is there by default


SLOW_SECOND_LAYER = """
import pathlib, signal, sys, time
from moepack.convert import pipeline
from moepack.cli import main

# Ctrl-C reaches a foreground process; one started with SIGINT ignored (a background job of a
# non-interactive shell, as a CI runner may start pytest) would keep ignoring it.
signal.signal(signal.SIGINT, signal.default_int_handler)
ready, calls, real = pathlib.Path(sys.argv[1]), [], pipeline.convert_layer

def convert_layer(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # layer 1 is converted and being written: a user presses Ctrl-C now
        ready.write_text("converting layer 3")
        # Busy for up to 120 s, as a conversion is: back in the interpreter every 50 ms. One
        # time.sleep(120) is not: a SIGINT handled just before it starts waits it out.
        end = time.monotonic() + 120
        while time.monotonic() < end:
            time.sleep(0.05)
    return real(*args, **kwargs)

pipeline.convert_layer = convert_layer
main(sys.argv[2:], prog_name="moepack")
"""


def test_real_ctrl_c_exits_130_and_keeps_finished_layers(ctx: Ctx) -> None:
    """A real SIGINT (what Ctrl-C sends) while layer 3 is converted and layer 1 written."""
    script, ready, out = ctx.path("child.py"), ctx.path("ready"), ctx.path("out")
    script.write_text(SLOW_SECOND_LAYER)
    args = ["convert", str(ctx.ckpt), "--target", "sm120", "-o", str(out)]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ready), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never reached layer 3"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    assert "interrupted: kept 1 of 2 finished MoE layers (1)" in stderr, stderr
    assert not verifies_complete(out)
    assert not (out / LOCK).exists() and not list(out.rglob("*.moepack-tmp"))
    res = cli(*args[:-2], "-o", out, "--json")  # the rerun resumes: layer 1 kept, checked
    summary = json.loads(res.stdout)
    assert res.code == 0 and summary["kept_layers"] == 1 and verifies_complete(out)


def test_two_real_conversions_into_one_directory(ctx: Ctx) -> None:
    """Two conversions at once (threads of one process: flock locks conflict between open
    files, as between processes). The second is refused naming the holder; the first
    finishes and verifies."""
    from moepack.convert import pipeline

    out = ctx.path("out")
    converting, release = threading.Event(), threading.Event()
    real = pipeline.convert_layer

    def convert_layer(*args: Any, **kwargs: Any) -> Any:
        converting.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    ctx.monkeypatch.setattr(pipeline, "convert_layer", convert_layer)
    first: dict[str, Any] = {}

    def run_first() -> None:
        try:
            first["summary"] = pipeline.convert_checkpoint(ctx.ckpt, out)
        except BaseException as exc:  # reported by the assertion below
            first["error"] = exc

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert converting.wait(60)
        second = cli("convert", ctx.ckpt, "--target", "sm120", "-o", out)
    finally:
        release.set()
        thread.join(120)
    assert second.code == 2 and "Traceback" not in second.stderr, second
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in second.stderr, second.stderr
    assert "error" not in first, first
    assert first["summary"]["moe_layers"] == 2 and verifies_complete(out)
