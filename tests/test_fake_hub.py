"""Tests for tests/fake_hub.py, driven by the real huggingface_hub (2.4.0) client.

They also pin down how huggingface_hub 2.4.0 downloads, which moepack's downloader relies on:

* ``hf_hub_download`` = one ``HEAD /{repo}/resolve/{rev}/{file}`` (metadata: ``X-Repo-Commit``,
  ``X-Linked-Etag``/``ETag``, ``X-Linked-Size``/``Content-Length``; an off-origin 302 is *not*
  followed, its ``Location`` is used for the GET and ``Authorization`` is dropped) then one
  ``GET`` of the file into ``blobs/<etag>.<8 hex>.incomplete``, renamed to ``blobs/<etag>``.
* A transfer cut mid-body (``httpx2.RemoteProtocolError``) is retried *inside the same call*, up
  to 5 times, after ``time.sleep(1)``, with ``Range: bytes=N-`` where N is what was already
  written. Bytes are written in ``constants.DOWNLOAD_CHUNK_SIZE`` (10 MiB) chunks and a partial
  chunk is lost, so for a cut before the first 10 MiB the retry is a plain full GET.
* The ``.incomplete`` name is unique per attempt and deleted when the call fails: there is no
  resume *across* calls in 2.4.0.
* Only the size is checked; the sha256 is never verified (see ``test_corrupted_file_*``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path

import httpx2
import pytest
from fake_hub import FakeHub, git_blob_sha1
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.usefixtures("isolated_hf")

REPO = "acme/tiny-moe"
CONFIG = json.dumps({"model_type": "tiny", "num_experts": 4}, indent=2).encode()
# Deterministic pseudo-random "weights": 16 chunks of the 16 KiB DOWNLOAD_CHUNK_SIZE used below.
WEIGHTS = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(8192))  # 256 KiB


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_bytes(CONFIG)
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (d / "model.safetensors").write_bytes(WEIGHTS)
    return d


@pytest.fixture
def hub(repo_dir: Path):
    with FakeHub() as h:
        h.add_repo(REPO, repo_dir)
        yield h


def _dl(hub: FakeHub, cache: Path, filename: str, revision: str = "main", **kw) -> Path:
    kw.setdefault("token", False)
    path = hf_hub_download(
        REPO, filename, revision=revision, cache_dir=cache, endpoint=hub.endpoint, **kw
    )
    return Path(path)


def _incomplete_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.incomplete"))


# --------------------------------------------------------------------------- metadata
def test_commit_is_deterministic(repo_dir: Path) -> None:
    with FakeHub() as a, FakeHub() as b:
        assert a.add_repo(REPO, repo_dir) == b.add_repo(REPO, repo_dir)
        assert a.add_repo("x/y", repo_dir, commit="ab" * 20) == "ab" * 20


def test_model_info_files_metadata(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.endpoint, token=False)
    info = api.model_info(REPO, revision="main", files_metadata=True)
    assert info.id == REPO
    assert len(info.sha) == 40
    sha = info.sha
    sibs = {s.rfilename: s for s in info.siblings}
    assert set(sibs) == {"config.json", "model.safetensors", "tokenizer/vocab.txt"}
    assert sibs["config.json"].size == len(CONFIG)
    assert sibs["config.json"].blob_id == git_blob_sha1(CONFIG)
    assert sibs["config.json"].lfs is None
    lfs = sibs["model.safetensors"].lfs
    assert lfs is not None
    assert lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert lfs.size == sibs["model.safetensors"].size == len(WEIGHTS)
    assert lfs.pointer_size > 0

    # Revision may be the commit sha; files_metadata=False gives bare names.
    bare = api.model_info(REPO, revision=sha)
    assert bare.sha == sha
    assert all(s.size is None and s.lfs is None for s in bare.siblings)

    assert sorted(api.list_repo_files(REPO)) == sorted(sibs)
    assert api.list_repo_files(REPO, revision=sha) == api.list_repo_files(REPO)

    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing")


def test_second_branch(hub: FakeHub, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    sha_dev = hub.add_repo(REPO, other, revision="dev")
    api = HfApi(endpoint=hub.endpoint, token=False)
    assert api.model_info(REPO, revision="dev").sha == sha_dev
    assert api.model_info(REPO).sha != sha_dev
    assert api.list_repo_files(REPO, revision="dev") == ["config.json"]


# --------------------------------------------------------------------------- downloads
def test_download_small_and_lfs(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sha = HfApi(endpoint=hub.endpoint, token=False).model_info(REPO).sha

    small = _dl(hub, cache, "config.json")
    assert small.read_bytes() == CONFIG
    assert small.parent.name == sha  # snapshots/<commit>/config.json
    assert Path(small).resolve().name == git_blob_sha1(CONFIG)  # blob named by git sha1

    nested = _dl(hub, cache, "tokenizer/vocab.txt", revision=sha)
    assert nested.read_text() == "a\nb\nc\n"

    big = _dl(hub, cache, "model.safetensors")
    assert big.read_bytes() == WEIGHTS
    assert big.resolve().name == hashlib.sha256(WEIGHTS).hexdigest()  # blob named by sha256
    assert (cache / "models--acme--tiny-moe" / "refs" / "main").read_text() == sha

    heads = hub.file_requests("model.safetensors", method="HEAD")
    gets = hub.file_requests("model.safetensors", method="GET")
    assert [r.status for r in heads] == [302] and heads[0].server == "hub"
    assert [(r.server, r.status, r.range) for r in gets] == [("cdn", 200, None)]
    assert _incomplete_files(cache) == []

    # Cached + commit sha as revision => no network at all.
    hub.clear_requests()
    assert _dl(hub, cache, "model.safetensors", revision=sha).read_bytes() == WEIGHTS
    assert hub.requests == []


def test_lfs_without_cdn(repo_dir: Path, tmp_path: Path) -> None:
    with FakeHub(cdn=False) as h:
        h.add_repo(REPO, repo_dir)
        assert _dl(h, tmp_path / "c", "model.safetensors").read_bytes() == WEIGHTS
        assert [r.status for r in h.file_requests("model.safetensors")] == [200, 200]
        assert all(r.server == "hub" for r in h.requests)


def test_missing_entry_revision_and_repo(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sha = HfApi(endpoint=hub.endpoint, token=False).model_info(REPO).sha
    with pytest.raises(RemoteEntryNotFoundError):
        _dl(hub, cache, "nope.bin")
    # The client caches the non-existence thanks to X-Repo-Commit on the 404.
    assert (cache / "models--acme--tiny-moe" / ".no_exist" / sha / "nope.bin").exists()
    with pytest.raises(RevisionNotFoundError):
        _dl(hub, cache, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "acme/missing", "config.json", cache_dir=cache, endpoint=hub.endpoint, token=False
        )


def test_token_required_and_not_leaked_to_cdn(hub: FakeHub, tmp_path: Path) -> None:
    hub.require_token = "hf_test_token"
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        _dl(hub, cache, "config.json")

    hub.clear_requests()
    api = HfApi(endpoint=hub.endpoint, token="hf_test_token")
    assert api.model_info(REPO, files_metadata=True).sha
    path = _dl(hub, cache, "model.safetensors", token="hf_test_token")
    assert path.read_bytes() == WEIGHTS
    hub_reqs = [r for r in hub.requests if r.server == "hub"]
    cdn_reqs = [r for r in hub.requests if r.server == "cdn"]
    assert hub_reqs and all(r.authorization == "Bearer hf_test_token" for r in hub_reqs)
    assert cdn_reqs and all(r.authorization is None for r in cdn_reqs)


def test_snapshot_download_allow_patterns_skips_weights(hub: FakeHub, tmp_path: Path) -> None:
    folder = Path(
        snapshot_download(
            REPO,
            cache_dir=tmp_path / "cache",
            endpoint=hub.endpoint,
            token=False,
            allow_patterns=["*.json", "tokenizer/*"],
        )
    )
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "tokenizer/vocab.txt"]
    assert (folder / "config.json").read_bytes() == CONFIG
    assert hub.file_requests("model.safetensors") == []  # neither HEAD nor GET
    assert not any(r.server == "cdn" for r in hub.requests)
    paths = [r.path for r in hub.requests]
    assert f"/api/models/{REPO}/revision/main" in paths
    assert any(p.startswith(f"/api/models/{REPO}/tree/") for p in paths)


# --------------------------------------------------------------------------- faults
def test_interrupted_transfer_resumes_with_range_in_same_call(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry_sleeps: list[float]
) -> None:
    chunk = 16 * 1024
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    cache = tmp_path / "cache"
    hub.interrupt_once("model.safetensors", after_bytes=100_000)

    assert _dl(hub, cache, "model.safetensors").read_bytes() == WEIGHTS

    gets = hub.file_requests("model.safetensors", method="GET")
    assert [(r.status, r.bytes_sent) for r in gets][0] == (200, 100_000)
    resumed = gets[1]
    written = (100_000 // chunk) * chunk  # the partial chunk in the client buffer is lost
    assert resumed.range == f"bytes={written}-"
    assert resumed.status == 206 and resumed.bytes_sent == len(WEIGHTS) - written
    assert len(gets) == 2 and retry_sleeps == [1]
    assert _incomplete_files(cache) == []


def test_interrupt_before_first_chunk_refetches_whole_file(
    hub: FakeHub, tmp_path: Path, retry_sleeps: list[float]
) -> None:
    """With the default 10 MiB DOWNLOAD_CHUNK_SIZE nothing reaches the .incomplete file before
    the cut, so the in-call retry is a full GET without Range."""
    hub.interrupt_once("model.safetensors", after_bytes=100_000)
    assert _dl(hub, tmp_path / "c", "model.safetensors").read_bytes() == WEIGHTS
    gets = hub.file_requests("model.safetensors", method="GET")
    assert [(r.status, r.range) for r in gets] == [(200, None), (200, None)]
    assert retry_sleeps == [1]


def test_retry_budget_resets_while_progressing(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry_sleeps: list[float]
) -> None:
    """The 5-retry budget is reset whenever a chunk was written, so a link that keeps cutting
    but makes progress is retried more than 5 times within one call."""
    chunk = 16 * 1024
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    hub.interrupt("model.safetensors", after_bytes=20_000, times=7)
    assert _dl(hub, tmp_path / "c", "model.safetensors").read_bytes() == WEIGHTS
    gets = hub.file_requests("model.safetensors", method="GET")
    assert len(gets) == 8 and len(retry_sleeps) == 7
    assert [r.range for r in gets] == [None] + [f"bytes={i * chunk}-" for i in range(1, 8)]


def test_retries_exhausted_leaves_no_incomplete_file(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retry_sleeps: list[float]
) -> None:
    """1 + 5 cut transfers without progress => the call raises httpx2.RemoteProtocolError; the
    temp file is deleted, so the next call starts from byte 0 (no cross-call resume)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    cache = tmp_path / "cache"
    hub.interrupt("model.safetensors", after_bytes=1000, times=6)
    with pytest.raises(httpx2.RemoteProtocolError):
        _dl(hub, cache, "model.safetensors")
    gets = hub.file_requests("model.safetensors", method="GET")
    assert len(gets) == 6 and len(retry_sleeps) == 5
    assert all(r.range is None for r in gets)  # nothing written => nothing to resume from
    blobs = cache / "models--acme--tiny-moe" / "blobs"
    assert _incomplete_files(cache) == [] and list(blobs.iterdir()) == []

    hub.clear_requests()
    assert _dl(hub, cache, "model.safetensors").read_bytes() == WEIGHTS
    assert [r.range for r in hub.file_requests("model.safetensors", method="GET")] == [None]


def test_corrupted_file_is_accepted_without_sha256_check(hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub 2.4.0 does NOT verify the sha256 of downloaded files (only their size):
    a corrupted LFS blob is stored under its advertised sha256 name and served from cache from
    then on. moepack's downloader must hash files itself (against model_info(...,
    files_metadata=True).siblings[i].lfs.sha256) and re-download with force_download=True."""
    cache = tmp_path / "cache"
    expected = hashlib.sha256(WEIGHTS).hexdigest()
    hub.corrupt("model.safetensors")

    path = _dl(hub, cache, "model.safetensors")
    data = path.read_bytes()
    assert len(data) == len(WEIGHTS) and data != WEIGHTS
    assert hashlib.sha256(data).hexdigest() != expected
    assert path.resolve().name == expected  # cached under the advertised (wrong) hash

    info = HfApi(endpoint=hub.endpoint, token=False).model_info(REPO, files_metadata=True)
    sib = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert sib.lfs is not None and sib.lfs.sha256 == expected

    # Still corrupt on a second call: the blob is reused, no GET.
    hub.clear_requests()
    hub.clear_faults()
    assert _dl(hub, cache, "model.safetensors").read_bytes() == data
    assert hub.file_requests("model.safetensors", method="GET") == []
    # force_download repairs it.
    assert _dl(hub, cache, "model.safetensors", force_download=True).read_bytes() == WEIGHTS


def test_corrupted_small_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt("config.json")
    data = _dl(hub, tmp_path / "c", "config.json").read_bytes()
    assert len(data) == len(CONFIG) and data != CONFIG


# --------------------------------------------------------------------------- raw HTTP
def _raw(hub: FakeHub, path: str, method: str = "GET", **headers: str):
    """One request with http.client (no redirect following, no retries)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.endpoint.rsplit(":", 1)[1]), timeout=5)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_raw_range_and_errors(hub: FakeHub) -> None:
    sha = HfApi(endpoint=hub.endpoint, token=False).model_info(REPO).sha
    url = f"/{REPO}/resolve/{sha}/config.json"
    status, headers, body = _raw(hub, url, "HEAD")
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == sha
    assert headers["ETag"] == f'"{git_blob_sha1(CONFIG)}"'
    assert headers["Content-Length"] == str(len(CONFIG))

    status, headers, body = _raw(hub, url, Range="bytes=2-5")
    assert (status, body) == (206, CONFIG[2:6])
    assert headers["Content-Range"] == f"bytes 2-5/{len(CONFIG)}"
    assert _raw(hub, url, Range="bytes=-3")[2] == CONFIG[-3:]
    assert _raw(hub, url, Range=f"bytes={len(CONFIG)}-")[0] == 416

    status, headers, _ = _raw(hub, f"/{REPO}/resolve/main/model.safetensors", "HEAD")
    assert status == 302
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert headers["X-Linked-Size"] == str(len(WEIGHTS))
    assert headers["Location"].startswith(hub.cdn_endpoint + "/")

    status, headers, _ = _raw(hub, f"/{REPO}/resolve/main/missing.txt", "HEAD")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == sha
    status, headers, _ = _raw(hub, f"/{REPO}/resolve/nobranch/config.json")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = _raw(hub, "/acme/missing/resolve/main/config.json")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
