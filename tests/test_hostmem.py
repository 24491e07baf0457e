"""Host-memory helpers the loader uses to choose and feed its read path (CPU-checkable parts)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from moepack.runtime import hostmem

pytestmark = pytest.mark.skipif(hostmem.libc() is None, reason="needs libc mmap/mincore")


def test_mapping_exposes_file_bytes_without_copy(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * hostmem.PAGE + 123, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        with hostmem.Mapping(fd, path.stat().st_size) as m:
            assert np.array_equal(m.array(0, len(data)), data)
            assert np.array_equal(m.array(hostmem.PAGE + 7, 500), data[hostmem.PAGE + 7 :][:500])
            assert m.resident_fraction() == 1.0  # just written: in the page cache
    finally:
        os.close(fd)


def test_resident_fraction_of_a_cached_range(tmp_path):
    path = tmp_path / "g.bin"
    path.write_bytes(os.urandom(8 * hostmem.PAGE))
    path.read_bytes()
    assert hostmem.resident_fraction(path) == 1.0
    assert hostmem.resident_fraction(path, hostmem.PAGE, 2 * hostmem.PAGE) == 1.0
    assert hostmem.resident_fraction(tmp_path / "missing.bin") == 0.0


def test_resident_fraction_sampled_agrees_with_every_page(tmp_path, monkeypatch):
    """A large range is sampled (few windows): same answer as looking at every page, for a file
    all cached, half dropped, and a range inside it."""
    path = tmp_path / "h.bin"
    pages = 1024
    path.write_bytes(os.urandom(pages * hostmem.PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        path.read_bytes()
        half = pages // 2 * hostmem.PAGE
        os.posix_fadvise(fd, half, half, os.POSIX_FADV_DONTNEED)
        with hostmem.Mapping(fd, pages * hostmem.PAGE) as m:
            exact = m.resident_fraction()
            inner = m.resident_fraction(half // 2, half)
            monkeypatch.setattr(hostmem, "SAMPLE_WINDOWS", 32)
            monkeypatch.setattr(hostmem, "WINDOW_PAGES", 4)
            assert abs(m.resident_fraction() - exact) < 0.1
            assert abs(m.resident_fraction(half // 2, half) - inner) < 0.15
            assert m.resident_fraction(0, half) == 1.0
    finally:
        os.close(fd)
