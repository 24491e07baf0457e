"""`moepack verify`: prove that an artifact's bytes are the ones that were converted.

Artifacts travel between machines, disks and object stores before they are served, and a flipped
bit in a scale byte serves wrong answers silently. This module runs the format's one validator
(`moepack.format.validate`: manifest schema and types, path containment, sizes, every safetensors
header against the manifest and every layer file against the specs its geometry implies; the
same checks `load` and `inspect` use) and adds every file's sha256, streamed and parallel across
files. Every fault becomes a `Problem`; nothing raises. No torch: verify starts fast.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moepack import sha256chain
from moepack.format.manifest import FileRecord, Manifest
from moepack.format.validate import (
    SCHEMA_PATH,
    Problem,
    check_file,
    chunks_of,
    extra_files,
    manifest_errors,
    manifest_problems,
    schema_errors,
    unsafe_path,
)
from moepack.sizes import human_bytes

__all__ = [
    "SCHEMA_PATH",
    "Problem",
    "VerifyReport",
    "manifest_errors",
    "schema_errors",
    "sha256_file",
    "unsafe_path",
    "verify_artifact",
]


@dataclass
class VerifyReport:
    """The verdict on one artifact; `exit_code` is what `moepack verify` returns."""

    root: str
    quick: bool
    problems: list[Problem] = field(default_factory=list)
    unusable: bool = False
    files_checked: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when everything holds, 1 on any mismatch, 2 when the artifact cannot be used at all."""
        if self.unusable:
            return 2
        return 1 if self.problems else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "unusable": self.unusable,
            "quick": self.quick,
            "files_checked": self.files_checked,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "problems": [asdict(p) for p in self.problems],
        }

    def stats(self) -> str:
        """What was checked, in how long (sizes for people: never `0.00 GB`)."""
        if self.quick:
            return f"{self.files_checked} files checked in {self.seconds:.1f} s, quick: sizes and headers only"
        rate = self.bytes_hashed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.files_checked} files, {human_bytes(self.bytes_hashed)} hashed in "
            f"{self.seconds:.1f} s ({human_bytes(rate)}/s)"
        )

    def format_text(self) -> str:
        lines = [f"  {p}" for p in self.problems]
        stats = self.stats()
        if self.unusable:
            head = f"UNUSABLE: {self.root} is not a usable moepack artifact"
        elif self.problems:
            head = f"FAILED: {self.root}: {len(self.problems)} problem(s); {stats}"
        else:
            head = f"OK: {self.root}; {stats}"
        return "\n".join([head, *lines])


# ---------------------------------------------------------------------------------------------
# Per-file checks


class _Progress:
    """A byte counter shared by hashing threads, drawn with tqdm on stderr when available."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.lock = threading.Lock()
        self.done = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr, leave=False
            )

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sha256_chain_file(path: Path) -> tuple[str, list[str]]:
    """A file's sha256 and its format-v2 chain states (`moepack.sha256chain`; empty where
    libcrypto's SHA256 functions are missing or the file is one chunk)."""
    if not sha256chain.available():
        return sha256_file(path), []
    h = sha256chain.Chain()
    fd = os.open(path, os.O_RDONLY)
    try:
        for piece in sha256chain.file_pieces(fd, 0, os.fstat(fd).st_size, path):
            h.update(piece)
    finally:
        os.close(fd)
    return h.hexdigest(), h.states


def _chunk_pieces(
    path: Path, progress: _Progress | None
) -> Callable[[int, int], Iterator[sha256chain.Region | memoryview]]:
    """`reader(offset, n)` for `sha256chain.check_chunk`: the range's bytes, mapped where they
    can be (hashed in place), else read (`sha256chain.file_pieces`)."""

    def reader(offset: int, n: int) -> Iterator[sha256chain.Region | memoryview]:
        fd = os.open(path, os.O_RDONLY)
        try:
            for piece in sha256chain.file_pieces(fd, offset, n, path):
                yield piece
                if progress is not None:
                    progress.add(len(piece))
        finally:
            os.close(fd)

    return reader


def sha256_file(path: Path, progress: _Progress | None = None) -> str:
    """Stream `path` through sha256, mapped where it can be (`sha256chain.file_pieces`: no copy
    of page-cached bytes), else in large reads (hashlib drops the GIL either way)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for piece in sha256chain.file_pieces(fd, 0, os.fstat(fd).st_size, path):
            data = piece.view() if isinstance(piece, sha256chain.Region) else piece
            h.update(data)
            del data
            if progress is not None:
                progress.add(len(piece))
    finally:
        os.close(fd)
    return h.hexdigest()


@dataclass
class _Context:
    root: Path
    manifest: Manifest
    quick: bool
    progress: _Progress
    chunks: ThreadPoolExecutor | None = None
    """Hashes the chunks of files with a `sha256_chain` (format v2), all files' chunks at once."""


def _check_file(ctx: _Context, rec: FileRecord) -> tuple[list[Problem], int]:
    """Every check of one listed file (the validator's, then the hash); problems, bytes hashed."""
    check = check_file(ctx.root, ctx.manifest, rec)
    if ctx.quick or not check.readable:
        return check.problems, 0
    try:
        if rec.sha256_chain is not None and ctx.chunks is not None and sha256chain.available():
            bad = _failed_chunks(ctx, rec)
            if bad:
                chunk = rec.sha256_chain.chunk_size
                lo, hi = bad[0] * chunk, min(rec.size, (bad[0] + 1) * chunk)
                check.problems.append(
                    Problem(
                        rec.path,
                        None,
                        f"sha256: expected {rec.sha256}, found other bytes in {len(bad)} of "
                        f"{chunks_of(rec.size, chunk)} chunks (first: bytes [{lo}, {hi}))",
                    )
                )
            return check.problems, check.size or 0
        digest = sha256_file(ctx.root / rec.path, ctx.progress)
    except OSError as exc:
        return [*check.problems, Problem(rec.path, None, f"cannot read: {exc.strerror or exc}")], 0
    if digest != rec.sha256:
        check.problems.append(
            Problem(rec.path, None, f"sha256: expected {rec.sha256}, found {digest}")
        )
    return check.problems, check.size or 0


def _failed_chunks(ctx: _Context, rec: FileRecord) -> list[int]:
    """Indices of the chunks of `rec` that do not lead from one recorded SHA-256 state to the
    next (the last one to the file's sha256), every chunk checked on the chunk pool at once."""
    assert rec.sha256_chain is not None and ctx.chunks is not None
    chain = rec.sha256_chain
    reader = _chunk_pieces(ctx.root / rec.path, ctx.progress)
    states = list(chain.states)
    count = chunks_of(rec.size, chain.chunk_size)
    futures = [
        ctx.chunks.submit(
            sha256chain.check_chunk, reader, states, rec.sha256, chain.chunk_size, i, rec.size
        )
        for i in range(count)
    ]
    return [i for i, fut in enumerate(futures) if not fut.result()]


# ---------------------------------------------------------------------------------------------
# Entry point


def verify_artifact(
    root: Path, *, quick: bool = False, jobs: int | None = None, progress: bool = False
) -> VerifyReport:
    """Check the artifact at `root`; `quick` skips hashing; `jobs` threads hash files in parallel."""
    root = Path(root)
    started = time.perf_counter()
    report = VerifyReport(root=str(root), quick=quick)
    try:
        _verify(root, report, jobs, progress)
    except Exception as exc:  # a bug here must still give a verdict, never a traceback
        report.problems.append(Problem(None, None, f"internal error: {type(exc).__name__}: {exc}"))
        report.unusable = True
    report.seconds = time.perf_counter() - started
    return report


def _verify(root: Path, report: VerifyReport, jobs: int | None, progress: bool) -> None:
    manifest, problems = manifest_problems(root)
    report.problems += problems
    if manifest is None:
        report.unusable = True
        return
    records = sorted(manifest.files, key=lambda r: -r.size)  # biggest first: balance
    bar = _Progress(0 if report.quick else sum(r.size for r in records), progress)
    threads = max(1, jobs or os.cpu_count() or 1)
    workers = max(1, min(threads, len(records) or 1))
    try:
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moepack-chunk") as chunks,
        ):
            ctx = _Context(root, manifest, report.quick, bar, chunks)
            results = list(pool.map(lambda rec: _check_file(ctx, rec), records))
    finally:
        bar.close()
    by_path = dict(zip((r.path for r in records), results, strict=True))
    for rec in manifest.files:  # report in manifest order, not completion order
        file_problems, hashed = by_path[rec.path]
        report.problems += file_problems
        report.bytes_hashed += hashed
    report.files_checked = len(records)
    report.problems += extra_files(root, {r.path for r in records})
