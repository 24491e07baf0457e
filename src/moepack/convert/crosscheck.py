"""`verify --source`: re-derive sampled layers from the source checkpoint and compare bytes.

Checksums prove the artifact is what was written; this proves what was written is what the
source converts to today (catching, say, an artifact made from another revision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moepack.errors import SourceError
from moepack.format import Geometry, Manifest
from moepack.format.validate import read_manifest

from .checkpoint import Checkpoint
from .moe_layers import MoELayer
from .source import open_source
from .transform import convert_layer, geometry_of
from .writer import Blob


def _bytes(t: torch.Tensor | Blob) -> torch.Tensor:
    """A tensor's bytes, flat; a streamed payload (`Blob`) read whole."""
    if isinstance(t, Blob):
        return torch.frombuffer(
            bytearray(b"".join(bytes(c) for c in t.chunks())), dtype=torch.uint8
        )
    return t.reshape(-1).view(torch.uint8)


def sample_layers(layers: list[int], count: int) -> list[int]:
    """`count` layers spread evenly over `layers` (first and last included), deterministic."""
    if count >= len(layers):
        return list(layers)
    if count == 1:
        return [layers[0]]
    step = (len(layers) - 1) / (count - 1)
    return sorted({layers[round(i * step)] for i in range(count)})


def _describe(geo: Geometry) -> str:
    return f"E={geo.num_experts} H={geo.hidden} n={geo.intermediate}" + (
        " gated" if geo.gated else ""
    )


def _same_model(
    ckpt: Checkpoint, found: dict[int, MoELayer], manifest: Manifest, source: str
) -> None:
    """Refuse a source that is not this artifact's model (other MoE layers or geometry) with
    one clear message, before any layer is converted: that is unusable input (exit 2), not a
    failed check."""
    wanted = sorted(rec.layer for rec in manifest.layers)
    missing = [layer for layer in wanted if layer not in found]
    if missing:
        raise SourceError(
            f"{source}: not the checkpoint this artifact was converted from: its NVFP4 MoE "
            f"layers are {sorted(found) or 'none'}, the artifact's are {wanted}",
            path=source,
            expected=wanted,
            found=sorted(found),
        )
    for layer in wanted:
        geo = geometry_of(ckpt, found[layer])
        if geo != manifest.geometry:
            raise SourceError(
                f"{source}: not the checkpoint this artifact was converted from: MoE layer "
                f"{layer} is {_describe(geo)}, the artifact's is {_describe(manifest.geometry)}",
                path=source,
                expected=_describe(manifest.geometry),
                found=_describe(geo),
            )


def crosscheck(
    artifact: Path, source: str, sample: int = 2, hub: dict[str, Any] | None = None
) -> list[str]:
    """Mismatch descriptions, one per differing layer (empty when every sampled layer's tensors
    are byte-identical). `hub` goes to `open_repo` (token, endpoint, cache_dir) when `source`
    is a hub repo. A source that cannot be read, or is another model, raises
    `SourceError`/`CheckpointError`/`HubError` (exit 2)."""
    manifest = read_manifest(Path(artifact))
    # Only what the sampled layers need is read: a local directory as it is (hashing every
    # source file would cost more than the layers), a hub repo at the artifact's commit, each
    # file fetched (and checked against the Hub listing) the first time a layer asks for it.
    src = open_source(source, manifest.source.commit, **(hub or {}))
    ckpt = src.checkpoint()
    try:
        with ckpt.naming_shards():
            found = {m.layer: m for m in src.moe_layers}
            _same_model(ckpt, found, manifest, source)
            problems = []
            by_layer = {entry.layer: entry for entry in manifest.layers}
            for layer in sample_layers(sorted(by_layer), sample):
                result = convert_layer(
                    ckpt, found[layer], manifest.geometry, manifest.b12x_scale_mode
                )
                rel = by_layer[layer].file
                with safe_open(str(Path(artifact) / rel), framework="pt") as f:
                    differ = [
                        name
                        for name, expected in result.tensors
                        if not torch.equal(_bytes(f.get_tensor(name)), _bytes(expected))
                    ]
                if differ:
                    problems.append(
                        f"{rel}: {len(differ)} of {len(result.tensors)} tensors differ from "
                        f"layer {layer} re-derived from the source ({', '.join(differ)})"
                    )
    finally:
        ckpt.close()
    return problems
