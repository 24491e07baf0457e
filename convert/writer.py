"""Crash-safe file writing: aligned safetensors with the sha256 taken as bytes go out.

Every file is written under a temporary name in its final directory, fsynced, then renamed, so a
killed conversion never leaves a file under its real name that is shorter than it should be.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from moepack.runtime.format import ALIGNMENT, PAD_PREFIX, aligned

TMP_SUFFIX = ".moepack-tmp"

_ST_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.bool: "BOOL",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.float64: "F64",
}


@dataclass
class WrittenFile:
    """What the manifest records of a file: size, sha256 and (safetensors only) its tensors."""

    path: str
    size: int
    sha256: str
    tensors: dict[str, dict[str, Any]] | None = field(default=None)

    def record(self, kind: str) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "path": self.path,
            "kind": kind,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.tensors is not None:
            rec["tensors"] = self.tensors
        return rec


class _HashingWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.h.update(data)
        self.size += len(data)


@contextmanager
def atomic_open(final: Path):
    """Yield a binary file at a temporary name; on success fsync it and rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def safetensors_header(
    tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[str, torch.Tensor | int]]]:
    """Header bytes (length prefix included) and the data plan, every tensor 4 KiB aligned.

    The plan lists `(name, tensor)` in file order, with `(pad_name, nbytes)` fillers where a
    tensor's end is not aligned; the header is padded with spaces so data starts aligned too.
    """
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    plan: list[tuple[str, torch.Tensor | int]] = []
    offset = 0
    pads = 0
    for name, t in tensors:
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {name!r} uses the reserved prefix {PAD_PREFIX!r}")
        gap = aligned(offset) - offset
        if gap:
            pad = f"{PAD_PREFIX}{pads}"
            pads += 1
            entries[pad] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            plan.append((pad, gap))
            offset += gap
        nbytes = t.numel() * t.element_size()
        entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        plan.append((name, t))
        offset += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    header_len = aligned(8 + len(body)) - 8
    header = header_len.to_bytes(8, "little") + body + b" " * (header_len - len(body))
    return header, plan


def write_safetensors(
    root: Path,
    relpath: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> WrittenFile:
    """Write an aligned safetensors file atomically, hashing as it goes (no second read)."""
    header, plan = safetensors_header(tensors, metadata)
    listing = json.loads(header[8:].decode())
    listing.pop("__metadata__", None)
    zeros = bytes(ALIGNMENT)
    with atomic_open(root / relpath) as f:
        out = _HashingWriter(f)
        out.write(header)
        for _, item in plan:
            if isinstance(item, int):
                out.write(zeros[:item])
            elif item.numel():
                out.write(_tensor_bytes(item))
    return WrittenFile(relpath, out.size, out.h.hexdigest(), listing)


def copy_file(src: Path, root: Path, relpath: str, chunk: int = 16 << 20) -> WrittenFile:
    """Copy a pass-through file byte for byte, atomically, hashing as it goes."""
    with open(src, "rb") as fin, atomic_open(root / relpath) as f:
        out = _HashingWriter(f)
        while block := fin.read(chunk):
            out.write(block)
    return WrittenFile(relpath, out.size, out.h.hexdigest())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys would reorder the manifest: insertion order is kept)."""
    with atomic_open(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())
