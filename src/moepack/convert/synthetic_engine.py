"""Tiny engine-loadable ModelOpt NVFP4 checkpoints: what a serving engine needs, and nothing real.

`synthetic.py` writes checkpoints for the converter (only the tensors conversion reads). The
checkpoints here are complete models that vLLM and Hugging Face transformers build and run:
full HF configs, a word-level tokenizer, every non-expert tensor in BF16 (so an engine's
unquantized path runs them on any device), and the routed experts in NVFP4, quantized exactly
as ModelOpt does (`synthetic._expert`). Two models:

- `qwen3-moe`: Qwen3-MoE, gated SwiGLU experts, every layer MoE.
- `nemotron-h`: Nemotron-H with mamba, attention and latent MoE layers (relu2 experts in the
  latent space between `fc1_latent_proj`/`fc2_latent_proj`, a BF16 shared expert), like
  Nemotron 3 Super in miniature.

The scales are chosen so that a greedy decode is decisive (large logit gaps) and the expert
inputs stay within the activation range the input scales were calibrated on.

    python -m moepack.convert.synthetic_engine qwen3-moe OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .synthetic import SyntheticSpec, _expert

MODELS = ("qwen3-moe", "nemotron-h")
VOCAB = 256
SPECIAL = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class EngineSpec:
    """Geometry of a tiny engine model (head_dim 64: the CPU attention backends take it)."""

    model: str
    hidden: int = 128
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64
    num_experts: int = 8
    top_k: int = 2
    intermediate: int = 80  # not a multiple of 128: the converter pads it
    latent: int = 128  # nemotron-h only; a multiple of 128 (b12x W4A4)
    shared_intermediate: int = 96  # nemotron-h only
    pattern: str = "EE"  # nemotron-h: M mamba, * attention, E MoE
    mamba_heads: int = 4
    mamba_head_dim: int = 32
    ssm_state: int = 16
    seed: int = 0

    @property
    def moe_hidden(self) -> int:
        return self.latent if self.model == "nemotron-h" else self.hidden

    @property
    def prefix_root(self) -> str:
        return "backbone" if self.model == "nemotron-h" else "model"


def default_engine_spec(model: str, **overrides: Any) -> EngineSpec:
    if model == "qwen3-moe":
        return EngineSpec("qwen3-moe", pattern="EE", **overrides)
    if model == "nemotron-h":
        return EngineSpec("nemotron-h", pattern="ME*E", **overrides)
    raise ValueError(f"unknown engine model {model!r}; choose from {MODELS}")


def _randn(g: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


def _norm(g: torch.Generator, n: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * (1 + 0.1 * torch.randn(n, generator=g))).to(torch.bfloat16)


def _linear(g: torch.Generator, out: int, inp: int) -> torch.Tensor:
    """Variance-preserving BF16 weight (std 1/sqrt(in))."""
    return _randn(g, out, inp, std=inp**-0.5)


def _attention(g: torch.Generator, s: EngineSpec, p: str, qk_norm: bool) -> dict[str, torch.Tensor]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    t = {
        f"{p}.q_proj.weight": _linear(g, q, s.hidden),
        f"{p}.k_proj.weight": _linear(g, kv, s.hidden),
        f"{p}.v_proj.weight": _linear(g, kv, s.hidden),
        f"{p}.o_proj.weight": _randn(g, s.hidden, q, std=0.5 * q**-0.5),
    }
    if qk_norm:
        t[f"{p}.q_norm.weight"] = _norm(g, s.head_dim)
        t[f"{p}.k_norm.weight"] = _norm(g, s.head_dim)
    return t


def _mamba(g: torch.Generator, s: EngineSpec, p: str) -> dict[str, torch.Tensor]:
    inner = s.mamba_heads * s.mamba_head_dim
    conv_dim = inner + 2 * s.ssm_state  # n_groups = 1
    proj = inner + conv_dim + s.mamba_heads
    return {
        f"{p}.in_proj.weight": _linear(g, proj, s.hidden),
        f"{p}.conv1d.weight": _randn(g, conv_dim, 1, 4, std=0.5),
        f"{p}.conv1d.bias": _randn(g, conv_dim, std=0.1),
        f"{p}.dt_bias": _randn(g, s.mamba_heads, std=0.5),
        f"{p}.A_log": (torch.rand(s.mamba_heads, generator=g) * 2).to(torch.bfloat16),
        f"{p}.D": _norm(g, s.mamba_heads),
        f"{p}.norm.weight": _norm(g, inner),
        f"{p}.out_proj.weight": _randn(g, s.hidden, inner, std=0.5 * inner**-0.5),
    }


def _moe_spec(s: EngineSpec) -> SyntheticSpec:
    variant = "gated" if s.model == "qwen3-moe" else "super"
    return SyntheticSpec(
        variant, s.hidden, s.moe_hidden, s.intermediate, s.num_experts, s.top_k, "E", seed=s.seed
    )


def _moe(g: torch.Generator, s: EngineSpec, p: str) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {f"{p}.gate.weight": _linear(g, s.num_experts, s.hidden)}
    if s.model == "nemotron-h":
        t[f"{p}.gate.e_score_correction_bias"] = torch.randn(s.num_experts, generator=g) * 0.1
        t[f"{p}.fc1_latent_proj.weight"] = _randn(g, s.latent, s.hidden, std=0.5 * s.hidden**-0.5)
        t[f"{p}.fc2_latent_proj.weight"] = _linear(g, s.hidden, s.latent)
        t[f"{p}.shared_experts.up_proj.weight"] = _linear(g, s.shared_intermediate, s.hidden)
        t[f"{p}.shared_experts.down_proj.weight"] = _randn(
            g, s.hidden, s.shared_intermediate, std=0.5 * s.shared_intermediate**-0.5
        )
    spec = _moe_spec(s)
    for e in range(s.num_experts):
        t |= _expert(g, spec, f"{p}.experts.{e}")
    return t


def tensors(s: EngineSpec) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, HF names, in layer order."""
    g = torch.Generator().manual_seed(s.seed)
    root = s.prefix_root
    nemo = s.model == "nemotron-h"
    t: dict[str, torch.Tensor] = {
        f"{root}.{'embeddings' if nemo else 'embed_tokens'}.weight": _randn(
            g, VOCAB, s.hidden, std=1.0
        )
    }
    for i, kind in enumerate(s.pattern):
        p = f"{root}.layers.{i}"
        if nemo:
            # The MoE input is the pre-norm output: 0.5 keeps it inside the calibrated range.
            t[f"{p}.norm.weight"] = _norm(g, s.hidden, 0.5 if kind == "E" else 1.0)
            if kind == "M":
                t |= _mamba(g, s, f"{p}.mixer")
            elif kind == "*":
                t |= _attention(g, s, f"{p}.mixer", qk_norm=False)
            else:
                t |= _moe(g, s, f"{p}.mixer")
        else:
            t[f"{p}.input_layernorm.weight"] = _norm(g, s.hidden)
            t |= _attention(g, s, f"{p}.self_attn", qk_norm=True)
            t[f"{p}.post_attention_layernorm.weight"] = _norm(g, s.hidden, 0.5)
            t |= _moe(g, s, f"{p}.mlp")
    t[f"{root}.{'norm_f' if nemo else 'norm'}.weight"] = _norm(g, s.hidden)
    # Large logits: greedy choices are decided by margins far above bf16 rounding.
    t["lm_head.weight"] = _randn(g, VOCAB, s.hidden, std=4 * s.hidden**-0.5)
    return t


def _exclude(s: EngineSpec) -> list[str]:
    """ModelOpt exclusions: everything that is not a routed expert stays BF16."""
    if s.model == "nemotron-h":
        return [
            "lm_head",
            "*.gate",
            "*.fc1_latent_proj",
            "*.fc2_latent_proj",
            "*.shared_experts*",
            "*mixer.in_proj",
            "*mixer.out_proj",
            "*q_proj",
            "*k_proj",
            "*v_proj",
            "*o_proj",
        ]
    return ["lm_head", "*.gate", "*self_attn*"]


def config(s: EngineSpec) -> dict[str, Any]:
    """config.json, with the ModelOpt `quantization_config` an NVFP4 export carries."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": s.hidden,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "num_experts_per_tok": s.top_k,
        "moe_intermediate_size": s.intermediate,
        "norm_topk_prob": True,
        "torch_dtype": "bfloat16",
    }
    if s.model == "nemotron-h":
        cfg = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            **common,
            "num_hidden_layers": len(s.pattern),
            "hybrid_override_pattern": s.pattern,
            "layer_norm_epsilon": 1e-5,
            "intermediate_size": 2 * s.hidden,
            "mlp_hidden_act": "relu2",
            "mlp_bias": False,
            "use_bias": False,
            "use_conv_bias": True,
            "use_mamba_kernels": False,
            "mamba_num_heads": s.mamba_heads,
            "mamba_head_dim": s.mamba_head_dim,
            "ssm_state_size": s.ssm_state,
            "n_groups": 1,
            "conv_kernel": 4,
            "expand": s.mamba_heads * s.mamba_head_dim // s.hidden,
            "chunk_size": 128,
            "mamba_hidden_act": "silu",
            "n_routed_experts": s.num_experts,
            "n_shared_experts": 1,
            "moe_shared_expert_intermediate_size": s.shared_intermediate,
            "moe_latent_size": s.latent,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "residual_in_fp32": False,
            "rescale_prenorm_residual": True,
        }
    else:
        cfg = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **common,
            "num_hidden_layers": len(s.pattern),
            "intermediate_size": 2 * s.hidden,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "num_experts": s.num_experts,
        }
    cfg["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_quant_algo": None,
        "ignore": _exclude(s),  # config.json's spelling of exclude_modules
    }
    return cfg


def tokenizer_files() -> dict[str, Any]:
    """A word-level tokenizer: `<s>`, `</s>`, and the words `w3` ... `w255`, split on spaces."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)} | {f"w{i}": i for i in range(3, VOCAB)}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": 512,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config}


def write_engine_checkpoint(out: str | Path, spec: EngineSpec) -> Path:
    """Write the checkpoint to `out` (created); deterministic from `spec.seed`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = tensors(spec)
    names = list(t)
    half = len(names) // 2  # two shards, cut inside a layer like real exports
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map: dict[str, str] = {}
    for file, part in shards.items():
        save_file({n: t[n].contiguous() for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(v.numel() * v.element_size() for v in t.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    cfg = config(spec)
    quant = cfg["quantization_config"]
    hf_quant = {
        "producer": {"name": "modelopt", "version": "0.37.0"},
        "quantization": {
            "quant_algo": quant["quant_algo"],
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": quant["ignore"],
        },
    }
    files: dict[str, Any] = {
        "model.safetensors.index.json": index,
        "config.json": cfg,
        "hf_quant_config.json": hf_quant,
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False},
        **tokenizer_files(),
    }
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_engine_checkpoint(args.out, default_engine_spec(args.model, seed=args.seed)))


if __name__ == "__main__":
    main()
