"""The intermediate-size tile (`--pad-tile 128|256`) round-trips through convert, the manifest,
verify and load; load warns with the numbers when the installed FlashInfer would copy.

Which FlashInfer copies what is `moepack.format.flashinfer`'s table, checked against each
release's own code in tests/test_contracts.py::test_b12x_runtime_copies (run by the matrix).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import flashinfer
import pytest
from click.testing import CliRunner

from moepack.cli import main
from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint
from moepack.errors import UsageError
from moepack.format import Manifest
from moepack.format.flashinfer import (
    DEFAULT_PAD_TILE,
    RELEASES,
    copy_free_releases,
    release,
    runtime_copy_bytes,
)
from moepack.runtime import flashinfer_env, load
from moepack.runtime.flashinfer_env import RuntimeCopyWarning
from moepack.runtime.verify import verify_artifact

ALL = ("0.7.2", "0.7.2.post1", "0.7.4")
CASES = {
    # name: (variant, intermediate n, pad tile, expected n_p, releases that use it as stored)
    "n300-t128": ("super", 304, 128, 384, ("0.7.4",)),
    "n300-t256": ("super", 304, 256, 512, ALL),
    "n80-t128": ("super", 80, 128, 128, ()),  # one 128-slice: 0.7.4 copies it to 256 too
    "gated-t128": ("gated", 176, 128, 256, ALL),
}


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("padding")
    out = {}
    for name, (variant, n, tile, _, _) in CASES.items():
        ckpt = synthetic.write_checkpoint(
            root / f"ckpt-{name}", synthetic.default_spec(variant, intermediate=n)
        )
        out[name] = root / name
        convert_checkpoint(ckpt, out[name], pad_tile=tile, moe_only=True)
    return out


def manifest_of(root: Path) -> Manifest:
    return Manifest.from_json(json.loads((root / "manifest.json").read_text()))


@pytest.mark.parametrize("name", CASES)
def test_manifest_records_the_tile_and_the_releases(padded, name) -> None:
    _, n, tile, n_p, free = CASES[name]
    m = manifest_of(padded[name])
    assert m.kernel_abi.pad_tile == tile
    assert m.model.intermediate_size == n and m.model.intermediate_size_padded == n_p
    assert m.kernel_abi.flashinfer_copy_free == free
    assert verify_artifact(padded[name]).exit_code == 0


def test_default_tile_is_what_the_engines_pins_need() -> None:
    """vLLM 0.33.0 pins FlashInfer 0.7.2.post1, SGLang 0.5.23 0.7.2 (tests/data/requires):
    the default must be copy-free on both, whatever n is."""
    assert DEFAULT_PAD_TILE == 256
    for n_p in range(256, 8192, DEFAULT_PAD_TILE):
        assert {"0.7.2", "0.7.2.post1"} <= set(copy_free_releases(n_p))
    assert copy_free_releases(2688) == ("0.7.4",)  # Nemotron 3 Super at tile 128
    assert set(copy_free_releases(2816)) == set(ALL)  # ... and at 256
    assert {r.version for r in RELEASES} == set(ALL)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["kernel_abi"].update(pad_tile=128), "intermediate_size_padded"),
        (lambda m: m["kernel_abi"].update(pad_tile=64), "pad_tile"),
        (lambda m: m["kernel_abi"].update(flashinfer_copy_free=["0.7.4"]), "0.7.2 uses it"),
        (lambda m: m["kernel_abi"].update(flashinfer_copy_free=list(ALL) + ["0.7.4"]), "twice"),
        (lambda m: m["kernel_abi"].pop("flashinfer_copy_free"), "flashinfer_copy_free"),
    ],
)
def test_verify_checks_the_padding_record(padded, tmp_path, edit, match) -> None:
    root = tmp_path / "a"
    shutil.copytree(padded["n300-t256"], root)
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))
    report = verify_artifact(root, quick=True)
    assert report.exit_code != 0
    assert any(match in p.message for p in report.problems), report.problems


def test_a_newer_moepacks_unchecked_release_is_taken_as_stated(padded, tmp_path) -> None:
    root = tmp_path / "a"
    shutil.copytree(padded["n300-t256"], root)
    m = json.loads((root / "manifest.json").read_text())
    m["kernel_abi"]["flashinfer_copy_free"].append("0.7.9")
    (root / "manifest.json").write_text(json.dumps(m))
    assert verify_artifact(root, quick=True).exit_code == 0


class _Wrapper:
    """Stands in for `B12xMoEWrapper` on CPU (no kernel runs here)."""

    def __init__(self, **config) -> None:
        self.config = config

    def run(self, *, x, input_global_scale=None, **kw):  # the signature load checks
        return x


def _load_as(monkeypatch, root: Path, version: str | None):
    monkeypatch.setattr(flashinfer_env, "installed_flashinfer", lambda: version)
    monkeypatch.setattr(flashinfer, "B12xMoEWrapper", _Wrapper)
    return load(root, device="cpu", capability=(12, 0))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("version", ALL)
def test_load_warns_with_the_numbers(padded, monkeypatch, name, version) -> None:
    """Warned exactly when the (simulated) installed release copies; bytes per layer and total."""
    m = manifest_of(padded[name])
    layers = len(m.model.moe_layers)
    copies = version not in CASES[name][4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = _load_as(monkeypatch, padded[name], version)
    ours = [w for w in caught if issubclass(w.category, RuntimeCopyWarning)]
    assert len(ours) == int(copies)
    if copies:
        per_layer = runtime_copy_bytes(m.geometry, release(version))
        assert per_layer > 0
        text = str(ours[0].message)
        assert f"{per_layer} bytes" in text and f"{per_layer * layers} bytes" in text
        assert f"for the {layers} loaded layers" in text and f"FlashInfer {version}" in text
        copied = release(version).copied_intermediate(m.model.intermediate_size_padded)
        assert f"padded again to {copied}" in text
    assert len(art.moe_layers) == layers


def test_no_warning_where_b12x_does_not_run(padded, monkeypatch) -> None:
    monkeypatch.setattr(flashinfer_env, "installed_flashinfer", lambda: "0.7.2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeCopyWarning)
        load(padded["n300-t128"], device="cpu")  # reference backend on a CPU
        load(padded["n300-t128"], device="cpu", capability=(10, 0), backend="reference")


def test_unchecked_release_does_not_warn(padded, monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeCopyWarning)
        _load_as(monkeypatch, padded["n80-t128"], "0.7.9")
        _load_as(monkeypatch, padded["n80-t128"], None)


def test_runtime_copy_bytes_by_hand() -> None:
    """Nemotron 3 Super (E=512, H=1024, n=2688, relu2) at tile 128 under FlashInfer 0.7.2.post1:
    the copy is padded to 2816 rows: w13 512*2816*512, w2 512*1024*1408, scales 512*2816*64 and
    512*1024*176 bytes."""
    from moepack.format import Geometry

    geo = Geometry(512, 1024, 2688, 2688, False)
    expected = 512 * (2816 * 512 + 1024 * 1408 + 2816 * 64 + 1024 * 176)
    assert runtime_copy_bytes(geo, release("0.7.2.post1")) == expected
    assert runtime_copy_bytes(geo, release("0.7.4")) == 0


def test_convert_refuses_other_tiles(tmp_path, checkpoints) -> None:
    with pytest.raises(UsageError, match="pad tile"):
        convert_checkpoint(checkpoints["nano"], tmp_path / "a", pad_tile=64)


def test_cli_pad_tile(tmp_path, checkpoints) -> None:
    out = tmp_path / "a"
    result = CliRunner().invoke(
        main,
        ["convert", str(checkpoints["nano"]), "--target", "sm120", "-o", str(out)]
        + ["--pad-tile", "128", "--moe-only"],
    )
    assert result.exit_code == 0, result.output
    m = manifest_of(out)
    assert m.kernel_abi.pad_tile == 128 and m.model.intermediate_size_padded == 128


def test_convert_refuses_a_hidden_size_b12x_cannot_tile(tmp_path) -> None:
    """FlashInfer's W4A4 b12x kernels need the MoE hidden size in full 128-wide tiles (0.7.4's
    wrapper refuses anything else): convert says so before writing an artifact."""
    from moepack.errors import CheckpointError

    spec = synthetic.default_spec("gated", hidden=64, moe_hidden=64)
    ckpt = synthetic.write_checkpoint(tmp_path / "ckpt", spec)
    with pytest.raises(CheckpointError, match="MoE hidden size 64 is not a multiple of 128"):
        convert_checkpoint(ckpt, tmp_path / "out", moe_only=True)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_flashinfer_refuses_that_hidden_size_too() -> None:
    """The rule is FlashInfer's own where the installed release states it (0.7.4)."""
    from flashinfer.fused_moe.cute_dsl.blackwell_sm12x import moe_dispatch

    check = getattr(moe_dispatch, "_validate_w4a4_dimensions", None)
    if check is None:
        pytest.skip(f"FlashInfer {flashinfer.__version__} states no hidden-size rule")
    with pytest.raises(ValueError, match="multiple of 128"):
        check(64, 256, "nvfp4")
    check(128, 256, "nvfp4")
