"""The conversion source: one object for a local checkpoint directory or a pinned hub repo.

It reads `config.json`, the quant config and the tensor index once, refuses an unsupported model
from them before any weight is fetched, and hands out files on demand: a local source has them
all, a hub source downloads (and verifies) a file the first time it is asked for. Everything
downstream (the MoE layer scan, the tensor reader, the manifest's source record,
`verify --source`) asks this object instead of re-reading files:

    src = open_source("nemotron-super-nvfp4")   # hub: config + quant config fetched and read
    src.moe_layers                              # hub: the index fetched, layers found
    src.record(moe_only)                        # the manifest's record (hub: from the listing)
    src.download(todo, moe_only)                # hub: all files, in the background, layer by layer
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

from moepack.errors import HubError, SourceError, UsageError
from moepack.format.header import Header, header_length, parse_header, read_header
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
from .prefetch import Prefetch, download_order

if TYPE_CHECKING:
    from .hub import HubRepo

CONFIG = "config.json"
HEAD_READ = 64 * 1024
"""Bytes of a remote shard asked for first to read its header (a second request gets the rest
of a longer one)."""
REMOTE_HEADERS = 8
"""Ranged header reads in flight at once."""


@dataclass
class SourceRecord:
    """What the manifest records about where the checkpoint came from (`root`: where its files
    are on local disk). Its `files` may not be settled yet: a local source's hashes may still
    be computing, a hub source's downloads still verifying (`settle` waits)."""

    root: Path
    record: dict[str, Any]
    pending: Callable[[], list[dict[str, Any]]] | None = None
    """Waits for the record's `files` and returns them (re-raising the hashing's or the
    download's error)."""

    def files(self) -> list[dict[str, Any]]:
        """The files with their sha256, as the job's fingerprint needs them: a hub source's
        are known from the listing (each download is verified against it); a local one's
        hashing is waited for."""
        if self.record["files"] is None:
            self.settle()
        files: list[dict[str, Any]] = self.record["files"]
        return files

    def settle(self) -> dict[str, Any]:
        """The record, every file hashed or downloaded and verified (waits for that)."""
        if self.pending is not None:
            self.record["files"] = self.pending()
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
        self._remote_headers: set[str] = set()
        """Headers read by a ranged request, not yet compared with the verified file."""
        self._prefetch: Prefetch | None = None

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
        """The local path of file `name`. A hub source first waits for its background download
        (`download`) or fetches it now, and checks that a header read before the file was
        there is the verified file's."""
        if self.repo is not None:
            if self._prefetch is not None and name in self._prefetch:
                self._prefetch.wait(name)
            else:
                self.fetch([name], progress=False)
            if name in self._remote_headers:
                if read_header(self.root / name) != self._headers[name]:
                    raise HubError(
                        f"{self.repo.repo_id}@{self.repo.commit[:12]}: '{name}' as downloaded "
                        "has another header than the ranged read of it returned",
                        path=name,
                    )
                self._remote_headers.discard(name)
        return self.root / name

    def header(self, name: str) -> Header:
        """A safetensors file's header. A hub source reads those of files it has not fetched
        with ranged requests: planning a conversion needs every shard's header first, so the
        first such read fetches all the shards' headers at once (one round trip, not one a
        shard)."""
        if name not in self._headers:
            if self.repo is None or self.repo.verified(name):
                self._headers[name] = read_header(self.path(name))
            else:
                shards = set(self.weight_map.values()) if self._has_weight_map() else set()
                names = [name] + sorted(
                    s for s in shards - {name} - set(self._headers) if not self.repo.verified(s)
                )
                with ThreadPoolExecutor(min(len(names), REMOTE_HEADERS)) as pool:
                    headers = list(pool.map(self._remote_header, names))
                for n, header in zip(names, headers, strict=True):
                    self._headers[n] = header
                    self._remote_headers.add(n)
        return self._headers[name]

    def _has_weight_map(self) -> bool:
        return "weight_map" in self.__dict__  # the cached property is computed (it may need us)

    def _remote_header(self, name: str) -> Header:
        assert self.repo is not None
        size, path = self.repo.files[name].size, self.root / name
        head = self.repo.read_range(name, 0, min(size, HEAD_READ))
        end = 8 + header_length(path, head, size)
        if end > len(head):
            head += self.repo.read_range(name, len(head), end)
        return parse_header(path, head, size)

    def size(self, name: str) -> int:
        """A file's size in bytes (a hub source's from the listing, before it is fetched)."""
        return (
            (self.root / name).stat().st_size if self.repo is None else self.repo.files[name].size
        )

    def ready(self, name: str) -> bool:
        """Whether file `name` is there to read without waiting for its download."""
        return self.repo is None or self.repo.verified(name)

    def download(self, layers: list[MoELayer], moe_only: bool) -> None:
        """Start downloading every file of the job in the background, in the order that lets
        `layers` (those still to convert, in conversion order) complete early; `path` waits
        for each. A no-op for a local source."""
        if self.repo is None or self._prefetch is not None:
            return
        order = download_order(self.files(moe_only), self.weight_map, layers)
        todo = [name for name in order if not self.repo.verified(name)]
        self._prefetch = Prefetch(self.repo, todo, self.progress)

    def close(self) -> None:
        """Stop a background download (a rerun resumes it)."""
        if self._prefetch is not None:
            self._prefetch.stop()

    # -- what the checkpoint holds (each read once) -----------------------------------------

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard. A hub source fetches only the index for it (or, for a
        single-file checkpoint, reads that file's header)."""
        if self._has(INDEX):
            self.fetch([INDEX], progress=False)
        elif self._has(SINGLE):
            return dict.fromkeys(self.header(SINGLE).tensors, SINGLE)
        return weight_map_of(self.root, self.header)

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
        the job reads. A local source hashes them, in the background with `defer_hashes` (a
        fresh conversion reads and converts layers meanwhile instead of waiting ~0.3 s a GB).
        A hub source takes them from the listing, fetching now only the small files stored in
        git (whose sha256 it does not list); the record settles once every file is downloaded
        and verified (`download` starts that)."""
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
            return SourceRecord(self.root, record, _hash_files_background(self.root, names).result)
        repo = self.repo
        self.fetch([n for n in names if repo.files[n].sha256 is None], progress=False)

        def files(sha256: Callable[[str], str | None]) -> list[dict[str, Any]]:
            return [{"path": n, "size": repo.files[n].size, "sha256": sha256(n)} for n in names]

        def verified(name: str) -> str:
            self.path(name)  # waits for its download
            return repo.sha256_of(name)

        record = {
            "type": "hub",
            "repo_id": repo.repo_id,
            "revision": repo.revision,
            "commit": repo.commit,
            "path": None,
            "files": files(lambda n: repo.files[n].sha256 or repo.sha256_of(n)),
        }
        return SourceRecord(self.root, record, lambda: files(verified))

    def checkpoint(self) -> Checkpoint:
        """The tensor reader over this source's parsed config, quant config and index."""
        return Checkpoint(
            self.root,
            config=self.config,
            quant=self.quant,
            weight_map=self.weight_map,
            files=self,
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
