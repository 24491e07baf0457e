"""Strict safetensors header parsing: the one place that trusts nothing in a file's first bytes.

Both `verify` and the loader need tensor offsets without loading data, and both must refuse a
hostile header (absurd length, offsets out of range or overlapping) with an error that names the
file instead of a traceback.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from moepack.errors import HeaderError

from .specs import DTYPE_SIZES

MAX_HEADER = 100 * 1024 * 1024
"""Upper bound on the JSON header size (the safetensors library uses the same limit)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: Path, file_size: int | None = None) -> Header:
    """Parse and validate the header of `path`; raise `HeaderError` naming the file on any fault."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = file_size if file_size is not None else f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            head += f.read(header_length(path, head, size))
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read: {exc}", path=path) from None
    return parse_header(path, head, size)


def header_length(path: Path, head: bytes, size: int) -> int:
    """The JSON header's length from a file's first 8 bytes (`head` may hold more), checked
    against the limit and the file's `size`."""
    if len(head) < 8:
        raise HeaderError(f"{path}: {len(head)} bytes, too short for a safetensors file", path=path)
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER or 8 + length > size:
        raise HeaderError(
            f"{path}: header length {length} exceeds the file ({size} bytes) or the limit",
            path=path,
        )
    return int(length)


def parse_header(path: Path, head: bytes, size: int) -> Header:
    """Parse and validate a header from the first bytes of a file of `size` bytes (`head` holds
    at least the length prefix and the JSON; from a local file or a ranged read of a remote
    one); `path` is the file the errors and the `Header` name."""
    length = header_length(path, head, size)
    raw = head[8 : 8 + length]
    if len(raw) < length:
        raise HeaderError(f"{path}: header cut short ({len(raw)} of {length} bytes)", path=path)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"{path}: header is not valid JSON: {exc}", path=path) from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is not a JSON object", path=path)
    data_start = 8 + length
    metadata = obj.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings", path=path)
    tensors = {name: _entry(path, name, info, data_start) for name, info in obj.items()}
    _check_extent(path, tensors, data_start, size)
    return Header(path=path, data_start=data_start, tensors=tensors, metadata=metadata)


def _entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise HeaderError(
            f"{path}: tensor {name!r}: entry is not an object", path=path, tensor=name
        )
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise HeaderError(
            f"{path}: tensor {name!r}: unknown dtype {dtype!r}", path=path, tensor=name
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HeaderError(
            f"{path}: tensor {name!r}: shape {shape!r} is not a list of sizes",
            path=path,
            tensor=name,
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise HeaderError(
            f"{path}: tensor {name!r}: bad data_offsets {offsets!r}", path=path, tensor=name
        )
    nbytes = DTYPE_SIZES[dtype]
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise HeaderError(
            f"{path}: tensor {name!r}: {dtype}{shape} needs {nbytes} bytes, "
            f"offsets span {offsets[1] - offsets[0]}",
            path=path,
            tensor=name,
            expected=nbytes,
            found=offsets[1] - offsets[0],
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_extent(path: Path, tensors: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """Tensors must tile the data region exactly: no overlap, no gap, nothing past the end."""
    cursor = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != cursor:
            what = "overlaps the previous tensor" if t.start < cursor else "leaves a gap before it"
            raise HeaderError(
                f"{path}: tensor {t.name!r} at offset {t.start} {what}", path=path, tensor=t.name
            )
        cursor = t.end
    if cursor != size:
        raise HeaderError(
            f"{path}: tensors end at byte {cursor} but the file has {size} bytes", path=path
        )
