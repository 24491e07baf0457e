"""`moepack convert` end to end on synthetic Super-like, Nano-like and gated checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from moepack.cli import main
from moepack.convert import synthetic
from moepack.convert.pipeline import ConvertError, convert_checkpoint
from moepack.format import ALIGNMENT, ModelInfo, read_manifest
from moepack.format.header import read_header
from moepack.runtime import layout, nvfp4
from moepack.runtime.verify import verify_artifact

EXPECTED_LAYERS = {"super": [1, 3], "nano": [0, 3], "gated": [0, 1], "gated-untied": [0, 1]}


def _source_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return out


@pytest.mark.parametrize("variant", list(EXPECTED_LAYERS))
@pytest.mark.parametrize("mode", ["baked", "shared"])
def test_artifact_structure_and_verify(by_mode, variant, mode):
    art = by_mode[(variant, mode)]
    m = read_manifest(art).to_json()
    assert m["model"]["moe_layers"] == EXPECTED_LAYERS[variant]
    assert m["b12x_scale_mode"] == mode
    geo = ModelInfo.from_json(m["model"]).geometry
    assert geo.intermediate_padded % 256 == 0 and geo.intermediate_padded >= geo.intermediate
    for entry in m["layers"]:
        header = read_header(art / entry["file"])
        specs = geo.tensor_specs(mode)
        real = {n: t for n, t in header.tensors.items() if not n.startswith("__pad__.")}
        assert list(real) == list(specs)
        for name, (dtype, shape) in specs.items():
            assert (real[name].dtype, real[name].shape) == (dtype, shape)
        assert all(t.start % ALIGNMENT == 0 for t in real.values())
        if mode == "shared" and variant != "gated-untied":
            assert entry["fidelity"]["b12x_max_rel_err"] == 0.0
        else:
            assert entry["fidelity"]["b12x_max_rel_err"] > 0.0
    report = verify_artifact(art)
    assert report.exit_code == 0, report.format_text()


@pytest.mark.parametrize("variant", ["super", "gated"])
def test_payload_and_scales_match_source(by_mode, checkpoints, variant):
    """Independent of the transform: unpad and unswizzle the stored tensors, compare to source."""
    art = by_mode[(variant, "baked")]
    m = read_manifest(art).to_json()
    geo = ModelInfo.from_json(m["model"]).geometry
    src = _source_tensors(checkpoints[variant])
    n, n_p = geo.intermediate, geo.intermediate_padded
    for entry in m["layers"]:
        with safe_open(str(art / entry["file"]), framework="pt") as f:
            w13, w2 = f.get_tensor("w13"), f.get_tensor("w2")
            sf13 = layout.unswizzle(f.get_tensor("w13_sf"), geo.w13_rows, geo.hidden // 16)
            sf2 = layout.unswizzle(f.get_tensor("w2_sf"), geo.hidden, n_p // 16)
            alpha13 = f.get_tensor("cutlass.fc1_alpha")
            baked13 = layout.unswizzle(f.get_tensor("b12x.w13_sf"), geo.w13_rows, geo.hidden // 16)
        halves = ("up_proj", "gate_proj") if geo.gated else ("up_proj",)
        a13 = max(
            src[f"{entry['source_prefix']}.{e}.up_proj.input_scale"] for e in range(geo.num_experts)
        )
        for e in range(geo.num_experts):
            p = f"{entry['source_prefix']}.{e}"
            for h, proj in enumerate(halves):
                rows = slice(h * n_p, h * n_p + n)
                assert torch.equal(w13[e, rows], src[f"{p}.{proj}.weight"])
                assert torch.equal(
                    sf13[e, rows].view(torch.uint8),
                    src[f"{p}.{proj}.weight_scale"].view(torch.uint8),
                )
                assert not w13[e, h * n_p + n : (h + 1) * n_p].any()
                ws2 = src[f"{p}.{proj}.weight_scale_2"].float()
                expect = nvfp4.e4m3_from_float(src[f"{p}.{proj}.weight_scale"].float() * ws2)
                assert torch.equal(baked13[e, rows].view(torch.uint8), expect.view(torch.uint8))
            assert torch.equal(w2[e, :, : n // 2], src[f"{p}.down_proj.weight"])
            assert not w2[e, :, n // 2 :].any()
            assert torch.equal(
                sf2[e, :, : n // 16].view(torch.uint8),
                src[f"{p}.down_proj.weight_scale"].view(torch.uint8),
            )
            assert torch.equal(alpha13[e], a13.float() * src[f"{p}.up_proj.weight_scale_2"].float())


def test_pass_through_is_byte_identical(by_mode, checkpoints):
    art, ckpt = by_mode[("super", "baked")], checkpoints["super"]
    src = _source_tensors(ckpt)
    dense = _source_tensors(art / "model")
    assert not [n for n in dense if ".experts." in n]
    assert set(dense) == {n for n in src if ".mixer.experts." not in n}
    for name, t in dense.items():
        assert torch.equal(t.reshape(-1).view(torch.uint8), src[name].reshape(-1).view(torch.uint8))
    # The shared expert's NVFP4 down_proj is not a MoE layer: it passes through unchanged.
    assert "backbone.layers.1.mixer.shared_experts.down_proj.weight_scale_2" in dense
    for name in ("config.json", "hf_quant_config.json", "tokenizer_config.json"):
        assert (art / "model" / name).read_bytes() == (ckpt / name).read_bytes()
    index = json.loads((art / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dense)


@pytest.mark.parametrize("variant", ["super", "gated"])
@pytest.mark.parametrize("moe_only", [False, True], ids=["full", "moe-only"])
def test_single_file_checkpoint_converts_like_sharded(artifact_factory, by_mode, variant, moe_only):
    """ModelOpt's other layout (one model.safetensors, no index) holds the same tensors, so it
    must give the same MoE layer files byte for byte, and the same dense tensors."""
    art = artifact_factory.artifact(variant, moe_only=moe_only, layout="single")
    sharded = by_mode[(variant, "baked")]
    assert verify_artifact(art).exit_code == 0, verify_artifact(art).format_text()
    m = read_manifest(art).to_json()
    assert [f["path"] for f in m["source"]["files"] if f["path"].endswith(".safetensors")] == [
        "model.safetensors"
    ]
    layers = sorted((art / "moe").iterdir())
    assert [p.name for p in layers] == sorted(p.name for p in (sharded / "moe").iterdir())
    for p in layers:
        assert p.read_bytes() == (sharded / "moe" / p.name).read_bytes(), p.name
    assert (art / "model").exists() != moe_only
    if not moe_only:
        dense, want = _source_tensors(art / "model"), _source_tensors(sharded / "model")
        assert dense.keys() == want.keys()
        for name, t in dense.items():
            assert torch.equal(
                t.reshape(-1).view(torch.uint8), want[name].reshape(-1).view(torch.uint8)
            )
    res = CliRunner().invoke(
        main,
        [
            "verify",
            str(art),
            "--source",
            str(artifact_factory.checkpoint(variant, "single")),
            "--json",
        ],
    )
    assert res.exit_code == 0 and json.loads(res.output)["source_mismatches"] == [], res.output


def test_moe_only_and_deterministic(checkpoints, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert_checkpoint(checkpoints["nano"], a, moe_only=True)
    convert_checkpoint(checkpoints["nano"], b, moe_only=True)
    assert not (a / "model").exists()
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_gate_up_requantization_is_reported(by_mode):
    m = read_manifest(by_mode[("gated-untied", "shared")]).to_json()
    assert sum(entry["gate_up_requantized_experts"] for entry in m["layers"]) > 0
    assert all(entry["fidelity"]["requant_max_rel_err"] > 0 for entry in m["layers"])
    tied = read_manifest(by_mode[("gated", "shared")]).to_json()
    assert all(entry["gate_up_requantized_experts"] == 0 for entry in tied["layers"])


def test_rerun_of_a_finished_job_is_a_no_op_and_another_job_is_refused(by_mode, checkpoints):
    art = by_mode[("super", "baked")]
    before = (art / "manifest.json").stat().st_mtime_ns
    assert convert_checkpoint(checkpoints["super"], art)["moe_layers"] == 2
    assert (art / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(ConvertError, match="already holds a different artifact"):
        convert_checkpoint(checkpoints["super"], art, b12x_scales="shared")


def test_cli_convert_json_and_recipes(checkpoints, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "convert",
            str(checkpoints["gated"]),
            "--target",
            "sm121",
            "-o",
            str(tmp_path / "x"),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["ok"] and summary["moe_layers"] == 2 and summary["target"] == "sm121"
    res = runner.invoke(main, ["recipes", "--json"])
    recipes = json.loads(res.output)
    assert (
        recipes["nemotron-super-nvfp4"]["repo_id"]
        == "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4"
    )
    assert (
        recipes["nemotron-nano-nvfp4"]["repo_id"] == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4"
    )


def _broken(checkpoints, tmp_path: Path, edit) -> Path:
    """A copy of the super checkpoint with one tensor edited in place."""
    ckpt = tmp_path / "broken"
    shutil.copytree(checkpoints["super"], ckpt)
    edit(ckpt)
    return ckpt


def _edit_tensor(name: str, fn):
    def edit(ckpt: Path) -> None:
        from safetensors.torch import save_file

        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        shard = ckpt / index["weight_map"][name]
        with safe_open(str(shard), framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        result = fn(tensors, name)
        save_file(tensors if result is None else result, str(shard))

    return edit


BAD_INPUTS = [
    (
        "nan block scale",
        "backbone.layers.3.mixer.experts.5.down_proj.weight_scale",
        lambda t, n: t[n].view(torch.uint8).__setitem__((0, 0), 0x7F),
        "contain NaN",
    ),
    (
        "zero weight_scale_2",
        "backbone.layers.1.mixer.experts.2.up_proj.weight_scale_2",
        lambda t, n: t.__setitem__(n, torch.tensor(0.0)),
        "not finite and positive",
    ),
    (
        "wrong dtype",
        "backbone.layers.1.mixer.experts.0.down_proj.weight",
        lambda t, n: t.__setitem__(n, t[n].to(torch.int16)),
        "expected uint8",
    ),
    (
        "wrong shape",
        "backbone.layers.3.mixer.experts.7.up_proj.weight",
        lambda t, n: t.__setitem__(n, t[n][:-16]),
        "expected uint8",
    ),
    (
        "wrong block-scale shape",
        "backbone.layers.3.mixer.experts.6.down_proj.weight_scale",
        lambda t, n: t.__setitem__(n, t[n][:-1]),
        "expected float8_e4m3fn",
    ),
]


@pytest.mark.parametrize("what,name,fn,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_tensor_is_named_and_nothing_looks_complete(
    checkpoints, tmp_path, what, name, fn, message
):
    ckpt = _broken(checkpoints, tmp_path, _edit_tensor(name, fn))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(ckpt), "--target", "sm120", "-o", str(out)])
    assert res.exit_code == 2
    assert message in res.output and name.rsplit(".", 1)[0] in res.output, res.output
    assert "Traceback" not in res.output
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.moepack-tmp"))


def test_missing_expert_and_unsupported_models(checkpoints, tmp_path):
    def drop_expert(ckpt: Path) -> None:
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        index["weight_map"] = {
            k: v for k, v in index["weight_map"].items() if ".experts.4." not in k
        }
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(Exception, match=r"experts \[4\] missing"):
        convert_checkpoint(_broken(checkpoints, tmp_path, drop_expert), tmp_path / "o1")

    def gelu(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["mlp_hidden_act"] = "gelu"
        (ckpt / "config.json").write_text(json.dumps(cfg))

    shutil.rmtree(tmp_path / "broken")
    with pytest.raises(Exception, match="activation 'gelu' is not supported"):
        convert_checkpoint(_broken(checkpoints, tmp_path, gelu), tmp_path / "o2")

    def fp8(ckpt: Path) -> None:
        (ckpt / "hf_quant_config.json").write_text(
            json.dumps({"quantization": {"quant_algo": "FP8"}})
        )

    shutil.rmtree(tmp_path / "broken")
    with pytest.raises(Exception, match="is not NVFP4 or MIXED_PRECISION"):
        convert_checkpoint(_broken(checkpoints, tmp_path, fp8), tmp_path / "o3")


def test_verify_source_rederives_layers(by_mode, checkpoints, tmp_path):
    art = by_mode[("super", "baked")]
    runner = CliRunner()
    res = runner.invoke(main, ["verify", str(art), "--source", str(checkpoints["super"]), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["source_mismatches"] == []
    other = synthetic.write_checkpoint(tmp_path / "other", synthetic.default_spec("super", seed=9))
    res = runner.invoke(main, ["verify", str(art), "--source", str(other)])
    assert res.exit_code == 1
    assert res.output.startswith("FAILED:")
    assert "moe/layer-00001.safetensors: 13 of 13 tensors differ" in res.output
    assert "(w13, w2, " in res.output


def test_cli_inspect_and_verify_exit_codes(by_mode, tmp_path):
    art = by_mode[("gated-untied", "shared")]
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(art)])
    assert res.exit_code == 0 and "b12x scales shared" in res.output
    info = json.loads(runner.invoke(main, ["inspect", str(art), "--json"]).output)
    assert info["b12x_scale_mode"] == "shared" and info["target"] == "sm120"
    assert runner.invoke(main, ["verify", str(art), "--quick"]).exit_code == 0
    assert runner.invoke(main, ["inspect", str(tmp_path)]).exit_code == 2
    assert runner.invoke(main, ["verify", str(tmp_path)]).exit_code == 2
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    layer = next((copy / "moe").iterdir())
    data = bytearray(layer.read_bytes())
    data[-1] ^= 1
    layer.write_bytes(bytes(data))
    res = runner.invoke(main, ["verify", str(copy), "--json"])
    assert res.exit_code == 1 and layer.name in res.output
