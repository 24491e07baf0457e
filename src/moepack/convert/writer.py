"""Crash-safe file writing: aligned safetensors with the sha256 taken as bytes go out.

Every file is written under a temporary name in its final directory, fsynced, then renamed, so a
killed conversion never leaves a file under its real name that is shorter than it should be.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from moepack import sha256chain
from moepack.format import ALIGNMENT, DTYPE_SIZES, PAD_PREFIX
from moepack.runtime.dtypes import TORCH_DTYPES

from .outdir import disk_full

TMP_SUFFIX = ".moepack-tmp"
COPY_CHUNK = 16 << 20

_ST_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass
class WrittenFile:
    """What the manifest records of a file: size, sha256 and (safetensors only) its tensors."""

    path: str
    size: int
    sha256: str
    tensors: dict[str, dict[str, Any]] | None = field(default=None)
    chain: list[str] = field(default_factory=list)
    """SHA-256 states every `sha256chain.CHUNK` bytes (format v2); empty for one-chunk files."""

    def record(self, kind: str) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "path": self.path,
            "kind": kind,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.tensors is not None:
            rec["tensors"] = self.tensors
        if self.chain:
            rec["sha256_chain"] = {"chunk_size": sha256chain.CHUNK, "states": list(self.chain)}
        return rec


def new_digest() -> Any:
    """A sha256 that also records its chain states when libcrypto allows (`sha256chain`)."""
    return sha256chain.Chain() if sha256chain.available() else hashlib.sha256()


def chain_of(digest: Any) -> list[str]:
    return list(getattr(digest, "states", []))


class _Hasher:
    """sha256 in a helper thread, fed the same buffers the caller writes: sha256 and the disk each
    run at a GB/s or two, so overlapped they take the longer of the two, not the sum. Entered
    before the file (and left after it), so the file's fsync overlaps the hashing too. Buffers
    must not change after `update` (tensor views and fresh `bytes` do not)."""

    def __init__(self) -> None:
        self._h = new_digest()
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._h.update(chunk)

    def update(self, data: bytes | memoryview) -> None:
        self._queue.put(data)

    def __enter__(self) -> _Hasher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def chain(self) -> list[str]:
        return chain_of(self._h)


class _NoHasher:
    """Stands in for `_Hasher` when the caller hashes the file later (from the page cache)."""

    def update(self, data: bytes | memoryview) -> None:
        pass

    def __enter__(self) -> _NoHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def hexdigest(self) -> str:
        return ""

    def chain(self) -> list[str]:
        return []


class _Sink:
    """Where a file's bytes go: the file, the hasher, and a byte count (reported to `progress`
    after each write, once the bytes are in the page cache)."""

    def __init__(
        self,
        f: BinaryIO,
        hasher: _Hasher | _NoHasher,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.f, self.hasher, self.size, self.progress = f, hasher, 0, progress

    def write(self, data: bytes | memoryview) -> None:
        self.hasher.update(data)
        self.f.write(data)
        self.size += len(data)
        if self.progress is not None:
            self.f.flush()
            self.progress(self.size)


@contextmanager
def atomic_open(
    final: Path, size: int | None = None, deferred: list[Callable[[], None]] | None = None
) -> Iterator[BinaryIO]:
    """Yield a binary file at a temporary name; on success fsync it and rename it to `final`.

    A full disk (ENOSPC, EDQUOT) becomes a `DiskSpaceError` naming `final` and its `size`
    (when the caller knows it) instead of bare errno text; the temporary file is removed.
    With `deferred`, the fsync and rename are appended to it as one callable instead of run here
    (same order, same errors): the caller can write the next file while this one reaches disk.
    """
    tmp = final.with_name(final.name + TMP_SUFFIX)
    with _removed_on_failure(tmp, final, size):
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if deferred is None:
                os.fsync(f.fileno())
        if deferred is not None:
            deferred.append(lambda: _finish(tmp, final, size))
            return
        os.replace(tmp, final)
        _fsync_dir(final.parent)


@contextmanager
def _removed_on_failure(tmp: Path, final: Path, size: int | None) -> Iterator[None]:
    """On any failure remove the temporary file, so nothing half-written stays behind; a full
    disk (ENOSPC, EDQUOT) becomes a `DiskSpaceError` naming `final`."""
    try:
        yield
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(final, size, exc) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finish(tmp: Path, final: Path, size: int | None) -> None:
    """The end of `atomic_open` for a file written with `deferred`: fsync, rename, fsync dir."""
    with _removed_on_failure(tmp, final, size):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # fsync is per file: this fd flushes what the writer's fd wrote
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Blob:
    """A tensor to write: its safetensors dtype and shape, and its bytes as a chunk iterator.

    Lets pass-through tensors go from a source file to the artifact as raw byte ranges, in any
    dtype, without materializing them in torch.
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[bytes | memoryview]]

    @classmethod
    def of(cls, t: torch.Tensor) -> Blob:
        flat = t.detach().contiguous().reshape(-1)
        view = flat.view(torch.uint8).numpy().data.cast("B") if flat.numel() else b""
        return cls(_ST_DTYPES[t.dtype], tuple(t.shape), len(view), lambda: (view,))

    @classmethod
    def file_range(
        cls, path: Path, dtype: str, shape: tuple[int, ...], start: int, end: int
    ) -> Blob:
        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start
                while left:
                    block = f.read(min(left, COPY_CHUNK))
                    if not block:
                        raise OSError(f"{path}: ends before byte {end}")
                    left -= len(block)
                    yield block

        return cls(dtype, shape, end - start, chunks)


def safetensors_header(
    blobs: Iterable[tuple[str, Blob]], metadata: dict[str, str] | None = None, align: bool = True
) -> tuple[bytes, list[tuple[str, Blob | int]]]:
    """Header bytes (length prefix included) and the data plan.

    With `align`, every tensor starts 4 KiB aligned: the plan lists `(name, blob)` in file order
    with `(pad_name, nbytes)` fillers where a tensor's end is not aligned, and the header is
    padded with spaces so data starts aligned too. Without it (pass-through shards, which other
    loaders read and must not see fillers in), tensors are packed and the header padded to 8.
    """
    boundary = ALIGNMENT if align else 1
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    plan: list[tuple[str, Blob | int]] = []
    offset = 0
    pads = 0
    for name, blob in blobs:
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {name!r} uses the reserved prefix {PAD_PREFIX!r}")
        gap = -offset % boundary
        if gap:
            pad = f"{PAD_PREFIX}{pads}"
            pads += 1
            entries[pad] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            plan.append((pad, gap))
            offset += gap
        entries[name] = {
            "dtype": blob.dtype,
            "shape": list(blob.shape),
            "data_offsets": [offset, offset + blob.nbytes],
        }
        plan.append((name, blob))
        offset += blob.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    header_len = len(body) + (-(8 + len(body)) % (ALIGNMENT if align else 8))
    header = header_len.to_bytes(8, "little") + body + b" " * (header_len - len(body))
    return header, plan


TensorList = (
    list[tuple[str, torch.Tensor]] | list[tuple[str, Blob]] | list[tuple[str, torch.Tensor | Blob]]
)
"""What `write_safetensors` takes: a list (it may empty it, `release=True`) of named tensors."""


def write_safetensors(
    root: Path,
    relpath: str,
    tensors: TensorList,
    metadata: dict[str, str] | None = None,
    align: bool = True,
    *,
    release: bool = False,
    digest: bool = True,
    deferred: list[Callable[[], None]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> WrittenFile:
    """Write a safetensors file atomically, hashing as it goes (no second read).

    `release=True` hands the list over: it is emptied, and each tensor is dropped as soon as it
    is written, so a file written in the background frees its memory as it goes.
    `digest=False` skips the hash (`sha256` is "") for a caller that hashes the finished file
    itself: memory is then freed at the disk's pace, not sha256's, and several files can be
    hashed at once on other cores. `progress(n)` is called after each write with the bytes
    written so far (the temporary file, `final + TMP_SUFFIX`, holds them): a reader of the
    file may follow the writer.
    """
    blobs = [(n, t if isinstance(t, Blob) else Blob.of(t)) for n, t in tensors]
    if release:
        tensors.clear()
    header, plan = safetensors_header(blobs, metadata, align)
    del blobs
    listing = json.loads(header[8:].decode())
    listing.pop("__metadata__", None)
    zeros = bytes(ALIGNMENT)
    size = len(header) + sum(i if isinstance(i, int) else i.nbytes for _, i in plan)
    with (
        _Hasher() if digest else _NoHasher() as hasher,
        atomic_open(root / relpath, size, deferred) as f,
    ):
        out = _Sink(f, hasher, progress)
        out.write(header)
        for i, (name, item) in enumerate(plan):
            if isinstance(item, int):
                out.write(zeros[:item])
                continue
            for chunk in item.chunks():
                out.write(chunk)
            if release:
                plan[i] = (name, 0)
    return WrittenFile(relpath, out.size, hasher.hexdigest(), listing, hasher.chain())


def copy_file(src: Path, root: Path, relpath: str) -> WrittenFile:
    """Copy a pass-through file byte for byte, atomically, hashing as it goes."""
    size = os.stat(src).st_size
    with open(src, "rb") as fin, _Hasher() as hasher, atomic_open(root / relpath, size) as f:
        out = _Sink(f, hasher)
        while block := fin.read(COPY_CHUNK):
            out.write(block)
    return WrittenFile(relpath, out.size, hasher.hexdigest(), None, hasher.chain())


def write_json(root: Path, relpath: str, obj: Any) -> WrittenFile:
    """Write JSON atomically (insertion order kept: the manifest's key order is part of the spec)."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    with atomic_open(root / relpath, len(data)) as f:
        f.write(data)
    return WrittenFile(relpath, len(data), hashlib.sha256(data).hexdigest())


def planned_safetensors_size(
    specs: Iterable[tuple[str, str, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
    align: bool = True,
) -> int:
    """The exact size `write_safetensors` gives a file of these `(name, dtype, shape)` tensors,
    without any data (the free-space check plans with it)."""
    blobs = []
    for name, dtype, shape in specs:
        nbytes = DTYPE_SIZES[dtype]
        for dim in shape:
            nbytes *= dim
        blobs.append((name, Blob(dtype, tuple(shape), nbytes, tuple)))
    header, plan = safetensors_header(blobs, metadata, align)
    return len(header) + sum(i if isinstance(i, int) else i.nbytes for _, i in plan)
