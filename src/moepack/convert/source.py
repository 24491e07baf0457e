"""The conversion source: one object for a local checkpoint directory or a pinned hub repo.

It reads `config.json`, the quant config and the tensor index once, refuses an unsupported model
from them before any weight is fetched, and hands out files on demand: a local source has them
all, a hub source downloads (and verifies) a file the first time it is asked for. Everything
downstream (the MoE layer scan, the tensor reader, the manifest's source record,
`verify --source`) asks this object instead of re-reading files:

    src = open_source("nemotron-super-nvfp4")   # hub: config + quant config fetched and read
    src.moe_layers                              # hub: the index fetched, layers found
    src.record(moe_only)                        # hub: weights fetched; the manifest's record
    ckpt = src.checkpoint()                     # tensors, over the same parsed config
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moepack.errors import SourceError, UsageError
from moepack.format.header import Header, read_header
from moepack.recipes import resolve_alias
from moepack.runtime.verify import sha256_file

from .checkpoint import (
    INDEX,
    QUANT_CONFIG,
    SINGLE,
    Checkpoint,
    CheckpointError,
    QuantConfig,
    is_pass_through,
    load_quant_config,
    read_json,
    weight_map_of,
)
from .moe_layers import MoELayer, check_supported_config, find_moe_layers

if TYPE_CHECKING:
    from .hub import HubRepo

CONFIG = "config.json"


@dataclass
class SourceRecord:
    """What the manifest records about where the checkpoint came from (`root`: where its files
    are on local disk); a local source's file hashes may still be computing (`settle` waits)."""

    root: Path
    record: dict[str, Any]
    pending: Future[list[dict[str, Any]]] | None = None
    """A local source's file hashes while they are still being computed (in the background)."""

    def settle(self) -> dict[str, Any]:
        """The record, its `files` hashed (waits for background hashing, re-raising its error)."""
        if self.pending is not None:
            self.record["files"] = self.pending.result()
            self.pending = None
        return self.record


class Source:
    """A checkpoint to convert: `root` is where its files are on local disk (for a hub repo,
    the cache snapshot of the pinned commit, filled as files are fetched)."""

    def __init__(self, root: Path, repo: HubRepo | None = None, progress: bool = False) -> None:
        self.repo = repo
        self.progress = progress
        if repo is None:
            self.root = Path(root).resolve()
            if not self.root.is_dir():
                raise CheckpointError(f"{self.root}: not a directory", path=self.root)
        else:
            self.root = Path(root)
        first = [CONFIG, *([QUANT_CONFIG] if self._has(QUANT_CONFIG) else [])]
        self.fetch(first)
        self.config: dict[str, Any] = read_json(self.root / CONFIG)
        check_supported_config(self.config)
        self.quant: QuantConfig = load_quant_config(self.root, self.config)
        self._headers: dict[str, Header] = {}

    @property
    def kind(self) -> str:
        return "local" if self.repo is None else "hub"

    def __repr__(self) -> str:
        where = self.root if self.repo is None else f"{self.repo.repo_id}@{self.repo.commit}"
        return f"Source({self.kind}: {where})"

    # -- files on demand --------------------------------------------------------------------

    def _has(self, name: str) -> bool:
        return (self.root / name).is_file() if self.repo is None else name in self.repo.files

    def fetch(self, names: list[str], progress: bool | None = None) -> None:
        """Make `names` present under `root` (a hub source downloads and verifies them)."""
        if self.repo is not None and names:
            self.repo.fetch(names, progress=self.progress if progress is None else progress)

    def path(self, name: str) -> Path:
        """The local path of file `name`, fetched first if this source must."""
        self.fetch([name], progress=False)
        return self.root / name

    def _header(self, name: str) -> Header:
        if name not in self._headers:
            self._headers[name] = read_header(self.path(name))
        return self._headers[name]

    # -- what the checkpoint holds (each read once) -----------------------------------------

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard. A hub source fetches only the index for it (or, for a
        single-file checkpoint, that one file)."""
        if self._has(INDEX):
            self.fetch([INDEX], progress=False)
        elif self._has(SINGLE):
            self.fetch([SINGLE])
        return weight_map_of(self.root, self._header)

    @cached_property
    def moe_layers(self) -> list[MoELayer]:
        """The NVFP4 MoE layers (an unsupported layout is refused here, before the weights)."""
        return find_moe_layers(self.weight_map, self.quant, self.config)

    def files(self, moe_only: bool) -> list[str]:
        """Every source file the job reads: configs, index and shards, and unless `moe_only`
        the model files that pass through (tokenizer, chat template, custom code)."""
        names = {CONFIG, *([QUANT_CONFIG] if self._has(QUANT_CONFIG) else [])}
        names |= {INDEX} if self._has(INDEX) else set()
        names |= set(self.weight_map.values())
        if not moe_only:
            names |= set(self.pass_through_files())
        return sorted(names)

    def pass_through_files(self) -> list[str]:
        if self.repo is None:
            return Checkpoint.pass_through_files_of(self.root)
        return sorted(n for n, f in self.repo.files.items() if is_pass_through(n, f.size))

    def record(self, moe_only: bool, defer_hashes: bool = False) -> SourceRecord:
        """The manifest's `source` record: where from, and the size and sha256 of every file
        the job reads. A hub source downloads them now (verified against the Hub listing as
        they arrive); a local one hashes them, in the background with `defer_hashes` (a fresh
        conversion reads and converts layers meanwhile instead of waiting ~0.3 s a GB)."""
        names = self.files(moe_only)
        if self.repo is None:
            record: dict[str, Any] = {
                "type": "local",
                "repo_id": None,
                "revision": None,
                "commit": None,
                "path": str(self.root),
                "files": None,
            }
            if not defer_hashes:
                return SourceRecord(self.root, record | {"files": _hash_files(self.root, names)})
            return SourceRecord(self.root, record, _hash_files_background(self.root, names))
        self.fetch(names)
        repo = self.repo
        files = [
            {"path": n, "size": repo.files[n].size, "sha256": repo.sha256_of(n)} for n in names
        ]
        return SourceRecord(
            self.root,
            {
                "type": "hub",
                "repo_id": repo.repo_id,
                "revision": repo.revision,
                "commit": repo.commit,
                "path": None,
                "files": files,
            },
        )

    def checkpoint(self) -> Checkpoint:
        """The tensor reader over this source's parsed config, quant config and index."""
        return Checkpoint(
            self.root,
            config=self.config,
            quant=self.quant,
            weight_map=self.weight_map,
            file_path=self.path,
        )


def open_source(
    spec: str, revision: str | None = None, progress: bool = False, **hub: Any
) -> Source:
    """A recipe alias, a local directory, or a hub repo id, in that order. `hub` goes to
    `moepack.convert.hub.open_repo` (token, endpoint, cache_dir)."""
    recipe = resolve_alias(spec)
    if recipe is not None:
        return _hub(recipe["repo_id"], revision or recipe.get("revision"), progress, hub)
    if Path(spec).is_dir():
        return Source(Path(spec), progress=progress)
    if looks_like_path(spec):
        what = "is not a directory" if Path(spec).exists() else "no such directory"
        raise SourceError(f"{spec}: {what} (a local checkpoint must be a directory)", path=spec)
    if HUB_ID.fullmatch(spec):
        return _hub(spec, revision, progress, hub)
    raise SourceError(
        f"{spec}: not a recipe alias (see `moepack recipes`), a local checkpoint directory, or a "
        "hub repo id (owner/name)",
        found=spec,
    )


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
"""What the Hub accepts as `owner/name` (a path like `/x` or `a/b/c` is never sent there)."""


def looks_like_path(spec: str) -> bool:
    """Written as a path (absolute, ~, ./ ../, more than one slash, or existing on disk)."""
    return (
        spec.startswith(("/", "~", "./", "../", ".\\"))
        or spec in (".", "..")
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or Path(spec).exists()
    )


def _hub(repo_id: str, revision: str | None, progress: bool, hub: dict[str, Any]) -> Source:
    try:
        from .hub import open_repo  # huggingface_hub is imported only when the Hub is used
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"{repo_id}: converting from the Hub needs the convert extra (huggingface_hub; "
            f"{exc.name} is not installed): pip install 'moepack[convert]', or use a local "
            "checkpoint directory",
            found=exc.name,
        ) from None

    repo = open_repo(repo_id, revision, **hub)
    return Source(repo.snapshot_dir, repo, progress)


def _hash_files(root: Path, names: list[str], daemon: bool = False) -> list[dict[str, Any]]:
    """sha256 of each source file, parallel across files (hashlib releases the GIL); on daemon
    threads if `daemon` (see `_hash_files_background`)."""
    workers = max(1, min(len(names), max(4, (os.cpu_count() or 1) // 2)))
    if not daemon:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda n: sha256_file(root / n), names))
    else:
        digests = _daemon_map(lambda n: sha256_file(root / n), names, workers)
    return [
        {"path": n, "size": (root / n).stat().st_size, "sha256": d}
        for n, d in zip(names, digests, strict=True)
    ]


def _hash_files_background(root: Path, names: list[str]) -> Future[list[dict[str, Any]]]:
    """`_hash_files` on daemon threads: an interrupted conversion exits without waiting for
    the hashing of a large checkpoint to finish."""
    result: Future[list[dict[str, Any]]] = Future()
    result.set_running_or_notify_cancel()

    def run() -> None:
        try:
            result.set_result(_hash_files(root, names, daemon=True))
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=run, name="moepack-source-hash", daemon=True).start()
    return result


def _daemon_map(fn: Callable[[str], str], items: list[str], workers: int) -> list[str]:
    """`[fn(x) for x in items]` on `workers` daemon threads; the first error is re-raised."""
    out: list[str | None] = [None] * len(items)
    errors: list[BaseException] = []
    jobs = iter(enumerate(items))
    lock = threading.Lock()

    def worker() -> None:
        while not errors:
            with lock:
                job = next(jobs, None)
            if job is None:
                return
            try:
                out[job[0]] = fn(job[1])
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [x for x in out if x is not None]
