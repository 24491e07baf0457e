"""Fidelity figures against an independent dequantization, exact and sampled."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint
from moepack.convert.transform import FIDELITY_SAMPLE, fidelity_sample
from moepack.runtime import nvfp4, scales

EXPERTS = 80  # more than FIDELITY_SAMPLE, so the default measures a sample


def _reference_errors(src, prefix: str) -> torch.Tensor:
    """Per-expert relative Frobenius error of baked-scale b12x weights, FC1 then FC2, computed
    by dequantizing both ways in full."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def get(name: str) -> torch.Tensor:
        with safe_open(str(src / index[name]), framework="pt") as f:
            return f.get_tensor(name)

    errs = {"up_proj": [], "down_proj": []}
    for proj in errs:
        for e in range(EXPERTS):
            base = f"{prefix}.{e}.{proj}"
            w, sf, ws2 = (
                get(f"{base}.weight"),
                get(f"{base}.weight_scale"),
                get(f"{base}.weight_scale_2"),
            )
            ref = nvfp4.dequantize(w, sf, ws2)
            got = nvfp4.block_values(w, scales.bake_block_scales(sf[None], ws2.reshape(1))[0])
            errs[proj].append(float((got - ref).norm() / ref.norm()))
    return torch.tensor(errs["up_proj"] + errs["down_proj"], dtype=torch.float64)


def test_exact_and_sampled_fidelity_match_full_dequantization(tmp_path):
    spec = synthetic.default_spec("super", num_experts=EXPERTS, pattern="E")
    src = synthetic.write_checkpoint(tmp_path / "src", spec)
    ref = _reference_errors(src, "backbone.layers.0.mixer.experts")
    sample = fidelity_sample(EXPERTS, exact=False)
    assert len(sample) == FIDELITY_SAMPLE and sample[0] == 0 and sample[-1] == EXPERTS - 1
    ref_sampled = torch.cat([ref[sample], ref[EXPERTS + sample]])
    for exact, want, count in ((True, ref, EXPERTS), (False, ref_sampled, FIDELITY_SAMPLE)):
        out = tmp_path / f"out-{exact}"
        convert_checkpoint(src, out, moe_only=True, b12x_scales="baked", exact_fidelity=exact)
        fid = json.loads((out / "manifest.json").read_text())["layers"][0]["fidelity"]
        assert fid["b12x_err_experts"] == count
        assert abs(fid["b12x_max_rel_err"] - float(want.max())) <= 1e-5 * float(want.max())
        assert abs(fid["b12x_mean_rel_err"] - float(want.mean())) <= 1e-5 * float(want.mean())
    assert float(ref_sampled.mean()) != float(ref.mean())  # the sample is a real subset
