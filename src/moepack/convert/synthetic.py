"""Synthetic ModelOpt NVFP4 checkpoints, quantized exactly as ModelOpt does, for tests and the demo.

Each variant writes a hub-style directory (config.json, hf_quant_config.json, a sharded
model.safetensors with its index or, with `single_file=True`, one model.safetensors, a tokenizer
file) whose MoE experts are NVFP4 and whose other
tensors are BF16, FP8 per-tensor or (where the real model has them) non-expert NVFP4 linears.
Shard boundaries fall inside layers, so one layer's experts span several files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moepack.errors import UsageError
from moepack.runtime import nvfp4

VARIANTS = ("super", "nano", "gated")


@dataclass(frozen=True)
class SyntheticSpec:
    """Geometry of a synthetic model. `moe_hidden` differs from `hidden` only on latent MoE."""

    variant: str
    hidden: int
    moe_hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    pattern: str  # one letter a layer: M mamba, * attention, E MoE
    shards: int = 3
    untied_gate_up: bool = False
    seed: int = 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.pattern) if c == "E"]


def default_spec(variant: str, **overrides: Any) -> SyntheticSpec:
    """Tiny geometry whose intermediate size is not a multiple of the 256 padding tile."""
    base = {
        "super": SyntheticSpec("super", 192, 128, 80, 8, 2, "ME*E"),
        "nano": SyntheticSpec("nano", 128, 128, 32, 6, 2, "EM*E"),
        "gated": SyntheticSpec("gated", 128, 128, 48, 4, 2, "EE"),
    }
    if variant not in base:
        raise UsageError(f"unknown synthetic variant {variant!r}; choose from {VARIANTS}")
    return replace(base[variant], **overrides)


def super_layer_spec(seed: int = 0) -> SyntheticSpec:
    """One MoE layer of Nemotron 3 Super's real geometry (E=512, H=1024, n=2688)."""
    return SyntheticSpec("super", 4096, 1024, 2688, 512, 22, "E", shards=4, seed=seed)


def _prefix(spec: SyntheticSpec, layer: int) -> str:
    if spec.variant == "gated":
        return f"model.layers.{layer}.mlp"
    return f"backbone.layers.{layer}.mixer"


def _bf16(g: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)


CALIBRATION_STD = 0.5
"""Standard deviation of the activations the expert input scales are calibrated on; feed
activations of this size (as the demo does) and no activation saturates or underflows."""
CALIBRATION_TOKENS = 64


def _amax_scale(x: torch.Tensor) -> torch.Tensor:
    """ModelOpt's activation scale: `amax / (6 * 448)` of the calibration activations."""
    return (x.abs().amax() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)).reshape(())


def _input_scale(g: torch.Generator, k: int) -> torch.Tensor:
    return _amax_scale(torch.randn(CALIBRATION_TOKENS, k, generator=g) * CALIBRATION_STD)


def _weight(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    # Heavy-tailed rows make block scales span a wide range, like real checkpoints.
    scale = 0.02 + 0.03 * torch.rand((), generator=g)
    return torch.randn(n, k, generator=g) * scale * torch.exp(torch.randn(n, 1, generator=g))


def _pack(
    name: str, weight: torch.Tensor, scale_2: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ModelOpt tensors of one NVFP4 linear (input_scale aside) and its dequantized weight."""
    packed, block_scale, ws2 = nvfp4.quantize(weight, scale_2)
    tensors = {
        f"{name}.weight": packed,
        f"{name}.weight_scale": block_scale,
        f"{name}.weight_scale_2": ws2.reshape(()).clone(),
    }
    return tensors, nvfp4.dequantize(packed, block_scale, ws2)


def _nvfp4_linear(g: torch.Generator, name: str, n: int, k: int) -> dict[str, torch.Tensor]:
    tensors, _ = _pack(name, _weight(g, n, k))
    return tensors | {f"{name}.input_scale": _input_scale(g, k)}


def _fp8_linear(g: torch.Generator, name: str, n: int, k: int) -> dict[str, torch.Tensor]:
    weight = torch.randn(n, k, generator=g) * 0.05
    scale = weight.abs().amax() / nvfp4.E4M3_MAX
    return {
        f"{name}.weight": (weight / scale).to(torch.float8_e4m3fn),
        f"{name}.weight_scale": scale.reshape(()),
        f"{name}.input_scale": _input_scale(g, k),
    }


def _expert(g: torch.Generator, spec: SyntheticSpec, base: str) -> dict[str, torch.Tensor]:
    """One expert, its input scales calibrated on activations that flow through it."""
    h, n = spec.moe_hidden, spec.intermediate
    x = torch.randn(CALIBRATION_TOKENS, h, generator=g) * CALIBRATION_STD
    out: dict[str, torch.Tensor] = {}
    if spec.variant == "gated":
        gate_w, up_w = _weight(g, n, h), _weight(g, n, h)
        tied = None
        if not spec.untied_gate_up:
            tied = _amax_scale(torch.maximum(gate_w.abs().amax(), up_w.abs().amax()))
        gate_t, gate = _pack(f"{base}.gate_proj", gate_w, tied)
        up_t, up = _pack(f"{base}.up_proj", up_w, tied)
        hidden = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
        out |= gate_t | up_t | {f"{base}.gate_proj.input_scale": _amax_scale(x)}
    else:
        up_t, up = _pack(f"{base}.up_proj", _weight(g, n, h))
        hidden = torch.relu(x @ up.T).square()
        out |= up_t
    out[f"{base}.up_proj.input_scale"] = _amax_scale(x)
    down_t, _ = _pack(f"{base}.down_proj", _weight(g, h, n))
    return out | down_t | {f"{base}.down_proj.input_scale": _amax_scale(hidden)}


def _experts(
    g: torch.Generator, spec: SyntheticSpec, layer: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One expert's tensors at a time, so real geometry never holds a layer in float32."""
    for e in range(spec.num_experts):
        yield _expert(g, spec, f"{_prefix(spec, layer)}.experts.{e}")


def _dense_tensors(g: torch.Generator, spec: SyntheticSpec) -> dict[str, torch.Tensor]:
    """Non-expert tensors: embeddings, norms, routers, latent projections, mamba/attention."""
    hid, vocab = spec.hidden, 256
    t: dict[str, torch.Tensor] = {}
    root = "model" if spec.variant == "gated" else "backbone"
    t[f"{root}.embed_tokens.weight" if spec.variant == "gated" else f"{root}.embeddings.weight"] = (
        _bf16(g, vocab, hid)
    )
    t["lm_head.weight"] = _bf16(g, vocab, hid)
    t[f"{root}.norm.weight" if spec.variant == "gated" else f"{root}.norm_f.weight"] = _bf16(g, hid)
    for layer, kind in enumerate(spec.pattern):
        p = f"{root}.layers.{layer}"
        mixer = f"{p}.mlp" if spec.variant == "gated" else f"{p}.mixer"
        t[f"{p}.norm.weight"] = _bf16(g, hid)
        # Nano quantizes every linear not excluded to NVFP4; Super keeps some in FP8.
        side = _nvfp4_linear if spec.variant == "nano" else _fp8_linear
        if kind == "M":
            t |= side(g, f"{mixer}.in_proj", 2 * hid, hid)
            t[f"{mixer}.out_proj.weight"] = _bf16(g, hid, hid)
            t[f"{mixer}.A_log"] = torch.randn(4, generator=g)
        elif kind == "*":
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t[f"{mixer}.{proj}.weight"] = _bf16(g, hid, hid)
        else:
            t[f"{mixer}.gate.weight"] = _bf16(g, spec.num_experts, hid)
            if spec.variant == "gated":
                for proj in ("q_proj", "o_proj"):
                    t |= _nvfp4_linear(g, f"{p}.self_attn.{proj}", hid, hid)
                continue
            t[f"{mixer}.gate.e_score_correction_bias"] = torch.randn(spec.num_experts, generator=g)
            if spec.moe_hidden != spec.hidden:
                t[f"{mixer}.fc1_latent_proj.weight"] = _bf16(g, spec.moe_hidden, hid)
                t[f"{mixer}.fc2_latent_proj.weight"] = _bf16(g, hid, spec.moe_hidden)
            shared = f"{mixer}.shared_experts"
            t |= side(g, f"{shared}.up_proj", 2 * spec.intermediate, hid)
            t |= _nvfp4_linear(g, f"{shared}.down_proj", hid, 2 * spec.intermediate)
    return t


def _configs(spec: SyntheticSpec, quantized: dict[str, str]) -> tuple[dict, dict]:
    if spec.variant == "gated":
        config = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "hidden_size": spec.hidden,
            "num_hidden_layers": len(spec.pattern),
            "num_experts": spec.num_experts,
            "num_experts_per_tok": spec.top_k,
            "moe_intermediate_size": spec.intermediate,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }
    else:
        config = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "hidden_size": spec.hidden,
            "num_hidden_layers": len(spec.pattern),
            "hybrid_override_pattern": spec.pattern,
            "n_routed_experts": spec.num_experts,
            "num_experts_per_tok": spec.top_k,
            "moe_intermediate_size": spec.intermediate,
            "mlp_hidden_act": "relu2",
            "torch_dtype": "bfloat16",
        }
        if spec.moe_hidden != spec.hidden:
            config["moe_latent_size"] = spec.moe_hidden
    producer = {"name": "modelopt", "version": "0.37.0"}
    quant: dict[str, Any]
    if spec.variant == "super":
        quant = {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "quantized_layers": {
                name: (
                    {"quant_algo": "NVFP4", "group_size": 16}
                    if algo == "NVFP4"
                    else {"quant_algo": algo}
                )
                for name, algo in sorted(quantized.items())
            },
        }
    else:
        quant = {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": [
                "lm_head",
                "*.gate",
                "*mixer.out_proj",
                "*q_proj",
                "*k_proj",
                "*v_proj",
            ]
            if spec.variant == "nano"
            else ["lm_head", "*.gate", "*k_proj", "*v_proj"],
        }
    config["quantization_config"] = {"quant_method": "modelopt", **quant}
    return config, {"producer": producer, "quantization": quant}


def _quantized_modules(names: list[str]) -> dict[str, str]:
    """Module -> quant algo, read off the tensor set (NVFP4 has weight_scale_2, FP8 does not)."""
    mods: dict[str, str] = {}
    for name in names:
        if name.endswith(".weight_scale_2"):
            mods[name.removesuffix(".weight_scale_2")] = "NVFP4"
    for name in names:
        if name.endswith(".input_scale"):
            mods.setdefault(name.removesuffix(".input_scale"), "FP8")
    return mods


def write_checkpoint(out: Path, spec: SyntheticSpec, *, single_file: bool = False) -> Path:
    """Write the checkpoint to `out` (created); deterministic from `spec.seed`.

    `single_file=True` writes one `model.safetensors` and no index, the layout ModelOpt's own
    export uses for small models; the tensors are the same as the sharded layout's.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(spec.seed)
    dense = _dense_tensors(g, spec)
    order: list[str] = list(dense)
    expert_names: list[str] = []
    shard_of: dict[str, int] = {}
    shards = 1 if single_file else spec.shards
    # Names in layer order: each MoE layer's experts follow its dense tensors, so contiguous
    # shards cut through layers the way real exports do.
    buffers: list[dict[str, torch.Tensor]] = [dict() for _ in range(shards)]
    total_experts = len(spec.moe_layers) * spec.num_experts
    done = 0
    for layer in spec.moe_layers:
        for tensors in _experts(g, spec, layer):
            shard = min(shards - 1, done * shards // max(total_experts, 1))
            for name, t in tensors.items():
                buffers[shard][name] = t
                shard_of[name] = shard
            expert_names.extend(tensors)
            done += 1
    for i, name in enumerate(order):
        shard = i * shards // len(order)
        buffers[shard][name] = dense[name]
        shard_of[name] = shard
    names = order + expert_names
    if single_file:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    total = 0
    for i, tensors in enumerate(buffers):
        save_file(tensors, str(out / files[i]), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if not single_file:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: files[shard_of[name]] for name in sorted(names)},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config, hf_quant = _configs(spec, _quantized_modules(names))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
    return out
