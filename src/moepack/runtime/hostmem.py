"""Host-memory helpers for the loader: read-only file mappings, page-cache residency, and CUDA
registration of mapped file pages.

Why: a warm load through pinned staging buffers copies every byte twice on the host (page cache
-> pinned buffer by `preadv`, then pinned buffer -> device by DMA). Registering the mapped page
cache pages with CUDA (`cudaHostRegister(..., cudaHostRegisterReadOnly)`) lets the DMA engine
read them where they are. Whether that is faster depends on what pinning pages costs on the
machine, so the loader measures nothing itself: `benchmarks/load.py` times both paths.

Everything here goes through libc with ctypes (Linux; other platforms get `None` from `libc()`
and the loader keeps its portable path).
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import torch

from moepack.libc import libc

PAGE = mmap.PAGESIZE
SAMPLE_WINDOWS = 256
WINDOW_PAGES = 16
"""`resident_fraction` samples ranges larger than SAMPLE_WINDOWS x WINDOW_PAGES pages."""
CUDA_HOST_REGISTER_READ_ONLY = 0x08
"""`cudaHostRegisterReadOnly`: the pages are only read by the device (needed for PROT_READ)."""


class Mapping:
    """A read-only shared mapping of a whole file; `array(start, n)` exposes bytes as numpy
    without copying. Closing unmaps; arrays handed out must be dropped first."""

    def __init__(self, fd: int, size: int) -> None:
        lib = libc()
        if lib is None or size == 0:
            raise OSError("no mmap through libc here")
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap failed: {os.strerror(err)}")
        self.addr: int = addr
        self.size = size

    def array(self, start: int, n: int) -> np.ndarray:
        buf = (ctypes.c_uint8 * n).from_address(self.addr + start)
        return np.ctypeslib.as_array(buf)

    def advise(self, start: int, n: int, advice: int) -> None:
        lib = libc()
        lo = start // PAGE * PAGE
        if lib is not None:
            lib.madvise(self.addr + lo, start + n - lo, advice)

    def resident_fraction(self, start: int = 0, n: int | None = None) -> float:
        """Share of the range's pages in the page cache (mincore); 0.0 if it cannot tell.

        A range of more than `SAMPLE_WINDOWS x WINDOW_PAGES` pages is sampled: that many
        evenly spaced windows of `WINDOW_PAGES` pages. mincore looks every page up in the page
        cache: the whole of a 1.85 GB layer file took 45-60 ms on the dev box, as long as a warm
        load of it on the H200 host; 4096 sampled pages tell cached from not in well under 1 ms
        (the loader only asks whether less than half is cached)."""
        lib = libc()
        n = self.size - start if n is None else n
        lo = start // PAGE * PAGE
        length = start + n - lo
        pages = -(-length // PAGE)
        if lib is None or pages == 0:
            return 0.0
        if pages <= SAMPLE_WINDOWS * WINDOW_PAGES:
            windows = [(0, pages)]
        else:
            step = (pages - WINDOW_PAGES) / (SAMPLE_WINDOWS - 1)
            windows = [(round(i * step), WINDOW_PAGES) for i in range(SAMPLE_WINDOWS)]
        resident = total = 0
        for first, count in windows:
            vec = (ctypes.c_ubyte * count)()
            span = min(count * PAGE, length - first * PAGE)
            if lib.mincore(self.addr + lo + first * PAGE, span, vec) != 0:
                return 0.0
            resident += int((np.frombuffer(memoryview(vec).cast("B"), dtype=np.uint8) & 1).sum())
            total += count
        return resident / total

    def close(self) -> None:
        lib = libc()
        if self.addr and lib is not None:
            lib.munmap(self.addr, self.size)
        self.addr = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resident_fraction(path: os.PathLike[str] | str, start: int = 0, n: int | None = None) -> float:
    """Share of a file range already in the page cache: decides buffered vs O_DIRECT reads
    (0.0 when it cannot tell, e.g. an unreadable file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0.0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        with Mapping(fd, size) as m:
            return m.resident_fraction(start, n)
    except OSError:
        return 0.0
    finally:
        os.close(fd)


def cuda_register(addr: int, n: int) -> bool:
    """Page-lock `[addr, addr + n)` (mapped file pages, read-only) for direct DMA; False if the
    driver refuses (then the caller stages the bytes instead)."""
    rt = torch.cuda.cudart()
    err = rt.cudaHostRegister(addr, n, CUDA_HOST_REGISTER_READ_ONLY)
    if int(getattr(err, "value", err)) != 0:
        _clear_last_error()
        return False
    return True


def _clear_last_error() -> None:
    """A refused registration leaves the runtime's last-error set, which torch's next kernel
    launch check would report as its own failure: read it off (cudaGetLastError)."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


def cuda_unregister(addr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(addr)
