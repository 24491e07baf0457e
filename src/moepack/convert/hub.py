"""Hub client for moepack: pinned, verified, resumable downloads on top of ``huggingface_hub``.

Why not plain ``hf_hub_download``: with huggingface_hub 2.4.0 it (a) never checks a file's sha256,
so a corrupted blob is cached under its advertised hash and served forever, and (b) cannot resume
across calls: its ``.incomplete`` file is unique per attempt and deleted on failure. Within one
call it does retry a cut transfer with ``Range`` (10 MiB granularity).

What this module adds:

* The revision is resolved once to a commit and every download is pinned to it, so a branch
  that moves mid-conversion cannot mix two revisions.
* Every fetched file is hashed and compared with the Hub listing (LFS sha256, or the git blob
  sha1 for small files); a resumable transfer hashes its bytes as it writes them, so a shard is
  not read back once it has arrived. A mismatch gets one forced refetch, then a ``HubError``;
  a bad blob is evicted from the cache so nothing serves it later.
* Cross-call resume for LFS files served over plain HTTP: bytes go to
  ``blobs/<sha256>.part`` in the standard cache, which survives a killed process; the next call
  asks for ``Range: bytes=<size of .part>-``. The finished file is moved to ``blobs/<sha256>``
  (the name ``hf_hub_download`` looks for), which then only links it into the snapshot. Files
  that ``hf_xet`` would fetch (Xet-backed, hf_xet installed), small files and forced refetches
  go through ``hf_hub_download`` unchanged, so they resume only within one call.

Tokens: ``token=None`` lets huggingface_hub read ``HF_TOKEN`` (or the stored login). The token
is kept out of ``repr``, ``dataclasses.asdict``/``to_dict`` and every error message, and this
module never writes it anywhere. HF_HOME/HF_ENDPOINT/HF_HUB_OFFLINE are read by
huggingface_hub at import time; explicit ``endpoint=``/``cache_dir=`` override them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    get_token,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get, is_xet_available, repo_folder_name
from huggingface_hub.utils import (
    WeakFileLock,
    build_hf_headers,
    hf_raise_for_status,
    http_backoff,
)
from tqdm import tqdm

from moepack.errors import HubError

__all__ = ["HubError", "HubRepo", "RemoteFile", "open_repo"]

_HASH_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo listing at the resolved commit."""

    path: str
    size: int
    sha256: str | None  # LFS oid; None for files stored directly in git
    blob_id: str | None  # git object id (of the LFS pointer for LFS files)


@dataclass
class HubRepo:
    """A Hub repo pinned to one commit; ``fetch`` downloads and verifies files of it.

    ``token`` is an init-only argument held privately: not a field, so never in repr/asdict.
    """

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    cache_dir: Path
    files: dict[str, RemoteFile]
    token: InitVar[str | bool | None] = None  # kept out of fields: no repr, no asdict
    _sha256: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self, token: str | bool | None) -> None:
        self._token = token

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records about the source (no token, no local paths)."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "files": {
                name: {"size": self.files[name].size, "sha256": sha}
                for name, sha in sorted(self._sha256.items())
            },
        }

    @property
    def snapshot_dir(self) -> Path:
        """Where this commit's files appear in the cache as they are fetched (the repo's layout)."""
        return self._storage / "snapshots" / self.commit

    def sha256_of(self, filename: str) -> str:
        """The verified sha256 of a file fetched by this object."""
        if filename not in self._sha256:
            raise HubError(f"{self._where(filename)} has not been fetched yet")
        return self._sha256[filename]

    def verified(self, filename: str) -> bool:
        """Whether this object has fetched and verified `filename`."""
        return filename in self._sha256

    def fetch(self, filenames: list[str], *, progress: bool = False) -> dict[str, Path]:
        """Download (or reuse from cache) and verify ``filenames``; return their local paths.

        One byte-level progress bar on stderr spans all files (``progress=True``). See the module
        docstring for what resumes across calls and what only within one call.
        """
        return dict(self.fetch_each(filenames, progress=progress))

    def fetch_each(
        self,
        filenames: list[str],
        *,
        progress: bool = False,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[str, Path]]:
        """`fetch`, in order, yielding each file as soon as it is verified (a conversion reads
        it meanwhile). Setting `stop` ends the iteration within one chunk of the transfer under
        way; a resumable transfer keeps its bytes in the ``.part`` file for the next call."""
        missing = [name for name in filenames if name not in self.files]
        if missing:
            raise HubError(f"{self._where(missing[0])}: no such file in the repo listing")
        total = sum(self.files[name].size for name in filenames if name not in self._sha256)
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"download {self.repo_id}",
            file=sys.stderr,
            disable=not progress,
        )
        with bar:
            for name in filenames:
                if stop is not None and stop.is_set():
                    return
                try:
                    path = self._fetch_one(self.files[name], _forwarding(bar, stop))
                except _Stopped:
                    return
                yield name, path

    def read_range(self, filename: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file at the pinned commit, in one ranged GET (what a
        conversion needs of a shard, its header, before the shard is downloaded)."""
        url = hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token) | {"Range": f"bytes={start}-{end - 1}"}
        try:
            response = http_backoff(
                "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            )
            hf_raise_for_status(response)
        except Exception as err:  # every failure becomes one readable HubError
            reason = _explain(err)
            if _is_transport(err):
                reason += self._resume_hint(self.files[filename])
            raise HubError(
                _scrub(f"cannot read {self._where(filename)}: {reason}", self._token)
            ) from err
        data = response.content
        if response.status_code == 200:  # the server ignored the range: take the part asked for
            data = data[start:end]
        if len(data) != min(end, self.files[filename].size) - start:
            raise HubError(
                f"{self._where(filename)}: asked for bytes {start}-{end - 1}, got {len(data)}"
            )
        return data

    # ------------------------------------------------------------------ internals
    def _where(self, filename: str) -> str:
        return f"'{filename}' of {self.repo_id}@{self.revision} ({self.commit[:12]})"

    @property
    def _storage(self) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    def _fetch_one(self, rf: RemoteFile, bar: type[_ForwardBar]) -> Path:
        """Download, verify, and on mismatch evict and refetch once with force_download."""
        if rf.path in self._sha256:
            return self._pointer(rf)
        for force in (False, True):
            path, streamed = self._download(rf, bar, force=force)
            sha256, ok = (streamed, streamed == rf.sha256) if streamed else _verify(path, rf)
            if ok:
                self._sha256[rf.path] = sha256
                return path
            self._evict(rf, path)
        expected = rf.sha256 or f"git blob {rf.blob_id}"
        raise HubError(
            f"{self._where(rf.path)} is corrupted after a forced re-download: expected "
            f"sha256 {expected}, got {sha256}; the bad copy was removed from the cache"
        )

    def _download(
        self, rf: RemoteFile, bar: type[_ForwardBar], *, force: bool
    ) -> tuple[Path, str | None]:
        """One attempt: resumable transfer of LFS blobs, then hf_hub_download to link/fetch.
        Also the sha256 of the bytes this attempt transferred, where it hashed them as they
        were written (None: the caller reads the file back to hash it)."""
        streamed = None
        try:
            if rf.sha256 is not None and not force:
                streamed = self._resume_lfs_blob(rf, bar)
            path = hf_hub_download(
                self.repo_id,
                rf.path,
                revision=self.commit,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                token=self._token,
                force_download=force,
                tqdm_class=bar,  # type: ignore[arg-type]
            )
        except Exception as err:  # every failure becomes one readable HubError
            reason = _explain(err)
            if _is_transport(err):
                reason += self._resume_hint(rf)
            raise HubError(
                _scrub(f"cannot download {self._where(rf.path)}: {reason}", self._token)
            ) from err
        return Path(path), streamed

    def _resume_hint(self, rf: RemoteFile) -> str:
        """What a rerun will do with this file: resume only if bytes were actually saved."""
        part = self._storage / "blobs" / f"{rf.sha256}.part" if rf.sha256 else None
        saved = part.stat().st_size if part is not None and part.exists() else 0
        if saved:
            return f"; {saved} of {rf.size} bytes saved: rerun to resume from there"
        return "; nothing of this file was saved: a rerun downloads it from the start"

    def _resume_lfs_blob(self, rf: RemoteFile, bar: type[_ForwardBar]) -> str | None:
        """Fill ``blobs/<sha256>`` from a persistent ``.part`` file, resuming where it stopped;
        the sha256 of the finished blob, hashed as its bytes were written (so that a shard is
        not read back from disk once it has arrived), or None where this wrote nothing."""
        assert rf.sha256 is not None
        blob = self._storage / "blobs" / rf.sha256
        if blob.exists():
            return None
        url = hf_hub_url(self.repo_id, rf.path, revision=self.commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self._token, endpoint=self.endpoint)
        if meta.etag != rf.sha256 or (meta.xet_file_data is not None and is_xet_available()):
            return None  # not where hf_hub_download would look, or hf_xet's job: leave it to it
        part = blob.with_name(f"{rf.sha256}.part")
        lock = self.cache_dir / ".locks" / self._storage.name / f"{rf.sha256}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if blob.exists():
                return None
            done = part.stat().st_size if part.exists() else 0
            if done > rf.size:
                part.unlink()
                done = 0
            bar.total_bar.update(done)
            # Follows the 302 to the CDN; httpx drops Authorization on the cross-origin hop.
            with part.open("ab") as f:
                sink = _HashingSink(f, part)
                http_get(
                    url,
                    cast(BinaryIO, sink),
                    resume_size=done,
                    headers=build_hf_headers(token=self._token),
                    expected_size=rf.size,
                    tqdm_class=bar,  # type: ignore[arg-type]
                )
            os.replace(part, blob)  # verified by the caller; evicted there if wrong
            return sink.hexdigest()

    def _pointer(self, rf: RemoteFile) -> Path:
        return self._storage / "snapshots" / self.commit / Path(*rf.path.split("/"))

    def _evict(self, rf: RemoteFile, path: Path) -> None:
        """Remove a bad file's snapshot entry, its blob and any partial transfer."""
        blobs = self._storage / "blobs"
        etag = rf.sha256 or rf.blob_id
        doomed = [path]
        if etag is not None:
            doomed += [blobs / etag, blobs / f"{etag}.part"]
        target = Path(os.path.realpath(path))
        if target.is_relative_to(self._storage.resolve()):  # never a shared store outside
            doomed.append(target)
        for p in doomed:
            p.unlink(missing_ok=True)


class _Stopped(BaseException):
    """Raised from a progress update to end a transfer when a background download is stopped
    (a BaseException, so that no ``except Exception`` on the way turns it into a failure)."""


class _ForwardBar:
    """Stands in for huggingface_hub's per-file bars (HTTP and hf_xet) and feeds our total bar.

    Duck-typed to what http_get and XetDownloadProgressReporter call; ``update_transfer`` on the
    class makes the Xet reporter use one bar instead of two, so bytes are counted once. Each
    update is also where a stopped background download ends its transfer (``stop``).
    """

    total_bar: tqdm  # set by _forwarding()
    stop: threading.Event | None = None
    total: int | None = None

    def __init__(self, **_: object) -> None:
        pass

    def update(self, n: int) -> None:
        if self.stop is not None and self.stop.is_set():
            raise _Stopped
        self.total_bar.update(n)

    def update_transfer(self, n: int) -> None:
        pass  # wire bytes; the reconstructed bytes already went through update()

    def set_postfix_str(self, *_: object, **__: object) -> None:
        pass

    set_transfer_postfix_str = set_postfix_str

    def close(self) -> None:
        pass

    def __enter__(self) -> _ForwardBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _HashingSink:
    """The ``.part`` file as handed to ``http_get``: hashes each chunk as it appends it, after
    the bytes an earlier call saved. ``http_get`` truncates the file when a server ignores
    ``Range`` and sends it whole; the hash then restarts from what is left."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._f, self._path = f, path
        self._sha256 = self._hash_saved()

    def write(self, data: bytes) -> int:
        self._sha256.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        end = self._f.truncate(size)
        self._sha256 = self._hash_saved()
        return end

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()

    def _hash_saved(self) -> Any:
        self._f.flush()
        sha256 = hashlib.sha256()
        _feed(self._path, sha256)
        return sha256


def _forwarding(bar: tqdm, stop: threading.Event | None = None) -> type[_ForwardBar]:
    return type("_ForwardBarBound", (_ForwardBar,), {"total_bar": bar, "stop": stop})


def _verify(path: Path, rf: RemoteFile) -> tuple[str, bool]:
    """Stream the file once: its sha256, and whether it matches the listing."""
    sha256 = hashlib.sha256()
    if rf.sha256 is not None:
        _feed(path, sha256)
        return sha256.hexdigest(), sha256.hexdigest() == rf.sha256
    git = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    _feed(path, sha256, git)
    return sha256.hexdigest(), rf.blob_id is None or git.hexdigest() == rf.blob_id


def _feed(path: Path, *hashes: Any) -> None:
    """Update every one of `hashes` with the bytes of `path`, read once."""
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            for h in hashes:
                h.update(block)


def _explain(err: BaseException) -> str:
    """A one-line reason for the CLI, looking through huggingface_hub's wrapped causes."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return "the repository is gated: accept its terms on the Hub and set HF_TOKEN"
        if isinstance(seen, RepositoryNotFoundError):
            return "repository not found (or private/gated and no valid token: set HF_TOKEN)"
        if isinstance(seen, RevisionNotFoundError):
            return "revision not found"
        if isinstance(seen, RemoteEntryNotFoundError):
            return "file not found at this commit"
        if isinstance(seen, OfflineModeIsEnabled):
            return "offline mode is on (HF_HUB_OFFLINE)"
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            code = seen.response.status_code
            if code in (401, 403):
                return f"access denied (HTTP {code}): token missing, invalid or without access"
            return f"HTTP {code} from the Hub"
        if isinstance(seen, httpx2.TransportError):
            return f"endpoint unreachable or transfer cut ({type(seen).__name__})"
        seen = seen.__cause__ or seen.__context__
    return f"{type(err).__name__}: {err}"


def _is_transport(err: BaseException) -> bool:
    """A cut connection anywhere in the cause chain (the case where a rerun may resume)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, httpx2.TransportError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _scrub(message: str, token: str | bool | None) -> str:
    """Belt and braces: no token text in anything we raise."""
    for secret in (token if isinstance(token, str) else None, get_token()):
        if secret:
            message = message.replace(secret, "***")
    return message


def open_repo(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> HubRepo:
    """Resolve ``revision`` (default "main") to a commit and list the files with their hashes."""
    revision = revision or "main"
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo_id, revision=revision, files_metadata=True
        )
    except Exception as err:  # every failure becomes one readable HubError
        raise HubError(
            _scrub(f"cannot open {repo_id}@{revision} on {endpoint}: {_explain(err)}", token)
        ) from err
    if info.sha is None:
        raise HubError(f"{endpoint} did not resolve {repo_id}@{revision} to a commit")
    files = {
        s.rfilename: RemoteFile(
            path=s.rfilename,
            size=s.lfs.size if s.lfs is not None else (s.size or 0),
            sha256=s.lfs.sha256 if s.lfs is not None else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    }
    return HubRepo(
        repo_id=repo_id,
        revision=revision,
        commit=info.sha,
        endpoint=endpoint,
        cache_dir=Path(cache_dir or constants.HF_HUB_CACHE).expanduser(),
        files=files,
        token=token,
    )
