"""Page-cache control shared by the benchmarks: what "cold" means in every table."""

from __future__ import annotations

import os
from pathlib import Path


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages: fsync first (only clean pages can be dropped), then
    posix_fadvise(DONTNEED). Per file, so it needs no root and touches nothing else."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
