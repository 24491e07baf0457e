"""The output directory of a conversion: whose it is, who is writing it, and whether it fits.

Rules, all checked before a byte of the artifact is written:

- `-o` must not be the source checkpoint, inside it, or contain it.
- The directory may hold only what moepack writes: its manifest, the files a manifest or an
  interrupted job's state lists, the files this job will write, and moepack's own leftovers
  (`.moepack-partial`, `*.moepack-tmp`, the lock). Anything else (a `notes.txt`) is refused,
  with or without `--overwrite`: a finished artifact holds no other files, so `verify` would
  reject the result, and `--overwrite` replaces only what moepack wrote.
- One conversion at a time: an exclusive `flock` on `.moepack-partial.lock`, which records the
  holder's pid, host and start time so that a second conversion can say who holds it.
- Free space: the bytes this job still has to write, plus a margin, must be available.
- A failed conversion leaves no empty directory behind (`prune_empty`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moepack.errors import ConvertError, DiskSpaceError
from moepack.sizes import human_bytes

LOCK = ".moepack-partial.lock"
"""Beside the partial state, not inside it (the state directory is removed while the lock is
held); its name contains `.moepack-partial`, so `verify` calls a stale one a leftover."""
PARTIAL_MARKERS = (".moepack-partial", ".moepack-tmp")
SPACE_MARGIN = 64 << 20
SPACE_MARGIN_FRACTION = 0.02
"""Free space asked for beyond the planned bytes: 64 MiB or 2%, whichever is more, plus the
largest single file (a file replaced in place needs its old and new copy at once)."""
LISTED_FOREIGN = 5


def check_not_source(out: Path, source: Path) -> None:
    """Refuse `-o` equal to, inside, or around the source checkpoint directory."""
    out_r, src_r = Path(out).resolve(), Path(source).resolve()
    if out_r == src_r:
        raise ConvertError(
            f"{out}: -o is the source checkpoint directory; choose a new or empty directory",
            path=out,
        )
    if out_r.is_relative_to(src_r):
        raise ConvertError(
            f"{out}: -o is inside the source checkpoint {source}; choose a directory outside it",
            path=out,
        )
    if src_r.is_relative_to(out_r):
        raise ConvertError(
            f"{out}: -o contains the source checkpoint {source}; choose a directory outside it",
            path=out,
        )


def _is_partial(rel: str) -> bool:
    return any(marker in rel for marker in PARTIAL_MARKERS)


def _files(root: Path) -> Iterable[str]:
    """Every non-directory entry under `root`, relative (symlinks not followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links and not _is_partial(d)]
        for name in [*links, *filenames]:
            yield (base / name).relative_to(root).as_posix()


def foreign_files(out: Path, moepack_files: set[str]) -> list[str]:
    """Files under `out` that moepack did not write and will not write (sorted)."""
    if not out.exists():
        return []
    return sorted(
        rel
        for rel in _files(out)
        if rel not in moepack_files and rel != LOCK and not _is_partial(rel)
    )


def refuse_foreign(out: Path, foreign: list[str]) -> None:
    if not foreign:
        return
    shown = ", ".join(foreign[:LISTED_FOREIGN])
    more = f" and {len(foreign) - LISTED_FOREIGN} more" if len(foreign) > LISTED_FOREIGN else ""
    count = f"{len(foreign)} file{'s' if len(foreign) != 1 else ''}"
    raise ConvertError(
        f"{out}: holds {count} moepack did not write ({shown}{more}): an artifact written "
        "here would not verify, and --overwrite replaces only moepack's own files. Move them "
        "away or choose an empty directory",
        path=out,
        found=foreign,
    )


class OutputLock:
    """An exclusive, non-blocking `flock` on `out/.moepack-partial.lock` for one conversion.

    The file is removed on release. A process that took the lock on a file that another process
    has since unlinked holds nothing: after locking, the path must still name the locked inode,
    else it retries.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ConvertError(
                    f"{self.out}: another conversion is writing here ({holder}; lock "
                    f"{self.path}). Wait for it to finish or choose another -o",
                    path=self.out,
                    found=holder,
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                _write_holder(fd)
                return self
            os.close(fd)  # the holder removed the file as it released it: lock the new one
        raise ConvertError(f"{self.path}: could not take the lock", path=self.path)

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def _write_holder(fd: int) -> None:
    """Record who holds the lock. Best effort: on a full disk even these bytes may not fit, and
    the free-space check that follows must still be the one to say so."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    data = (json.dumps(info) + "\n").encode()
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> str:
    try:
        info: Any = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "holder unknown"
    return f"pid {info['pid']} on host {info.get('host', '?')}, since {info.get('started', '?')}"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def space_margin(remaining: int, largest: int) -> int:
    return max(SPACE_MARGIN, int(remaining * SPACE_MARGIN_FRACTION)) + largest


def check_free_space(out: Path, remaining: int, largest: int) -> None:
    """Refuse to start when the filesystem of `out` cannot take the bytes still to write."""
    need = remaining + space_margin(remaining, largest)
    free = free_bytes(out)
    if free < need:
        raise DiskSpaceError(
            f"{out}: not enough free space: this conversion writes {human_bytes(remaining)} "
            f"more (needs {human_bytes(need)} with a safety margin), {human_bytes(free)} free. "
            "Free some space or choose another -o",
            path=out,
            expected=need,
            found=free,
        )


def disk_full(path: Path, size: int | None, exc: OSError) -> DiskSpaceError:
    """The error for ENOSPC/EDQUOT while writing `path` (`size` bytes in all when known)."""
    try:
        free = free_bytes(path.parent)
    except OSError:
        free = None
    what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    need = f"; the file needs {human_bytes(size)}" if size is not None else ""
    have = f", {human_bytes(free)} free" if free is not None else ""
    return DiskSpaceError(
        f"{path}: {what} while writing it{need}{have}", path=path, expected=size, found=free
    )


def prune_empty(out: Path, created: bool, subdirs: Iterable[str]) -> None:
    """After a failure: remove the empty directories moepack made under `out` (`subdirs`, e.g.
    `moe`, `model`, and their empty children), and `out` itself when this conversion created it
    and nothing is left in it. Nothing that holds a file is touched."""
    if not out.is_dir():
        return
    for sub in subdirs:
        top = out / sub
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _dirs, _names in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                Path(dirpath).rmdir()  # only succeeds when empty
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()
