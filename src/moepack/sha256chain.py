"""SHA-256 with its intermediate hash values recorded every `chunk` bytes, so that one large
file's sha256 can be checked on all cores.

A file's sha256 is one serial stream (about 1.1 GB/s on one core). SHA-256 processes 64-byte
blocks into a 32-byte state (FIPS 180-4, 6.2: the intermediate hash value H(i)); at a chunk
boundary that is a multiple of 64 bytes the state is all there is to know about the bytes before
it. The writer records the state after each chunk (it hashes the whole file anyway, so this costs
nothing). A verifier then checks every chunk independently, in parallel: start from the recorded
state before the chunk, feed the chunk, compare with the recorded state after it, the last chunk
ending in the file's ordinary sha256. Every byte and the whole-file digest are checked exactly,
as a serial sha256 would.

Setting a SHA-256 state needs the low-level `SHA256_*` functions of OpenSSL's libcrypto (the
library `hashlib` itself uses), reached with ctypes; where it cannot be loaded, `available()` is
False, files get no chain, and verification falls back to the serial whole-file sha256.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from moepack.libc import libc

CHUNK = 64 << 20
"""Bytes between recorded states (a multiple of SHA-256's 64-byte block)."""


class _Ctx(ctypes.Structure):
    """OpenSSL's `SHA256_CTX` (openssl/sha.h), stable since 0.9.8."""

    _fields_ = [
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    ]


@cache
def _lib() -> ctypes.CDLL | None:
    for name in (ctypes.util.find_library("crypto"), "libcrypto.so.3", "libcrypto.so.1.1"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.SHA256_Init.argtypes = [ctypes.POINTER(_Ctx)]
            lib.SHA256_Update.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_size_t]
            lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Ctx)]
        except (OSError, AttributeError):
            continue
        if _self_test(lib):
            return lib
    return None


def _self_test(lib: ctypes.CDLL) -> bool:
    """The struct layout and a resumed state must reproduce hashlib's digest."""
    data = bytes(range(256)) * 3
    try:
        first = Chain(64, lib)
        first.update(data[:192])  # states after 64 and 128 bytes (more data followed both)
        second = Chain(64, lib)
        second.resume(first.states[1], 128)
        second.update(data[128:])
        return second.hexdigest() == hashlib.sha256(data).hexdigest()
    except Exception:
        return False


def available() -> bool:
    return _lib() is not None


@dataclass(frozen=True)
class Region:
    """`n` bytes at address `addr` of a live mapping (`mapped`): hashed in place, no copy."""

    addr: int
    n: int

    def __len__(self) -> int:
        return self.n

    def view(self) -> memoryview:
        """The bytes as a buffer (for hashlib); valid only while the mapping is."""
        return memoryview((ctypes.c_char * self.n).from_address(self.addr)).cast("B")


MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
WINDOW = 8 << 20
"""Bytes mapped at a time by `file_pieces`: small, since mapped pages count as the process's
resident memory while they are mapped (convert hashes on several threads at once)."""
READ_BUFFER = 16 << 20


@contextlib.contextmanager
def mapped(fd: int, offset: int, n: int) -> Iterator[Region | None]:
    """`n` bytes of `fd` from `offset` (a multiple of the page size, inside the file) mapped
    read-only and populated, as a `Region`; None where no mapping can be made.

    Why: hashing page-cached bytes through `read` copies each byte once more than hashing them
    where they are; on the 16-core H200 host 16 threads hashed cached files at 7 GB/s through
    16 MiB reads and 14 GB/s through populated mappings (`benchmarks/machine_limits.py`).
    MAP_POPULATE maps the window's pages in one call instead of one fault per few pages."""
    lib = libc()
    if lib is None or n <= 0 or offset % mmap.PAGESIZE or not MAP_POPULATE:
        yield None
        return
    addr = lib.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED | MAP_POPULATE, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        yield None
        return
    try:
        yield Region(addr, n)
    finally:
        lib.munmap(addr, n)


def _will_need(fd: int, offset: int, n: int) -> None:
    if n > 0 and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)


def file_pieces(
    fd: int, offset: int, n: int, name: object = "file"
) -> Iterator[Region | memoryview]:
    """Bytes `[offset, offset + n)` of `fd`, in order: mapped `WINDOW`s while the range lies
    inside the file as it is now (a mapping past the end would fault), else positioned reads
    into one reused buffer. Each piece is valid only until the next one is asked for. Raises
    OSError if the file ends before `offset + n`."""
    end = offset + n
    pos = offset
    if end <= os.fstat(fd).st_size:
        _will_need(fd, pos, min(WINDOW, end - pos))
        while pos < end:
            take = min(WINDOW, end - pos)
            with mapped(fd, pos, take) as region:
                if region is None:
                    break
                # The next window is read ahead while this one is hashed (a cold file then
                # streams from the disk as with sequential reads; cached, the advice is cheap).
                _will_need(fd, pos + take, min(WINDOW, end - pos - take))
                yield region
            pos += take
    if pos < end:
        buf = bytearray(min(READ_BUFFER, end - pos))
        view = memoryview(buf)
        while pos < end:
            got = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
            if got == 0:
                raise OSError(f"{name}: ends before byte {end}")
            yield view[:got]
            pos += got


class Chain:
    """Incremental sha256 that records its state (hex, FIPS word order) after every `chunk`
    bytes; `states` then holds one entry per chunk boundary strictly inside the data."""

    def __init__(self, chunk: int | None = None, lib: ctypes.CDLL | None = None) -> None:
        chunk = CHUNK if chunk is None else chunk
        if chunk <= 0 or chunk % 64:
            raise ValueError(f"chunk {chunk} is not a positive multiple of 64")
        found = lib or _lib()
        if found is None:
            raise OSError("libcrypto's SHA256 functions are not available")
        self._lib: ctypes.CDLL = found
        self.chunk = chunk
        self.ctx = _Ctx()
        self._lib.SHA256_Init(ctypes.byref(self.ctx))
        self.offset = 0
        self.states: list[str] = []
        self._pending_boundary = False

    def resume(self, state_hex: str, offset: int) -> None:
        """Continue from a recorded state at byte `offset` (a multiple of 64)."""
        struct.pack_into("<8I", self.ctx.h, 0, *struct.unpack(">8I", bytes.fromhex(state_hex)))
        bits = offset * 8
        self.ctx.Nl, self.ctx.Nh = bits & 0xFFFFFFFF, bits >> 32
        self.offset = offset

    def _state(self) -> str:
        return struct.pack(">8I", *self.ctx.h).hex()

    def update(self, data: bytes | bytearray | memoryview | Region) -> None:
        if isinstance(data, Region):
            self._update_region(data)
            return
        view = memoryview(data).cast("B")
        while len(view):
            if self._pending_boundary:  # a boundary is recorded only once more data follows
                self.states.append(self._state())
                self._pending_boundary = False
            take = min(len(view), self.chunk - self.offset % self.chunk)
            part = view[:take]
            if part.readonly:  # bytes: copied once (headers, small blocks), pointer to the copy
                self._lib.SHA256_Update(ctypes.byref(self.ctx), ctypes.c_char_p(bytes(part)), take)
            else:  # tensors and read buffers: hashed in place
                buf = (ctypes.c_char * take).from_buffer(part)
                self._lib.SHA256_Update(ctypes.byref(self.ctx), buf, take)
                del buf
            self.offset += take
            view = view[take:]
            if self.offset % self.chunk == 0:
                self._pending_boundary = True

    def _update_region(self, region: Region) -> None:
        """`update` over mapped bytes: SHA256_Update reads them in place (no buffer object)."""
        addr, left = region.addr, region.n
        while left:
            if self._pending_boundary:
                self.states.append(self._state())
                self._pending_boundary = False
            take = min(left, self.chunk - self.offset % self.chunk)
            self._lib.SHA256_Update(ctypes.byref(self.ctx), ctypes.c_void_p(addr), take)
            self.offset += take
            addr += take
            left -= take
            if self.offset % self.chunk == 0:
                self._pending_boundary = True

    def hexdigest(self) -> str:
        out = ctypes.create_string_buffer(32)
        ctx = _Ctx.from_buffer_copy(self.ctx)
        self._lib.SHA256_Final(out, ctypes.byref(ctx))
        return out.raw.hex()


def check_chunk(
    data_reader: object, states: list[str], final: str, chunk: int, index: int, size: int
) -> bool:
    """Whether chunk `index` of a `size`-byte file leads from its recorded start state to its
    recorded end state (`final`, the file's sha256, for the last chunk). `data_reader(offset, n)`
    yields the chunk's bytes in pieces."""
    lib = _lib()
    if lib is None:
        raise OSError("libcrypto's SHA256 functions are not available")
    start = index * chunk
    end = min(size, start + chunk)
    c = Chain(chunk, lib)
    if index:
        c.resume(states[index - 1], start)
    for piece in data_reader(start, end - start):  # type: ignore[operator]
        c.update(piece)
    if end == size:
        return c.hexdigest() == final
    return c._state() == states[index]


def chunks_of(size: int, chunk: int) -> int:
    """How many chunks a `size`-byte file has (at least one)."""
    return max(1, -(-size // chunk))
