"""moepack.convert.hub against the loopback FakeHub (no network, real huggingface_hub client)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import types
from pathlib import Path

import pytest
from fake_hub import FakeHub
from huggingface_hub import constants, file_download

from moepack.convert import hub as hub_module
from moepack.convert.hub import HubError, HubRepo, open_repo

pytestmark = pytest.mark.usefixtures("isolated_hf")

REPO = "acme/tiny-moe"
TOKEN = "hf_secret_token_123"
CONFIG = json.dumps({"model_type": "tiny", "num_experts": 4}).encode()
QUANT = json.dumps({"quantization": {"quant_algo": "NVFP4"}}).encode()
WEIGHTS = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(8192))  # 256 KiB
CHUNK = 16 * 1024  # DOWNLOAD_CHUNK_SIZE in the resume tests
SHARD = "model.safetensors"


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_bytes(CONFIG)
    (d / "hf_quant_config.json").write_bytes(QUANT)
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (d / SHARD).write_bytes(WEIGHTS)
    return d


@pytest.fixture
def hub(repo_dir: Path):
    with FakeHub() as h:
        h.commit = h.add_repo(REPO, repo_dir)
        yield h


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _open(hub: FakeHub, cache: Path, revision: str | None = None, **kw) -> HubRepo:
    kw.setdefault("token", False)
    return open_repo(REPO, revision, endpoint=hub.endpoint, cache_dir=cache, **kw)


def _storage(cache: Path) -> Path:
    return cache / "models--acme--tiny-moe"


def _gets(hub: FakeHub, filename: str) -> list:
    """Transfers of the file's bytes (the CDN GETs, not the hub's 302 answers)."""
    return [r for r in hub.file_requests(filename, method="GET") if r.server == "cdn"]


# --------------------------------------------------------------------------- listing
def test_resolves_branch_and_sha(hub: FakeHub, cache: Path) -> None:
    repo = _open(hub, cache)
    assert (repo.revision, repo.commit) == ("main", hub.commit)
    assert repo.files[SHARD].sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert repo.files[SHARD].size == len(WEIGHTS)
    assert repo.files["config.json"].sha256 is None and repo.files["config.json"].blob_id
    by_sha = _open(hub, cache, hub.commit)
    assert (by_sha.revision, by_sha.commit) == (hub.commit, hub.commit)


def test_download_pinned_to_resolved_commit(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    repo = _open(hub, cache)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text('{"model_type": "other"}')
    hub.add_repo(REPO, moved)  # main moves after the listing
    assert repo.fetch(["config.json"])["config.json"].read_bytes() == CONFIG


# --------------------------------------------------------------------------- fetch
def test_config_first_fetches_no_weights(hub: FakeHub, cache: Path) -> None:
    repo = _open(hub, cache)
    paths = repo.fetch(["config.json", "hf_quant_config.json"])
    assert paths["hf_quant_config.json"].read_bytes() == QUANT
    assert repo.sha256_of("config.json") == hashlib.sha256(CONFIG).hexdigest()
    assert hub.file_requests(SHARD) == []
    with pytest.raises(HubError, match="not been fetched"):
        repo.sha256_of(SHARD)


def test_full_fetch_verified_and_cached(
    hub: FakeHub, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["config.json", "hf_quant_config.json", "tokenizer/vocab.txt", SHARD]
    repo = _open(hub, cache)
    paths = repo.fetch(names, progress=True)
    assert paths[SHARD].read_bytes() == WEIGHTS
    assert paths["tokenizer/vocab.txt"].read_text() == "a\nb\nc\n"
    assert paths[SHARD].parent.name == hub.commit
    assert repo.sha256_of(SHARD) == hashlib.sha256(WEIGHTS).hexdigest()
    assert repo.to_dict()["files"][SHARD] == {
        "size": len(WEIGHTS),
        "sha256": repo.sha256_of(SHARD),
    }
    assert "download acme/tiny-moe" in capsys.readouterr().err  # one total bar, on stderr
    assert not list(_storage(cache).rglob("*.part")) and not list(cache.rglob("*.incomplete"))
    assert [r.status for r in _gets(hub, SHARD)] == [200]

    hub.clear_requests()  # a second run re-verifies from cache without any transfer
    again = _open(hub, cache).fetch(names)
    assert again == paths and not [
        r for r in hub.requests if r.method == "GET" and "/api/" not in r.path
    ]


def test_in_call_retry_resumes_with_range(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, retry_sleeps: list[float]
) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    hub.interrupt_once(SHARD, after_bytes=100_000)
    assert _open(hub, cache).fetch([SHARD])[SHARD].read_bytes() == WEIGHTS
    assert [r.range for r in _gets(hub, SHARD)] == [None, f"bytes={(100_000 // CHUNK) * CHUNK}-"]
    assert retry_sleeps == [1]


def test_interrupted_download_resumes_in_next_call(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link that dies for good fails the call; the next call continues from the saved bytes."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)

    def link_dies(_seconds: float) -> None:  # after the first cut, every retry makes no progress
        hub.interrupt(SHARD, after_bytes=0, times=5)

    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=link_dies))
    hub.interrupt_once(SHARD, after_bytes=100_000)
    saved = (100_000 // CHUNK) * CHUNK
    with pytest.raises(HubError, match=r"'model\.safetensors'.*bytes saved: rerun to resume"):
        _open(hub, cache).fetch([SHARD])
    part = _storage(cache) / "blobs" / f"{hashlib.sha256(WEIGHTS).hexdigest()}.part"
    assert part.stat().st_size == saved

    hub.clear_faults()
    hub.clear_requests()
    assert _open(hub, cache).fetch([SHARD])[SHARD].read_bytes() == WEIGHTS
    (resumed,) = _gets(hub, SHARD)
    assert resumed.range == f"bytes={saved}-" and resumed.status == 206
    assert resumed.bytes_sent == len(WEIGHTS) - saved
    assert not part.exists()


def _read_backs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the client hashes by reading them back from disk after their transfer."""
    seen: list[str] = []
    verify = hub_module._verify

    def recording(path: Path, rf):  # noqa: ANN001, ANN202 - hub_module._verify's signature
        seen.append(rf.path)
        return verify(path, rf)

    monkeypatch.setattr(hub_module, "_verify", recording)
    return seen


def test_shard_hashed_as_it_arrives_not_read_back(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LFS shard's sha256 comes from the bytes as they were written: no second read of it.
    Small files (git blobs, through hf_hub_download) are still read back."""
    read_backs = _read_backs(monkeypatch)
    repo = _open(hub, cache)
    assert repo.fetch([SHARD, "config.json"])[SHARD].read_bytes() == WEIGHTS
    assert repo.sha256_of(SHARD) == hashlib.sha256(WEIGHTS).hexdigest()
    assert read_backs == ["config.json"]
    _open(hub, cache).fetch([SHARD])  # already cached: nothing hashed it as it arrived
    assert read_backs == ["config.json", SHARD]


def test_resume_from_a_server_that_ignores_range(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers a resume's Range with the whole file (200): http_get truncates the
    .part and writes it all again, and the hash restarts with it."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    part = _storage(cache) / "blobs" / f"{hashlib.sha256(WEIGHTS).hexdigest()}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS[:50_000])
    hub.ignore_range(SHARD)
    read_backs = _read_backs(monkeypatch)
    repo = _open(hub, cache)
    assert repo.fetch([SHARD])[SHARD].read_bytes() == WEIGHTS
    (whole,) = _gets(hub, SHARD)
    assert whole.range == "bytes=50000-" and whole.status == 200
    assert repo.sha256_of(SHARD) == hashlib.sha256(WEIGHTS).hexdigest() and read_backs == []


def test_saved_bytes_that_rotted_are_caught_after_the_resume(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash covers the bytes an earlier call saved, as they are on disk now: a .part that
    went bad meanwhile fails the check and the file is fetched again whole."""
    part = _storage(cache) / "blobs" / f"{hashlib.sha256(WEIGHTS).hexdigest()}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" + WEIGHTS[1:50_000])
    assert _open(hub, cache).fetch([SHARD])[SHARD].read_bytes() == WEIGHTS
    assert [r.range for r in _gets(hub, SHARD)] == ["bytes=50000-", None]


def test_dead_link_that_saved_nothing_does_not_promise_a_resume(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch, retry_sleeps: list[float]
) -> None:
    """A transfer cut before its first byte leaves no .part: the error says nothing was saved
    instead of telling the user to rerun to resume."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    hub.interrupt(SHARD, after_bytes=0, times=10)
    with pytest.raises(HubError) as err:
        _open(hub, cache).fetch([SHARD])
    message = str(err.value)
    assert "'model.safetensors'" in message and "nothing of this file was saved" in message
    assert "resume" not in message
    part = _storage(cache) / "blobs" / f"{hashlib.sha256(WEIGHTS).hexdigest()}.part"
    assert not part.exists() or part.stat().st_size == 0


def test_corrupted_transfer_refetched_once_then_error(hub: FakeHub, cache: Path) -> None:
    hub.corrupt(SHARD)
    repo = _open(hub, cache)
    expected = hashlib.sha256(WEIGHTS).hexdigest()
    with pytest.raises(HubError) as exc:
        repo.fetch([SHARD])
    msg = str(exc.value)
    assert "'model.safetensors'" in msg and expected in msg and "forced re-download" in msg
    assert len(_gets(hub, SHARD)) == 2  # first try + one forced refetch
    storage = _storage(cache)
    assert list((storage / "blobs").iterdir()) == []  # nothing bad left to serve
    assert not (storage / "snapshots" / hub.commit / SHARD).exists()

    hub.clear_faults()
    assert repo.fetch([SHARD])[SHARD].read_bytes() == WEIGHTS


def test_corrupted_cache_entry_repaired(hub: FakeHub, cache: Path) -> None:
    path = _open(hub, cache).fetch([SHARD])[SHARD]
    blob = path.resolve()
    blob.write_bytes(b"\0" + WEIGHTS[1:])  # bit rot in the cache
    hub.clear_requests()
    repo = _open(hub, cache)
    assert repo.fetch([SHARD])[SHARD].read_bytes() == WEIGHTS
    assert len(_gets(hub, SHARD)) == 1 and _gets(hub, SHARD)[0].range is None


def test_corrupted_small_file_checked_against_git_blob_id(hub: FakeHub, cache: Path) -> None:
    hub.corrupt("config.json")
    with pytest.raises(HubError, match=r"'config\.json'.*expected sha256 git blob [0-9a-f]{40}"):
        _open(hub, cache).fetch(["config.json"])


# --------------------------------------------------------------------------- errors
def test_unknown_repo_revision_and_file(hub: FakeHub, cache: Path) -> None:
    with pytest.raises(HubError, match=r"acme/missing@main.*repository not found"):
        open_repo("acme/missing", endpoint=hub.endpoint, cache_dir=cache, token=False)
    with pytest.raises(HubError, match=r"acme/tiny-moe@nobranch.*revision not found"):
        _open(hub, cache, "nobranch")
    repo = _open(hub, cache)
    hub.clear_requests()
    with pytest.raises(HubError, match=r"'nope\.bin' of acme/tiny-moe@main.*no such file"):
        repo.fetch(["config.json", "nope.bin"])
    assert hub.requests == []  # refused before any transfer


def test_unreachable_endpoint_and_offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    with pytest.raises(HubError, match="unreachable"):
        open_repo(REPO, endpoint=dead, cache_dir=cache, token=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        open_repo(REPO, endpoint=dead, cache_dir=cache, token=False)


def test_401_errors_never_show_the_token(hub: FakeHub, cache: Path) -> None:
    hub.require_token = TOKEN
    with pytest.raises(HubError, match="set HF_TOKEN") as missing:
        _open(hub, cache)
    with pytest.raises(HubError, match="401") as wrong:
        _open(hub, cache, token=TOKEN + "x")
    repo = _open(hub, cache, token=TOKEN)
    hub.require_token = TOKEN + "rotated"  # token revoked between listing and download
    with pytest.raises(HubError, match=r"'config\.json'.*401") as revoked:
        repo.fetch(["config.json"])
    for exc in (missing, wrong, revoked):
        assert TOKEN not in str(exc.value)


def test_token_sent_to_hub_only_and_never_exposed(hub: FakeHub, cache: Path) -> None:
    hub.require_token = TOKEN
    repo = _open(hub, cache, token=TOKEN)
    assert repo.fetch([SHARD, "config.json"])[SHARD].read_bytes() == WEIGHTS
    hub_reqs = [r for r in hub.requests if r.server == "hub"]
    cdn_reqs = [r for r in hub.requests if r.server == "cdn"]
    assert hub_reqs and all(r.authorization == f"Bearer {TOKEN}" for r in hub_reqs)
    assert cdn_reqs and all(r.authorization is None for r in cdn_reqs)
    for text in (repr(repo), str(repo), str(dataclasses.asdict(repo)), json.dumps(repo.to_dict())):
        assert TOKEN not in text
    assert not any(TOKEN.encode() in p.read_bytes() for p in cache.rglob("*") if p.is_file())


def test_hf_token_env_is_honoured(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.require_token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = open_repo(REPO, endpoint=hub.endpoint, cache_dir=cache)
    assert repo.fetch([SHARD])[SHARD].read_bytes() == WEIGHTS
    assert TOKEN not in repr(repo)
