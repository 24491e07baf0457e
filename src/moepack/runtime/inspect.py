"""`moepack inspect`: what an artifact is, read from its manifest alone (no file is opened).

Before serving or copying an artifact, a user wants to know where it came from, which kernels and
scale mode it was built for, how big it is and how faithful its b12x scales are; the manifest
records all of it, so this is instant even on a cold multi-GB artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moepack.format import PAD_PREFIX, FileRecord, LayerRecord, Manifest, SourceInfo
from moepack.format.validate import read_manifest
from moepack.sizes import human_bytes

_ROLES = {
    "w13": "payload",
    "w2": "payload",
    "w13_sf": "scales",
    "w2_sf": "scales",
    "b12x.w13_sf": "b12x_scales",
    "b12x.w2_sf": "b12x_scales",
}
"""Layer-file tensors grouped by what they cost; the per-layer F32 vectors are 'other'."""


def describe(root: Path) -> dict[str, Any]:
    """A JSON-ready summary of the artifact at `root`; `ManifestError` unless its manifest is
    valid (the format's validator, the same one `load` and `verify` use)."""
    m = read_manifest(Path(root))
    model = m.model
    return {
        "root": str(root),
        "format": {"name": m.format, "version": m.format_version},
        "tool": m.tool.to_json(),
        "source": _source(m.source),
        "target": m.target,
        "b12x_scale_mode": m.b12x_scale_mode,
        "model": {
            "model_type": model.model_type,
            "architectures": None if model.architectures is None else list(model.architectures),
            "quant_algo": model.quant_algo,
            "activation": model.activation,
            "gated": model.gated,
        },
        "geometry": {
            "num_experts": model.num_experts,
            "top_k": model.top_k,
            "hidden_size": model.hidden_size,
            "moe_hidden_size": model.moe_hidden_size,
            "intermediate_size": model.intermediate_size,
            "intermediate_size_padded": model.intermediate_size_padded,
            "num_hidden_layers": model.num_hidden_layers,
        },
        "moe_layers": {"count": len(model.moe_layers), "layers": list(model.moe_layers)},
        "sizes": _sizes(m.files),
        "fidelity": _fidelity(m.layers, _block_scales(m)),
        "kernel_abi": m.kernel_abi.to_json(),
    }


def _source(src: SourceInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"type": src.type}
    if src.type == "hub":
        out.update(repo_id=src.repo_id, revision=src.revision, commit=src.commit)
    else:
        out["path"] = src.path
    out["files"] = len(src.files)
    out["bytes"] = sum(f.size for f in src.files)
    return out


def _sizes(files: tuple[FileRecord, ...]) -> dict[str, Any]:
    """Bytes in total, per file kind, and inside MoE layer files per tensor role."""
    by_kind: dict[str, int] = {}
    by_role = {"payload": 0, "scales": 0, "b12x_scales": 0, "other": 0, "padding": 0}
    for f in files:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + f.size
        if f.kind != "moe_layer":
            continue
        for name, t in (f.tensors or {}).items():
            role = "padding" if name.startswith(PAD_PREFIX) else _ROLES.get(name, "other")
            by_role[role] += t.nbytes
    return {
        "total": sum(by_kind.values()),
        "files": len(files),
        "by_kind": by_kind,
        "moe_by_role": by_role,
    }


def _block_scales(m: Manifest) -> int:
    """Block scales of one layer that carry a value (padding excluded): what the flushed count
    is out of. FC1 has `rows x H/16`, FC2 `H x n/16`, per expert."""
    model, geo = m.model, m.geometry
    rows = geo.intermediate * (2 if geo.gated else 1)
    per_expert = rows * geo.hidden // 16 + geo.hidden * geo.intermediate // 16
    return model.num_experts * per_expert


def _fidelity(layers: tuple[LayerRecord, ...], scales_per_layer: int) -> dict[str, Any]:
    """Worst and average b12x error over layers, plus each layer's own figures; flushed b12x
    scales come with the number of block scales they are out of."""
    per_layer = [
        {
            "layer": e.layer,
            **e.fidelity.to_json(),
            "gate_up_requantized_experts": e.gate_up_requantized_experts or 0,
        }
        for e in layers
    ]
    if not per_layer:
        return {"layers": []}
    return {
        "b12x_max_rel_err": max(x["b12x_max_rel_err"] for x in per_layer),
        "b12x_mean_rel_err": sum(x["b12x_mean_rel_err"] for x in per_layer) / len(per_layer),
        "b12x_flushed_scales": sum(x.get("b12x_flushed_scales", 0) for x in per_layer),
        "block_scales": scales_per_layer * len(per_layer),
        "requant_max_rel_err": max(x.get("requant_max_rel_err", 0.0) for x in per_layer),
        "gate_up_requantized_experts": sum(x["gate_up_requantized_experts"] for x in per_layer),
        "layers": per_layer,
    }


def _gb(n: int) -> str:
    return human_bytes(n)


def _flushed(fid: dict[str, Any]) -> str:
    flushed, total = fid["b12x_flushed_scales"], fid.get("block_scales") or 0
    if not total:
        return f"{flushed}"
    return f"{flushed:,} of {total:,} ({100 * flushed / total:.2f}%)"


def format_description(d: dict[str, Any]) -> str:
    """`describe`'s dict as a short human-readable report."""
    src, geo, fid, sizes = d["source"], d["geometry"], d["fidelity"], d["sizes"]
    if src["type"] == "hub":
        origin = f"hub {src['repo_id']} @ {src['revision']} (commit {src['commit']})"
    else:
        origin = f"local {src['path']}"
    model = d["model"]
    lines = [
        f"moepack artifact {d['root']} (format v{d['format']['version']}, written by moepack {d['tool'].get('version')}, torch {d['tool'].get('torch')})",
        f"source:     {origin}; {src['files']} files, {_gb(src['bytes'])}",
        f"model:      {model['model_type']} {model['architectures']}, {model['quant_algo']}, {model['activation']}{' gated' if model['gated'] else ''}",
        f"target:     {d['target']}, b12x scales {d['b12x_scale_mode']}, flashinfer {d['kernel_abi'].get('flashinfer')}",
        f"geometry:   E={geo['num_experts']} top_k={geo['top_k']} H={geo['moe_hidden_size']} (hidden {geo['hidden_size']}) n={geo['intermediate_size']} -> n_p={geo['intermediate_size_padded']}",
        f"MoE layers: {d['moe_layers']['count']} of {geo['num_hidden_layers']}: {_ranges(d['moe_layers']['layers'])}",
        f"size:       {_gb(sizes['total'])} in {sizes['files']} files: "
        + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(sizes["by_kind"].items())),
        "  MoE:      " + ", ".join(f"{k} {_gb(v)}" for k, v in sizes["moe_by_role"].items()),
    ]
    if fid["layers"]:
        lines.append(
            f"fidelity:   b12x rel err max {fid['b12x_max_rel_err']:.3g}, mean {fid['b12x_mean_rel_err']:.3g}; "
            f"b12x scales flushed to zero {_flushed(fid)}; gate/up requantized experts "
            f"{fid['gate_up_requantized_experts']} (max rel err {fid['requant_max_rel_err']:.3g})"
        )
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """`[1, 2, 3, 7]` -> `1-3, 7`: a long layer list stays one line."""
    parts: list[str] = []
    for v in values:
        if parts and parts[-1].split("-")[-1] == str(v - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{v}"
        else:
            parts.append(str(v))
    return ", ".join(parts)
