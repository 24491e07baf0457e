"""Finding the NVFP4 MoE layers of a checkpoint from its quant config and tensor set.

A MoE layer is a module prefix under which numbered experts `PREFIX.<e>.<proj>` are NVFP4
linears with the projections of a known expert MLP: relu2 (`up`, `down`) or gated SwiGLU
(`gate`, `up`, `down`; Mixtral/DeepSeek spell them `w1`, `w3`, `w2`). Nothing depends on one
model's naming beyond that.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from moepack.errors import UnsupportedModel

from .checkpoint import QuantConfig

NVFP4_PARTS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
PROJ_ROLES = {
    "up_proj": "up",
    "down_proj": "down",
    "gate_proj": "gate",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}
_EXPERT = re.compile(r"^(?P<prefix>.+)\.(?P<idx>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
GATED_ACTS = ("silu", "swiglu")
RELU2_ACTS = ("relu2",)


@dataclass(frozen=True)
class MoELayer:
    layer: int
    prefix: str  # e.g. backbone.layers.1.mixer.experts
    num_experts: int
    projs: dict[str, str]  # role (up/down/gate) -> projection name in the checkpoint

    @property
    def gated(self) -> bool:
        return "gate" in self.projs

    def tensor(self, expert: int, role: str, part: str) -> str:
        return f"{self.prefix}.{expert}.{self.projs[role]}.{part}"

    def tensors(self) -> list[str]:
        """Every tensor a conversion of this layer reads."""
        return [
            self.tensor(e, role, part)
            for e in range(self.num_experts)
            for role in self.projs
            for part in NVFP4_PARTS
        ]


def activation_of(config: dict[str, Any]) -> str:
    """The expert activation named by the config (`mlp_hidden_act` on Nemotron-H, else `hidden_act`)."""
    act = config.get("mlp_hidden_act") or config.get("hidden_act") or config.get("activation")
    if not isinstance(act, str):
        raise UnsupportedModel("config.json names no activation (mlp_hidden_act / hidden_act)")
    return act.lower()


def check_supported_config(config: dict[str, Any]) -> None:
    """Refuse what the kernels cannot run, from config.json alone (before any weight is fetched)."""
    act = activation_of(config)
    if config.get("model_type") == "gpt_oss" or "swiglu_limit" in config:
        raise UnsupportedModel("the gpt-oss SwiGLU variant (clamped, interleaved) is not supported")
    if act not in GATED_ACTS + RELU2_ACTS:
        raise UnsupportedModel(
            f"activation {act!r} is not supported (relu2 for non-gated, silu for gated experts)"
        )


def nvfp4_modules(names: Iterable[str], quant: QuantConfig) -> set[str]:
    """Modules that the quant config marks NVFP4 and that carry all four NVFP4 tensors."""
    present: dict[str, set[str]] = defaultdict(set)
    for name in names:
        module, _, part = name.rpartition(".")
        if part in NVFP4_PARTS:
            present[module].add(part)
    return {m for m, parts in present.items() if parts == set(NVFP4_PARTS) and quant.is_nvfp4(m)}


def find_moe_layers(
    names: Iterable[str], quant: QuantConfig, config: dict[str, Any]
) -> list[MoELayer]:
    """Group NVFP4 expert linears into layers; check expert numbering and projection sets."""
    groups: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module in nvfp4_modules(names, quant):
        m = _EXPERT.match(module)
        if m and m["proj"] in PROJ_ROLES:
            groups[m["prefix"]][int(m["idx"])].add(m["proj"])
    layers = []
    for ordinal, (prefix, experts) in enumerate(sorted(groups.items(), key=_natural)):
        if len(experts) < 2:
            continue  # one numbered module is not a mixture (e.g. a single shared expert)
        layers.append(_layer(prefix, experts, ordinal))
    if not layers:
        raise UnsupportedModel("no NVFP4 MoE layer found (no numbered NVFP4 expert projections)")
    _check_uniform(layers, config)
    return sorted(layers, key=lambda x: x.layer)


def _natural(item: tuple[str, Any]) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def _layer(prefix: str, experts: dict[int, set[str]], ordinal: int) -> MoELayer:
    if sorted(experts) != list(range(len(experts))):
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        raise UnsupportedModel(
            f"{prefix}: experts {missing[:8]} missing (expected 0..{max(experts)})"
        )
    proj_sets = {frozenset(p) for p in experts.values()}
    if len(proj_sets) != 1:
        odd = next(e for e, p in experts.items() if frozenset(p) != max(proj_sets, key=len))
        raise UnsupportedModel(f"{prefix}.{odd}: projections differ from the other experts")
    projs = {PROJ_ROLES[p]: p for p in next(iter(proj_sets))}
    if set(projs) not in ({"up", "down"}, {"gate", "up", "down"}):
        raise UnsupportedModel(
            f"{prefix}: expert projections {sorted(projs.values())} are not an MLP"
        )
    m = _LAYER.search(prefix)
    return MoELayer(int(m.group(1)) if m else ordinal, prefix, len(experts), projs)


def _check_uniform(layers: list[MoELayer], config: dict[str, Any]) -> None:
    gated = {layer.gated for layer in layers}
    if len(gated) != 1:
        raise UnsupportedModel("some MoE layers are gated and others are not")
    act = activation_of(config)
    if gated == {True} and act not in GATED_ACTS:
        raise UnsupportedModel(f"gated experts with activation {act!r} (expected silu)")
    if gated == {False} and act not in RELU2_ACTS:
        raise UnsupportedModel(f"non-gated experts with activation {act!r} (expected relu2)")
    if len({layer.layer for layer in layers}) != len(layers):
        raise UnsupportedModel("two MoE layers map to the same layer index")
