"""A hub source's files downloaded in the background, in the order a conversion needs them.

Converting a layer needs only the shards that hold its experts, so the download goes layer by
layer (`download_order`) on one daemon thread (`Prefetch`) while the conversion waits for each
file as it first reads it: the first layers convert while the later shards are still coming.
One transfer at a time: the link is the limit, and one stream in order completes the first
layers' shards soonest. While it runs the interpreter hands the GIL over every
`SWITCH_INTERVAL_S` instead of 5 ms, so that the download thread, which needs the GIL for each
socket read, is not held off by the conversion's Python code.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TYPE_CHECKING

from moepack.errors import HubError

from .moe_layers import MoELayer

if TYPE_CHECKING:
    from .hub import HubRepo

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
"""The GIL switch interval during a background download. On the 2-core dev box an 8-layer
hub conversion's download finished 100.8-103.7 s in with it against 106.9-110.5 s at the
default 5 ms (95.2 s with nothing converting; `benchmarks/hub_overlap.py`, 2026-12-02)."""

_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


def _lower_switch_interval() -> None:
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, SWITCH_INTERVAL_S))
        _switch_users += 1


def _restore_switch_interval() -> None:
    global _switch_users
    with _switch_lock:
        _switch_users -= 1
        if _switch_users == 0:
            sys.setswitchinterval(_switch_saved)


def download_order(
    names: Iterable[str], weight_map: dict[str, str], layers: list[MoELayer]
) -> list[str]:
    """`names` reordered so that layers complete early: for each layer in conversion order the
    shards holding its expert tensors that no earlier layer needed, then the other shards (the
    pass-through reads them in name order), then everything else."""
    wanted = set(names)
    order: dict[str, None] = {}
    for moe in layers:
        needed = {weight_map[t] for t in moe.tensors() if t in weight_map}
        order.update(dict.fromkeys(sorted(needed & wanted)))
    shards = set(weight_map.values())
    rest = sorted(wanted - set(order), key=lambda n: (n not in shards, n))
    return [*order, *rest]


class Prefetch:
    """Downloads and verifies `names` of `repo` in order on a daemon thread; `wait` blocks until
    one is verified and re-raises the error that stopped the download (a daemon, and `stop`, so
    that an interrupted or failed conversion exits without waiting for the rest)."""

    def __init__(self, repo: HubRepo, names: list[str], progress: bool) -> None:
        self._files: dict[str, Future[Path]] = {name: Future() for name in names}
        self._stop = threading.Event()
        _lower_switch_interval()
        threading.Thread(
            target=self._run, args=(repo, names, progress), name="moepack-download", daemon=True
        ).start()

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def wait(self, name: str) -> Path:
        """The local path of `name` once it is downloaded and verified. Waits in short steps:
        a Ctrl-C that the kernel hands to the download thread interrupts no blocking wait of
        the main thread, which sees it only when it next runs."""
        future = self._files[name]
        while not future.done():
            wait([future], timeout=0.1)
        return future.result()

    def stop(self) -> None:
        """End the download within one chunk (a resumable transfer keeps its `.part` bytes)."""
        self._stop.set()

    def _run(self, repo: HubRepo, names: list[str], progress: bool) -> None:
        error: BaseException = HubError(f"the download of {repo.repo_id} was stopped")
        last: Path | None = None
        try:
            for name, path in repo.fetch_each(names, progress=progress, stop=self._stop):
                if name == names[-1]:
                    last = path  # handed over once the progress bar is closed, not under output
                else:
                    self._files[name].set_result(path)
            log.info("download finished: %d files", len(names))
        except BaseException as exc:  # handed to whoever waits for a file not yet fetched
            error = exc
        finally:
            _restore_switch_interval()
        if last is not None:
            self._files[names[-1]].set_result(last)
        for future in self._files.values():
            if not future.done():
                future.set_exception(error)
