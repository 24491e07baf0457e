"""libc through ctypes, with the prototypes moepack calls: `mmap`/`munmap` (hashing mapped
page-cache bytes, `sha256chain`; loading, `runtime.hostmem`), `mincore` and `madvise`
(`runtime.hostmem`). Light on purpose: `moepack verify` imports it without torch or numpy."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def libc() -> ctypes.CDLL | None:
    """libc with those prototypes set, or None where there is no usable one (not Linux-like)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return lib
