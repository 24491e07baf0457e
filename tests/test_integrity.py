"""Integrity campaigns: damage artifacts the ways copies, disks and attackers do; verify catches all.

Every case must end in a verdict (exit 1 naming the file, or exit 2 for an unusable artifact),
never a pass and never a crash (an internal error counts as a crash). Seeded and bounded: the
whole module runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from moepack.runtime.verify import Problem, VerifyReport, verify_artifact

LAYER = "moe/layer-00001.safetensors"


@pytest.fixture
def art(artifacts: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifacts["super"], tmp_path / "art", symlinks=True))


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def save_manifest(root: Path, m: Any) -> None:
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def record(m: dict[str, Any], rel: str) -> dict[str, Any]:
    return next(f for f in m["files"] if f["path"] == rel)


def assert_caught(report: VerifyReport, file: str | None = None, code: int | None = None) -> None:
    """A failing verdict, no crash, and (when given) the damaged file named and the exit code."""
    text = report.format_text()
    assert report.exit_code != 0, f"passed: {text}"
    assert not any("internal error" in p.message for p in report.problems), text
    if code is not None:
        assert report.exit_code == code, text
    if file is not None:
        assert any(p.file == file for p in report.problems), text
    assert all(p.message for p in report.problems)


# -- bit flips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["super", "nano", "gated", "super-moe-only"])
def test_random_bit_flips_are_all_caught(
    artifacts: dict[str, Path], tmp_path: Path, variant: str
) -> None:
    """120 single-bit flips a variant, half in the first 4 KiB (headers), each caught and named."""
    root = Path(shutil.copytree(artifacts[variant], tmp_path / "a"))
    rng = random.Random(f"flips-{variant}")
    files = [f["path"] for f in manifest(root)["files"]]
    for i in range(120):
        rel = rng.choice(files)
        path = root / rel
        size = path.stat().st_size
        offset = rng.randrange(min(size, 4096)) if i % 2 else rng.randrange(size)
        bit = 1 << rng.randrange(8)
        _xor(path, offset, bit)
        assert_caught(verify_artifact(root, jobs=2), rel, code=1)
        _xor(path, offset, bit)
    assert verify_artifact(root).exit_code == 0


def _xor(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


# -- sizes, missing, renamed and extra files ---------------------------------------------------


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize(
    "new_size", [0, 7, 8, 4095, 4096, -1, +1, +4096], ids=lambda s: f"size{s:+d}"
)
def test_truncated_and_extended_files(art: Path, quick: bool, new_size: int) -> None:
    for rel in (LAYER, "model/config.json", "model/model-00001-of-00003.safetensors"):
        path = art / rel
        data = path.read_bytes()
        size = len(data) + new_size if new_size in (-1, 1, 4096) else new_size
        path.write_bytes(data[:size] + bytes(max(0, size - len(data))))
        assert_caught(verify_artifact(art, quick=quick), rel, code=1)
        path.write_bytes(data)


def test_deleted_file(art: Path) -> None:
    (art / LAYER).unlink()
    assert_caught(verify_artifact(art), LAYER, code=1)


def test_renamed_file(art: Path) -> None:
    (art / LAYER).rename(art / "moe/layer-00002.safetensors")
    report = verify_artifact(art, quick=True)
    assert_caught(report, LAYER, code=1)
    assert_caught(report, "moe/layer-00002.safetensors")


@pytest.mark.parametrize(
    "extra",
    ["moe/layer-00099.safetensors", "model/notes.txt", "README", "moe/.hidden"],
)
def test_extra_file(art: Path, extra: str) -> None:
    (art / extra).write_bytes(b"\0" * 10)
    assert_caught(verify_artifact(art, quick=True), extra, code=1)


def test_leftovers_of_an_interrupted_conversion(art: Path) -> None:
    (art / "moe/layer-00005.safetensors.moepack-tmp").write_bytes(b"partial")
    (art / ".moepack-partial").mkdir()
    (art / ".moepack-partial/layer-00005.json").write_text("{}")
    report = verify_artifact(art, quick=True)
    assert_caught(report, "moe/layer-00005.safetensors.moepack-tmp", code=1)
    assert_caught(report, ".moepack-partial")
    assert all("interrupted" in p.message for p in report.problems)


def test_directory_in_place_of_a_file(art: Path) -> None:
    (art / LAYER).unlink()
    (art / LAYER).mkdir()
    assert_caught(verify_artifact(art), LAYER, code=1)


def test_symlink_inside_the_artifact_is_followed(art: Path) -> None:
    (art / "moe/real").mkdir()
    (art / LAYER).rename(art / "moe/real/layer")
    (art / LAYER).symlink_to("real/layer")
    report = verify_artifact(art)
    assert [p.file for p in report.problems] == ["moe/real/layer"]  # the target is unlisted


# -- tampered manifest -------------------------------------------------------------------------


def _mutate(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        m = manifest(root)
        fn(m)
        save_manifest(root, m)

    return apply


def _write(text: bytes) -> Callable[[Path], None]:
    return lambda root: (root / "manifest.json").write_bytes(text)


UNUSABLE: dict[str, Callable[[Path], None]] = {
    "missing": lambda root: (root / "manifest.json").unlink(),
    "not json": _write(b'{"format": "moepack", '),
    "empty": _write(b""),
    "binary": _write(bytes(range(256))),
    "a list": _write(b"[1, 2]"),
    "unknown version": _mutate(lambda m: m.update(format_version=3)),
    "version as string": _mutate(lambda m: m.update(format_version="1")),
    "no marker": _mutate(lambda m: m.pop("complete")),
    "marker false": _mutate(lambda m: m.update(complete=False)),
    "other format": _mutate(lambda m: m.update(format="gguf")),
    "traversal": _mutate(lambda m: m["files"][0].update(path="../x")),
    "deep traversal": _mutate(lambda m: m["files"][0].update(path="moe/../../x")),
    "absolute": _mutate(lambda m: m["files"][0].update(path="/etc/passwd")),
    "backslash": _mutate(lambda m: m["files"][0].update(path="..\\x")),
    "no files key": _mutate(lambda m: m.pop("files")),
    "size not int": _mutate(lambda m: m["files"][0].update(size="12")),
    "bad sha format": _mutate(lambda m: m["files"][0].update(sha256="xyz")),
    "duplicate path": _mutate(lambda m: m["files"].append(m["files"][0])),
    "layer file mismatch": _mutate(lambda m: m["layers"][0].update(file=LAYER.replace("1", "7"))),
    "layers vs moe_layers": _mutate(lambda m: m["model"].update(moe_layers=[1])),
    "unknown mode": _mutate(lambda m: m.update(b12x_scale_mode="fused")),
    "bad padding": _mutate(lambda m: m["model"].update(intermediate_size_padded=512)),
}


@pytest.mark.parametrize("damage", UNUSABLE, ids=list(UNUSABLE))
def test_unusable_manifest(art: Path, damage: str) -> None:
    UNUSABLE[damage](art)
    report = verify_artifact(art)
    assert_caught(report, code=2)
    assert report.unusable and len(report.format_text().splitlines()) >= 2


def test_symlinked_directory_escaping_the_root(art: Path, tmp_path: Path) -> None:
    outside = Path(shutil.move(art / "moe", tmp_path / "elsewhere"))
    (art / "moe").symlink_to(outside)
    report = verify_artifact(art)
    assert_caught(report, LAYER, code=2)
    assert "outside" in str(report.problems[0])


def test_symlinked_file_escaping_the_root(art: Path, tmp_path: Path) -> None:
    shutil.move(art / LAYER, tmp_path / "layer")
    (art / LAYER).symlink_to(tmp_path / "layer")
    assert_caught(verify_artifact(art, quick=True), LAYER, code=2)


def test_symlinked_manifest_escaping_the_root(art: Path, tmp_path: Path) -> None:
    shutil.move(art / "manifest.json", tmp_path / "m.json")
    (art / "manifest.json").symlink_to(tmp_path / "m.json")
    assert_caught(verify_artifact(art), "manifest.json", code=2)


def test_wrong_hash_in_manifest(art: Path) -> None:
    _mutate(lambda m: record(m, LAYER).update(sha256="0" * 64))(art)
    report = verify_artifact(art)
    assert_caught(report, LAYER, code=1)
    assert "expected " + "0" * 64 in report.problems[0].message
    assert verify_artifact(art, quick=True).exit_code == 0  # quick mode does not hash


def test_wrong_tensor_listing_in_manifest(art: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        tensors = record(m, LAYER)["tensors"]
        tensors["w2"]["dtype"] = "I8"
        tensors["ghost"] = tensors.pop("cutlass.fc1_alpha")

    _mutate(edit)(art)
    report = verify_artifact(art, quick=True)
    assert_caught(report, LAYER, code=1)
    named = {p.tensor for p in report.problems}
    assert {"w2", "ghost", "cutlass.fc1_alpha"} <= named


# -- malicious safetensors headers (manifest updated so only header checks can catch them) -----


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _plant(root: Path, rel: str, content: bytes) -> None:
    """Replace a file and make the manifest agree with its size, sha256 and (if any) header."""
    (root / rel).write_bytes(content)
    m = manifest(root)
    rec = record(m, rel)
    rec.update(size=len(content), sha256=hashlib.sha256(content).hexdigest())
    try:
        (n,) = struct.unpack("<Q", content[:8])
        header = json.loads(content[8 : 8 + n])
        header.pop("__metadata__", None)
        rec["tensors"] = header
    except Exception:  # not parseable: keep the old listing, the header check must catch it
        pass
    save_manifest(root, m)


def _with_header(root: Path, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    header, data = _split(root / LAYER)
    edit(header)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _shift(header: dict[str, Any], name: str, delta: int) -> None:
    header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]


HOSTILE: dict[str, Callable[[Path], bytes]] = {
    "absurd length": lambda r: struct.pack("<Q", 2**63) + (r / LAYER).read_bytes()[8:],
    "length past end": lambda r: struct.pack("<Q", 10**6) + (r / LAYER).read_bytes()[8:],
    "tiny file": lambda r: b"\x01\x00",
    "non-json header": lambda r: struct.pack("<Q", 6) + b"{nope}" + bytes(64),
    "header is a list": lambda r: struct.pack("<Q", 2) + b"[]",
    "overlapping offsets": lambda r: _with_header(r, lambda h: _shift(h, "w2", -16)),
    "out of range offsets": lambda r: _with_header(
        r, lambda h: _shift(h, "b12x.fc2_input_scale", 10**9)
    ),
    "unknown dtype": lambda r: _with_header(r, lambda h: h["w13"].update(dtype="F4")),
    "shape vs offsets": lambda r: _with_header(r, lambda h: h["w13"].update(shape=[1])),
    "renamed tensor": lambda r: _with_header(r, lambda h: h.update(w14=h.pop("w13"))),
    "reshaped tensor": lambda r: _with_header(r, _flatten_w2),
    "wrong layer metadata": lambda r: _with_header(
        r, lambda h: h["__metadata__"].update(layer="7")
    ),
    "unaligned (plain safetensors)": lambda r: _unaligned(r),
}


def _flatten_w2(header: dict[str, Any]) -> None:
    """`[E, H, n_p/2]` -> `[E * H, n_p/2]`: same bytes, a shape the geometry does not allow."""
    e, h, half = header["w2"]["shape"]
    header["w2"]["shape"] = [e * h, half]


def _unaligned(root: Path) -> bytes:
    tensors = {k: v for k, v in load_file(root / LAYER).items() if not k.startswith("__pad__")}
    out = root / "plain.tmp"
    save_file(
        tensors, str(out), metadata={"format": "moepack", "format_version": "1", "layer": "1"}
    )
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("attack", HOSTILE, ids=list(HOSTILE))
def test_malicious_header(art: Path, attack: str) -> None:
    _plant(art, LAYER, HOSTILE[attack](art))
    for quick in (False, True):
        assert_caught(verify_artifact(art, quick=quick), LAYER, code=1)


def test_random_header_garbage(art: Path) -> None:
    """Seeded fuzzing: random header lengths and random JSON-ish bytes, manifest kept in step."""
    rng = random.Random("garbage")
    original = (art / LAYER).read_bytes()
    (n,) = struct.unpack("<Q", original[:8])
    for _ in range(60):
        body = bytearray(original[8 : 8 + n])
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] = rng.choice(b'{}[]",:0123456789-e. \xff')
        length = rng.choice([n, n - 1, n + 1, rng.randrange(2**64)])
        _plant(art, LAYER, struct.pack("<Q", length) + bytes(body) + original[8 + n :])
        report = verify_artifact(art, quick=True)
        if bytes(body) != original[8 : 8 + n] or length != n:
            # exit 2 when the planted listing itself breaks the manifest schema
            assert_caught(report, LAYER if report.exit_code == 1 else None)


NOBODY = 65534


def _verify_as_nobody(root: Path) -> tuple[bool, VerifyReport]:
    """Verify `root` in a forked child that has dropped to user and group nobody (root reads
    every file whatever its mode, and nobody may not run this interpreter from its install
    path, so no fresh process will do). Returns whether the child could still open the layer
    file (it must not) and its report."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                open(root / LAYER, "rb").close()
                readable = True
            except PermissionError:
                readable = False
            out = {"readable": readable, "report": verify_artifact(root, jobs=1).to_dict()}
        except BaseException as exc:
            out = {"error": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = json.loads(f.read() or b'{"error": "no result"}')
    os.waitpid(pid, 0)
    assert "error" not in data, data["error"]
    d = data["report"]
    report = VerifyReport(d["root"], d["quick"], [Problem(**p) for p in d["problems"]])
    report.unusable = d["unusable"]
    return data["readable"], report


def test_unreadable_file(art: Path) -> None:
    """A listed file the verifier may not read is a failed check naming it, not a crash. CI runs
    as root, for whom permissions stop no read: there the check runs as user nobody."""
    if os.geteuid() != 0:
        (art / LAYER).chmod(0)
        assert_caught(verify_artifact(art), LAYER, code=1)
        return
    # pytest's temporary directories are private to root: nobody needs a path it may traverse.
    shared = Path(tempfile.mkdtemp(prefix="moepack-unreadable-"))
    try:
        shared.chmod(0o755)
        root = Path(shutil.copytree(art, shared / "art"))
        (root / LAYER).chmod(0)
        readable, report = _verify_as_nobody(root)
        assert not readable
        assert_caught(report, LAYER, code=1)
        assert {p.file for p in report.problems} == {LAYER}, report.format_text()  # only that file
        assert all("Permission denied" in p.message for p in report.problems)
    finally:
        shutil.rmtree(shared)
