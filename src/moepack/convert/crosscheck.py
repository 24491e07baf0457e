"""`verify --source`: re-derive sampled layers from the source checkpoint and compare bytes.

Checksums prove the artifact is what was written; this proves what was written is what the
source converts to today (catching, say, an artifact made from another revision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moepack.format.validate import read_manifest

from .source import open_source
from .transform import convert_layer


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def sample_layers(layers: list[int], count: int) -> list[int]:
    """`count` layers spread evenly over `layers` (first and last included), deterministic."""
    if count >= len(layers):
        return list(layers)
    if count == 1:
        return [layers[0]]
    step = (len(layers) - 1) / (count - 1)
    return sorted({layers[round(i * step)] for i in range(count)})


def crosscheck(
    artifact: Path, source: str, sample: int = 2, hub: dict[str, Any] | None = None
) -> list[str]:
    """Mismatch descriptions (empty when every sampled layer's tensors are byte-identical).
    `hub` goes to `open_repo` (token, endpoint, cache_dir) when `source` is a hub repo."""
    manifest = read_manifest(Path(artifact))
    # Only what the sampled layers need is read: a local directory as it is (hashing every
    # source file would cost more than the layers), a hub repo at the artifact's commit, each
    # file fetched (and checked against the Hub listing) the first time a layer asks for it.
    src = open_source(source, manifest.source.commit, **(hub or {}))
    ckpt = src.checkpoint()
    found = {m.layer: m for m in src.moe_layers}
    problems = []
    by_layer = {entry.layer: entry for entry in manifest.layers}
    for layer in sample_layers(sorted(by_layer), sample):
        if layer not in found:
            problems.append(f"layer {layer}: not an NVFP4 MoE layer in {source}")
            continue
        result = convert_layer(ckpt, found[layer], manifest.geometry, manifest.b12x_scale_mode)
        path = Path(artifact) / by_layer[layer].file
        with safe_open(str(path), framework="pt") as f:
            for name, expected in result.tensors:
                stored = f.get_tensor(name)
                if not torch.equal(_bytes(stored), _bytes(expected)):
                    problems.append(f"{by_layer[layer].file}:{name}: differs from the source")
    ckpt.close()
    return problems
