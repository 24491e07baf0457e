"""A loopback HTTP server impersonating the Hugging Face Hub, for offline tests.

Point real ``huggingface_hub`` code at it with ``endpoint=hub.endpoint`` (or the
``HF_ENDPOINT`` environment variable *before* ``huggingface_hub`` is imported: the
library reads it once at import time).

Only what ``huggingface_hub`` 2.4.0 needs for downloads is implemented:

* ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{rev}``
  (``HfApi.model_info`` / ``repo_info``; ``?blobs=true`` adds size/blobId/lfs per sibling).
* ``GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=true``
  (``list_repo_tree`` / ``list_repo_files`` / ``snapshot_download``), single page.
* ``HEAD|GET /{repo_id}/resolve/{rev}/{filename}`` (``hf_hub_download``):
  regular files answer 200 with ``ETag`` = git blob sha1, ``Content-Length`` and
  ``X-Repo-Commit``; LFS files answer ``302`` to a second loopback server playing the
  CDN (another port = another origin, so the client drops ``Authorization`` like it
  does for the real CDN), carrying ``X-Linked-Etag`` (the sha256), ``X-Linked-Size``
  and ``X-Repo-Commit``. With ``FakeHub(cdn=False)`` LFS files are served directly
  (200, ``ETag`` = sha256).
* ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` on every file GET (206, or 416).
* ``FakeHub(rate=bytes_per_second)`` caps the bandwidth of all file bodies together (one
  shared link), for benchmarks; ``stall`` holds a file's body at a byte offset until released.
* Errors like the Hub: 404 + ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` (the latter with ``X-Repo-Commit``), 401 when ``require_token`` is
  set and the ``Authorization: Bearer`` header is missing or wrong.

No Xet headers are ever sent, so ``hf_xet`` (even if installed) is never used.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["FakeHub", "RecordedRequest", "RepoFileEntry"]

LFS_THRESHOLD = 1024 * 1024  # files larger than this are LFS even without a .safetensors suffix
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_FIXED_DATE = "2024-01-01T00:00:00.000Z"
_CHUNK = 64 * 1024
LINK_BUFFER_S = 0.1  # how far a capped link may run behind (see FakeHub._throttle)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class RepoFileEntry:
    path: str  # repo-relative, forward slashes
    data: bytes | mmap.mmap  # a large file is mapped, not read (a benchmark serves GBs)
    is_lfs: bool
    sha256: str
    blob_id: str  # git sha1 of the blob (of the LFS pointer for LFS files)
    pointer_size: int | None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """What the client uses as blob name in its cache."""
        return self.sha256 if self.is_lfs else self.blob_id


@dataclass
class RecordedRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted path, without query string
    raw_path: str  # path + query exactly as received
    query: dict[str, list[str]]
    headers: dict[str, str]  # keys lower-cased
    status: int | None = None  # filled in once the response status is decided
    bytes_sent: int = 0  # body bytes handed to the socket (counted just before each write)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    # commit sha -> repo-relative path -> entry
    commits: dict[str, dict[str, RepoFileEntry]] = field(default_factory=dict)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return an inclusive (start, end), None to ignore the header; raise _HttpError(416)."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unsupported => serve the whole file, as allowed by RFC 9110
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise ValueError
            start, end = max(size - n, 0), size - 1
        else:
            start = int(first)
            end = int(last) if last else size - 1
            end = min(end, size - 1)
            if start > end:
                raise ValueError
    except ValueError:
        raise _HttpError(
            416, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"}
        ) from None
    if start >= size:
        raise _HttpError(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


class FakeHub:
    """Context manager running a fake Hub (plus a fake LFS CDN) on 127.0.0.1.

    Public API::

        with FakeHub() as hub:
            sha = hub.add_repo("org/model", folder)      # -> 40-hex commit
            hub.endpoint                                  # "http://127.0.0.1:PORT"
            hub.require_token = "hf_xxx"                  # optional
            hub.interrupt_once("model.safetensors", after_bytes=1000)
            hub.interrupt("model.safetensors", after_bytes=1000, times=6)
            hub.corrupt("model.safetensors")              # until hub.clear_faults()
            waiting = hub.stall("model.safetensors", at=1000)  # until hub.release(...)
            hub.requests                                  # list[RecordedRequest]
            hub.file_requests("model.safetensors", method="GET")  # hub + CDN requests
            hub.clear_requests()
            hub.file_entry("org/model", "model.safetensors")  # sha256, blob_id, data, ...
            hub.cdn_endpoint                              # the fake LFS CDN (other port)
    """

    def __init__(
        self, *, cdn: bool = True, lfs_threshold: int = LFS_THRESHOLD, rate: float | None = None
    ) -> None:
        self.cdn = cdn
        self.lfs_threshold = lfs_threshold
        self.rate = rate  # bytes/s over all file bodies together; None: as fast as loopback
        self._link_free = 0.0  # monotonic time at which the capped link is next idle
        self._stalls: dict[
            tuple[str | None, str], tuple[int, threading.Event, threading.Event]
        ] = {}
        self.require_token: str | None = None
        self.requests: list[RecordedRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._interrupts: dict[tuple[str | None, str], list[int]] = {}  # [after_bytes, times]
        self._corrupt: set[tuple[str | None, str]] = set()
        self._ignore_range: set[tuple[str | None, str]] = set()
        self._lock = threading.RLock()
        self._hub_server: ThreadingHTTPServer | None = None
        self._cdn_server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._open_sockets: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._hub_server is not None:
            raise RuntimeError("FakeHub already started")
        self._hub_server = self._make_server("hub")
        self._cdn_server = self._make_server("cdn")
        for srv in (self._hub_server, self._cdn_server):
            t = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.clear_faults()  # releases stalled transfers
        servers = [s for s in (self._hub_server, self._cdn_server) if s is not None]
        for srv in servers:
            srv.shutdown()  # stops serve_forever (bounded by poll_interval)
        with self._lock:
            socks = list(self._open_sockets)
        for sock in socks:  # wake handler threads blocked on idle keep-alive connections
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for srv in servers:
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._hub_server = self._cdn_server = None

    def _make_server(self, role: str) -> ThreadingHTTPServer:
        handler = type(
            f"_FakeHub{role.capitalize()}Handler", (_Handler,), {"hub": self, "role": role}
        )
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        return srv

    @property
    def endpoint(self) -> str:
        if self._hub_server is None:
            raise RuntimeError("FakeHub is not running")
        return f"http://127.0.0.1:{self._hub_server.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        if self._cdn_server is None:
            raise RuntimeError("FakeHub is not running")
        return f"http://127.0.0.1:{self._cdn_server.server_address[1]}"

    def client_env(self, home: Path) -> dict[str, str]:
        """The environment of a child process that talks to this hub: this one's, without any
        HF_*/HUGGING* setting of the user's, with HF_ENDPOINT here and HF_HOME at `home`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        return env | {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    # ------------------------------------------------------------------ repos
    def add_repo(
        self, repo_id: str, folder: Path | str, commit: str | None = None, revision: str = "main"
    ) -> str:
        """Register every file under ``folder`` as model repo ``repo_id`` at ``revision``.

        Returns the commit sha (``commit`` if given, else a sha1 derived from repo id and content).
        Calling it again with another ``revision`` adds a branch; with the same one, moves it.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(folder)
        files: dict[str, RepoFileEntry] = {}
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(folder).as_posix()
            if rel.startswith(".git/") or rel.startswith(".cache/"):
                continue
            data = _contents(p, self.lfs_threshold)
            sha256 = hashlib.sha256(data).hexdigest()
            is_lfs = rel.endswith(_LFS_SUFFIXES) or len(data) > self.lfs_threshold
            pointer = lfs_pointer(sha256, len(data)) if is_lfs else None
            files[rel] = RepoFileEntry(
                path=rel,
                data=data,
                is_lfs=is_lfs,
                sha256=sha256,
                blob_id=git_blob_sha1(pointer if pointer is not None else data),
                pointer_size=len(pointer) if pointer is not None else None,
            )
        if commit is None:
            h = hashlib.sha1(f"fakehub-commit\0{repo_id}\0".encode())
            for rel, entry in files.items():
                h.update(f"{rel}\0{entry.blob_id}\0".encode())
            commit = h.hexdigest()
        commit = commit.lower()
        if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            raise ValueError(f"commit must be 40 hex chars, got {commit!r}")
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            repo.commits[commit] = files
            repo.refs[revision] = commit
        return commit

    def file_entry(self, repo_id: str, filename: str, revision: str = "main") -> RepoFileEntry:
        with self._lock:
            repo = self._repos[repo_id]
            return repo.commits[repo.refs.get(revision, revision)][filename]

    # ------------------------------------------------------------------ faults
    def interrupt_once(self, filename: str, after_bytes: int, repo_id: str | None = None) -> None:
        """The next GET serving ``filename``'s bytes announces the full Content-Length but
        closes the connection after ``after_bytes`` body bytes (counted from the start of
        the served range)."""
        self.interrupt(filename, after_bytes, times=1, repo_id=repo_id)

    def interrupt(
        self, filename: str, after_bytes: int, times: int = 1, repo_id: str | None = None
    ) -> None:
        """Like ``interrupt_once`` but for the next ``times`` GETs of ``filename``."""
        if times < 1 or after_bytes < 0:
            raise ValueError("times must be >= 1 and after_bytes >= 0")
        with self._lock:
            self._interrupts[(repo_id, filename)] = [int(after_bytes), int(times)]

    def corrupt(self, filename: str, repo_id: str | None = None) -> None:
        """Serve ``filename`` with one byte flipped (same size), still advertising the original
        sha256/ETag. Stays in effect until ``clear_faults()``."""
        with self._lock:
            self._corrupt.add((repo_id, filename))

    def ignore_range(self, filename: str, repo_id: str | None = None) -> None:
        """Answer GETs of ``filename`` with the whole file (200) whatever their ``Range``, as a
        CDN that drops the header does. Stays in effect until ``clear_faults()``."""
        with self._lock:
            self._ignore_range.add((repo_id, filename))

    def stall(self, filename: str, at: int, repo_id: str | None = None) -> threading.Event:
        """GETs serving ``filename``'s byte ``at`` send the bytes before it, then wait for
        ``release(filename)`` (or ``clear_faults()``/``stop()``) before sending the rest.
        Returns an event that is set once a GET waits there."""
        waiting, go = threading.Event(), threading.Event()
        with self._lock:
            self._stalls[(repo_id, filename)] = (at, waiting, go)
        return waiting

    def release(self, filename: str, repo_id: str | None = None) -> None:
        with self._lock:
            stall = self._stalls.pop((repo_id, filename), None)
        if stall is not None:
            stall[2].set()

    def clear_faults(self) -> None:
        with self._lock:
            self._interrupts.clear()
            self._corrupt.clear()
            self._ignore_range.clear()
            stalls = list(self._stalls.values())
            self._stalls.clear()
        for _, _, go in stalls:
            go.set()

    def _stall_of(
        self, repo_id: str, filename: str
    ) -> tuple[int, threading.Event, threading.Event] | None:
        with self._lock:
            return self._stalls.get((repo_id, filename)) or self._stalls.get((None, filename))

    def _throttle(self, n: int) -> None:
        """Hold the caller until ``n`` more bytes fit through the capped link. The link may
        fall up to ``LINK_BUFFER_S`` behind: the time this thread and the client spend between
        chunks overlaps the transmission, as a real link's buffers let it, instead of adding to
        it (which held a 100 MB/s cap to 72-75 MB/s on the 2-core dev box)."""
        if self.rate is None:
            return
        with self._lock:
            now = time.monotonic()
            self._link_free = max(now - LINK_BUFFER_S, self._link_free) + n / self.rate
            until = self._link_free
        if until > now:
            time.sleep(until - now)

    def _take_interrupt(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            for key in ((repo_id, filename), (None, filename)):
                if key in self._interrupts:
                    after_bytes, times = self._interrupts[key]
                    if times <= 1:
                        del self._interrupts[key]
                    else:
                        self._interrupts[key][1] = times - 1
                    return after_bytes
        return None

    def _is_corrupt(self, repo_id: str, filename: str) -> bool:
        with self._lock:
            return (repo_id, filename) in self._corrupt or (None, filename) in self._corrupt

    def _ignores_range(self, repo_id: str, filename: str) -> bool:
        with self._lock:
            return bool({(repo_id, filename), (None, filename)} & self._ignore_range)

    # ------------------------------------------------------------------ request log
    def file_requests(self, filename: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests that target ``filename`` (resolve URL on the hub or CDN URL)."""
        out = []
        with self._lock:
            reqs = list(self.requests)
        for r in reqs:
            if method is not None and r.method != method:
                continue
            target = (
                r.path.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in r.path else None
            )
            if r.server == "cdn":
                target = r.query.get("filename", [None])[0]
            if target == filename:
                out.append(r)
        return out

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    # ------------------------------------------------------------------ lookups
    def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, RepoFileEntry]]:
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise _HttpError(
                    404,
                    "Repository not found",
                    {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                )
            sha = repo.refs.get(revision)
            if sha is None and revision.lower() in repo.commits:
                sha = revision.lower()
            if sha is None:
                raise _HttpError(
                    404,
                    f"Invalid rev id: {revision}",
                    {
                        "X-Error-Code": "RevisionNotFound",
                        "X-Error-Message": f"Invalid rev id: {revision}",
                    },
                )
            return sha, repo.commits[sha]

    def _find_blob(self, repo_id: str, sha256: str) -> RepoFileEntry | None:
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                return None
            for files in repo.commits.values():
                for entry in files.values():
                    if entry.is_lfs and entry.sha256 == sha256:
                        return entry
        return None

    def _known_repo(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the per-server subclass
    role: str
    protocol_version = "HTTP/1.1"  # keep-alive + Range, like the real Hub
    server_version = "FakeHub/1.0"
    timeout = 30  # idle keep-alive connections die eventually even if stop() is not called

    # -- plumbing ---------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._open_sockets.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean; everything is in hub.requests

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def _unsupported(self) -> None:
        self._dispatch(unsupported=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _unsupported  # noqa: N815

    def _dispatch(self, unsupported: bool = False) -> None:
        split = urlsplit(self.path)
        self._rec = RecordedRequest(
            server=self.role,
            method=self.command,
            path=unquote(split.path),
            raw_path=self.path,
            query=parse_qs(split.query),
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        self.hub._record(self._rec)
        try:
            if unsupported:
                raise _HttpError(405, "Method not allowed")
            if self.role == "cdn":
                self._handle_cdn(split.path)
            else:
                self._check_auth()
                self._handle_hub(split.path, self._rec.query)
        except _HttpError as e:
            self._send_error(e)

    def _send_error(self, e: _HttpError) -> None:
        body = json.dumps({"error": e.message}).encode()
        self._rec.status = e.status
        self.send_response(e.status)
        for k, v in e.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: object, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._rec.status = 200
        self.send_response(200)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _check_auth(self) -> None:
        token = self.hub.require_token
        if token is None:
            return
        auth = self.headers.get("Authorization")
        if auth is None:
            raise _HttpError(
                401,
                "Invalid username or password.",
                {
                    "X-Error-Code": "RepoNotFound",
                    "X-Error-Message": "Invalid username or password.",
                },
            )
        if auth != f"Bearer {token}":
            raise _HttpError(
                401,
                "Invalid credentials in Authorization header",
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )

    # -- hub routes -------------------------------------------------------------
    def _handle_hub(self, raw_path: str, query: dict[str, list[str]]) -> None:
        # Work on raw (still percent-encoded) segments: revisions are quoted with safe="".
        segs = [s for s in raw_path.split("/") if s != ""]
        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "models":
            self._handle_api(segs[2:], query)
            return
        n = None
        if (
            len(segs) >= 5
            and segs[2] == "resolve"
            and self.hub._known_repo(f"{unquote(segs[0])}/{unquote(segs[1])}")
        ):
            n = 2  # "ns/name/resolve/{rev}/{filename}"
        elif len(segs) >= 4 and segs[1] == "resolve":
            n = 1  # legacy un-namespaced "name/resolve/{rev}/{filename}"
        elif len(segs) >= 5 and segs[2] == "resolve":
            n = 2  # unknown repo => RepoNotFound below
        if n is not None:
            repo_id = "/".join(unquote(s) for s in segs[:n])
            revision = unquote(segs[n + 1])
            filename = unquote("/".join(segs[n + 2 :]))
            self._handle_resolve(repo_id, revision, filename)
            return
        raise _HttpError(404, "Not found")

    def _split_repo(self, rest: list[str]) -> tuple[str, list[str]]:
        if len(rest) >= 2 and self.hub._known_repo(f"{unquote(rest[0])}/{unquote(rest[1])}"):
            return f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2:]
        if self.hub._known_repo(unquote(rest[0])):
            return unquote(rest[0]), rest[1:]
        if len(rest) >= 2:
            return f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2:]
        return unquote(rest[0]), rest[1:]

    def _handle_api(self, rest: list[str], query: dict[str, list[str]]) -> None:
        repo_id, tail = self._split_repo(rest)
        if not tail:
            self._model_info(repo_id, "main", query)
        elif tail[0] == "revision" and len(tail) == 2:
            self._model_info(repo_id, unquote(tail[1]), query)
        elif tail[0] == "tree" and len(tail) >= 2:
            path_in_repo = unquote("/".join(tail[2:])).strip("/")
            self._tree(repo_id, unquote(tail[1]), path_in_repo, query)
        else:
            self.hub._resolve(repo_id, "main")  # RepoNotFound if unknown
            raise _HttpError(404, "Not found")

    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        sha, files = self.hub._resolve(repo_id, revision)
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for entry in files.values():
            sib: dict[str, object] = {"rfilename": entry.path}
            if blobs:
                sib["size"] = entry.size
                sib["blobId"] = entry.blob_id
                if entry.is_lfs:
                    sib["lfs"] = {
                        "sha256": entry.sha256,
                        "size": entry.size,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sib)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        self._send_json(
            {
                "_id": sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": author,
                "sha": sha,
                "lastModified": _FIXED_DATE,
                "createdAt": _FIXED_DATE,
                "private": self.hub.require_token is not None,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e.size for e in files.values()),
            }
        )

    def _tree(
        self, repo_id: str, revision: str, path_in_repo: str, query: dict[str, list[str]]
    ) -> None:
        _sha, files = self.hub._resolve(repo_id, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path_in_repo}/" if path_in_repo else ""
        if path_in_repo and not any(p.startswith(prefix) for p in files):
            raise _HttpError(
                404,
                f"Entry not found: {path_in_repo}",
                {
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": f"{path_in_repo} does not exist",
                },
            )
        dirs: set[str] = set()
        out_files = []
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            rel_parts = path[len(prefix) :].split("/")
            for i in range(1, len(rel_parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(rel_parts[:i]))
            if not recursive and len(rel_parts) > 1:
                continue
            item: dict[str, object] = {
                "type": "file",
                "oid": entry.blob_id,
                "size": entry.size,
                "path": path,
            }
            if entry.is_lfs:
                item["lfs"] = {
                    "oid": entry.sha256,
                    "size": entry.size,
                    "pointerSize": entry.pointer_size,
                }
            out_files.append(item)
        out: list[dict[str, object]] = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        self._send_json(out + out_files)

    def _handle_resolve(self, repo_id: str, revision: str, filename: str) -> None:
        sha, files = self.hub._resolve(repo_id, revision)
        entry = files.get(filename)
        if entry is None:
            raise _HttpError(
                404,
                "Entry not found",
                {
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": "Entry not found",
                    "X-Repo-Commit": sha,
                },
            )
        base = {
            "X-Repo-Commit": sha,
            "Content-Disposition": _content_disposition(filename),
            "Access-Control-Expose-Headers": (
                "X-Repo-Commit,X-Linked-Etag,X-Linked-Size,ETag,Content-Range"
            ),
        }
        if entry.is_lfs:
            base["X-Linked-Etag"] = f'"{entry.sha256}"'
            base["X-Linked-Size"] = str(entry.size)
            if self.hub.cdn:
                location = (
                    f"{self.hub.cdn_endpoint}/repos/{quote(repo_id)}/{entry.sha256}"
                    f"?filename={quote(filename, safe='')}&repo_commit={sha}"
                )
                body = b"Found. Redirecting to " + location.encode()
                self._rec.status = 302
                self.send_response(302)
                for k, v in base.items():
                    self.send_header(k, v)
                self.send_header("ETag", f'"{entry.blob_id}"')  # the pointer's etag, like the Hub
                self.send_header("Location", location)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
        self._send_file(repo_id, entry, base)

    # -- cdn routes ---------------------------------------------------------------
    def _handle_cdn(self, raw_path: str) -> None:
        segs = [unquote(s) for s in raw_path.split("/") if s != ""]
        if len(segs) < 3 or segs[0] != "repos":
            raise _HttpError(404, "NoSuchKey")
        repo_id, sha256 = "/".join(segs[1:-1]), segs[-1]
        entry = self.hub._find_blob(repo_id, sha256)
        if entry is None:
            raise _HttpError(404, "NoSuchKey")
        self._send_file(repo_id, entry, {"Content-Disposition": _content_disposition(entry.path)})

    # -- file bodies --------------------------------------------------------------
    def _send_file(self, repo_id: str, entry: RepoFileEntry, headers: dict[str, str]) -> None:
        data = entry.data
        if self.command == "GET" and self.hub._is_corrupt(repo_id, entry.path) and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        size = len(data)
        status, start, end = 200, 0, size - 1
        range_header = self.headers.get("Range")
        if range_header and size > 0 and not self.hub._ignores_range(repo_id, entry.path):
            rng = _parse_range(range_header, size)
            if rng is not None:
                status, (start, end) = 206, rng
        length = max(end - start + 1, 0)
        cut = self.hub._take_interrupt(repo_id, entry.path) if self.command == "GET" else None

        self._rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if cut is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        to_send = length if cut is None else min(max(cut, 0), length)
        pos, stop = start, start + to_send
        stall = self.hub._stall_of(repo_id, entry.path) if self.command == "GET" else None
        try:
            while pos < stop:
                n = min(_CHUNK, stop - pos)
                if stall is not None and pos <= stall[0] < stop:
                    if pos == stall[0]:
                        self.wfile.flush()
                        stall[1].set()
                        stall[2].wait()
                        stall = None
                        continue
                    n = min(n, stall[0] - pos)
                self.hub._throttle(n)
                # Count before writing: the client may be done before this thread runs again.
                self._rec.bytes_sent += n
                self.wfile.write(data[pos : pos + n])
                pos += n
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            # Abort mid-body: the client has been promised `length` bytes.
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _contents(path: Path, threshold: int) -> bytes | mmap.mmap:
    """A file's bytes: read when small, mapped read-only when larger than ``threshold``."""
    if path.stat().st_size <= threshold:
        return path.read_bytes()
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _content_disposition(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
