"""Format v2 sha256 chains: one file's sha256 checked chunk by chunk, in parallel, exactly."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import pytest

from moepack import sha256chain
from moepack.convert.pipeline import convert_checkpoint
from moepack.format import constants
from moepack.runtime.loader import load
from moepack.runtime.verify import verify_artifact

pytestmark = pytest.mark.skipif(not sha256chain.available(), reason="needs libcrypto SHA256_*")


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 5 * 4096 + 100])
def test_chain_digest_and_every_chunk(size: int) -> None:
    data = os.urandom(size)
    c = sha256chain.Chain(4096)
    for i in range(0, size, 1000):  # pieces that straddle chunk boundaries
        c.update(data[i : i + 1000])
    assert c.hexdigest() == hashlib.sha256(data).hexdigest()
    count = sha256chain.chunks_of(size, 4096)
    assert len(c.states) == count - 1

    def reader(src: bytes):
        return lambda off, n: [memoryview(src)[off : off + n]]

    ok = [
        sha256chain.check_chunk(reader(data), c.states, c.hexdigest(), 4096, i, size)
        for i in range(count)
    ]
    assert all(ok)
    if size:
        bad = bytearray(data)
        bad[size // 2] ^= 0x10
        got = [
            sha256chain.check_chunk(reader(bytes(bad)), c.states, c.hexdigest(), 4096, i, size)
            for i in range(count)
        ]
        assert got.count(False) == 1 and not got[(size // 2) // 4096]


@pytest.fixture
def chained(checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An artifact whose files carry chains of 4 KiB chunks (many chunks even when tiny)."""
    monkeypatch.setattr(sha256chain, "CHUNK", 4096)
    out = tmp_path / "art"
    convert_checkpoint(checkpoints["super"], out, b12x_scales="baked")
    return out


def test_converter_writes_chains_and_verify_uses_them(chained: Path) -> None:
    m = json.loads((chained / "manifest.json").read_text())
    assert m["format_version"] == 2
    layer = next(f for f in m["files"] if f["kind"] == "moe_layer")
    chain = layer["sha256_chain"]
    assert chain["chunk_size"] == 4096
    assert len(chain["states"]) == sha256chain.chunks_of(layer["size"], 4096) - 1 > 2
    assert verify_artifact(chained, jobs=4).exit_code == 0
    path = chained / layer["path"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped payload bit in a middle chunk
    path.write_bytes(bytes(raw))
    report = verify_artifact(chained, jobs=4)
    assert report.exit_code == 1
    assert any(p.file == layer["path"] and "1 of" in p.message for p in report.problems)


def test_tampered_whole_file_sha256_is_still_caught(chained: Path) -> None:
    m = json.loads((chained / "manifest.json").read_text())
    layer = next(f for f in m["files"] if f["kind"] == "moe_layer")
    layer["sha256"] = "0" * 64  # the chain ends in the whole-file digest: the last chunk fails
    (chained / "manifest.json").write_text(json.dumps(m, indent=2))
    report = verify_artifact(chained)
    assert report.exit_code == 1 and "expected " + "0" * 64 in report.problems[0].message


def test_chain_length_must_match_the_size(chained: Path) -> None:
    m = json.loads((chained / "manifest.json").read_text())
    layer = next(f for f in m["files"] if f["kind"] == "moe_layer")
    layer["sha256_chain"]["states"].pop()
    (chained / "manifest.json").write_text(json.dumps(m, indent=2))
    assert verify_artifact(chained, quick=True).exit_code == 2


def test_version_1_artifacts_still_load_and_verify(
    checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sha256chain, "available", lambda: False)  # no chains, as v1 wrote
    monkeypatch.setattr(constants, "FORMAT_VERSION", 1)  # layer metadata says "1"
    out = tmp_path / "v1"
    convert_checkpoint(checkpoints["nano"], out, b12x_scales="shared", target="sm121")
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    monkeypatch.undo()
    assert not any("sha256_chain" in f for f in m["files"])
    assert verify_artifact(out).exit_code == 0
    art = load(out, device="cpu", backend="reference")
    assert art.manifest.format_version == 1 and art.moe_layers
    m["files"][0]["sha256_chain"] = {"chunk_size": 4096, "states": []}  # a v2 field in v1
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    assert verify_artifact(out, quick=True).exit_code == 2


@pytest.mark.parametrize("mappable", [True, False])
@pytest.mark.parametrize("offset,length", [(0, 5 * 4096 + 100), (4096, 3 * 4096), (100, 9000)])
def test_file_pieces_mapped_or_read_give_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mappable: bool, offset: int, length: int
) -> None:
    """Mapped windows (several, small WINDOW), the read fallback (no MAP_POPULATE, or an offset
    off a page boundary) and the hashes built on them all see exactly the file's bytes."""
    data = os.urandom(6 * 4096 + 100)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    monkeypatch.setattr(sha256chain, "WINDOW", 4096)
    if not mappable:
        monkeypatch.setattr(sha256chain, "MAP_POPULATE", 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = list(sha256chain.file_pieces(fd, offset, length))
        kinds = {type(p) for p in pieces}
        got = b""
        for p in sha256chain.file_pieces(fd, offset, length):
            got += bytes(p.view() if isinstance(p, sha256chain.Region) else p)
    finally:
        os.close(fd)
    assert got == data[offset : offset + length]
    assert (sha256chain.Region in kinds) == (mappable and offset % mmap.PAGESIZE == 0)
    from moepack.runtime.verify import sha256_chain_file, sha256_file

    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_chain_file(path)[0] == hashlib.sha256(data).hexdigest()


def test_file_pieces_past_the_end_raise(tmp_path: Path) -> None:
    """A range past the end of the file is never mapped (that would fault): read, and refused."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 * 4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ends before byte"):
            for _ in sha256chain.file_pieces(fd, 0, 4 * 4096, path):
                pass
    finally:
        os.close(fd)
