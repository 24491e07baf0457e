"""Load-path benchmark on one real-geometry Nemotron 3 Super MoE layer (E=512, H=1024, n=2688).

Compares, warm (page cache) and cold (pages dropped with posix_fadvise DONTNEED):
`moepack.runtime.load` (buffered and O_DIRECT), plain `safetensors.torch.load_file` of the same
layer file, the raw-checkpoint path (512 x 8 per-expert tensors + stack/pad/swizzle/alphas on the
device), and the machine's limits: pinned host-to-device copy rate and sequential disk read rate.
Reports peak device memory over the final footprint. `--device cpu` is a smoke mode on a tiny
layer (no pinned copies, no device memory figures).

    python benchmarks/load.py --out results.json            # H100: ~5 min incl. generation
    python benchmarks/load.py --device cpu --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint
from moepack.runtime import layout, load, scales

READ_CHUNK = 64 << 20


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages (works without root for clean pages)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, cold: list[Path] | None) -> float:
    """Seconds for fn(), after dropping `cold` files from the page cache if given."""
    if cold:
        drop_cache(cold)
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def disk_read(path: Path, view: memoryview) -> None:
    """Sequential large reads into one reused buffer: the disk's (or page cache's) rate."""
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass


def raw_checkpoint_path(src: Path, device: torch.device, spec: synthetic.SyntheticSpec) -> dict:
    """Today's serving start-up: load every per-expert tensor, then convert on the device."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard), device=str(device)))
    prefix = f"backbone.layers.{spec.moe_layers[0]}.mixer.experts"
    n_p = layout.padded_intermediate(spec.intermediate)

    def stack(proj: str, part: str) -> torch.Tensor:
        return torch.stack(
            [tensors[f"{prefix}.{e}.{proj}.{part}"] for e in range(spec.num_experts)]
        )

    w13 = layout.pad_dim(stack("up_proj", "weight"), 1, n_p)
    w2 = layout.pad_dim(stack("down_proj", "weight"), 2, n_p // 2)
    sf13 = layout.swizzle(layout.pad_dim(stack("up_proj", "weight_scale"), 1, n_p))
    sf2 = layout.swizzle(layout.pad_dim(stack("down_proj", "weight_scale"), 2, n_p // 16))
    ws13, ws2 = stack("up_proj", "weight_scale_2"), stack("down_proj", "weight_scale_2")
    cut = scales.cutlass_scalars(
        stack("up_proj", "input_scale"), ws13, stack("down_proj", "input_scale"), ws2
    )
    baked = (scales.bake_block_scales(sf13, ws13), scales.bake_block_scales(sf2, ws2))
    return {"w13": w13, "w2": w2, "sf": (sf13, sf2), "cut": cut, "baked": baked}


def pinned_h2d(nbytes: int, device: torch.device) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    return timed(lambda: dev.copy_(host, non_blocking=True), device, None)


def peak_ratio(fn: Callable[[], Any], footprint: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / footprint


def measure(device: torch.device, work: Path, smoke: bool, source: Path | None) -> dict[str, Any]:
    spec = synthetic.default_spec("super") if smoke else synthetic.super_layer_spec()
    t0 = time.perf_counter()
    src = source or synthetic.write_checkpoint(work / "src", spec)
    convert_checkpoint(src, work / "art", moe_only=True)
    prep = time.perf_counter() - t0
    art_root = work / "art"
    layer_file = next((art_root / "moe").glob("layer-*.safetensors"))
    shards = sorted(src.glob("model-*.safetensors"))
    nbytes = layer_file.stat().st_size
    dev = str(device)
    read_buf = memoryview(bytearray(READ_CHUNK))

    def moepack_load(direct: bool = False) -> Any:
        return load(art_root, device=device, backend="reference", direct_io=direct)

    footprint = moepack_load().nbytes
    seconds: dict[str, float] = {}
    for mode, cold in (("warm", None), ("cold", [layer_file])):
        if mode == "warm":
            moepack_load()  # populate the page cache and warm up CUDA
        seconds[f"moepack_{mode}"] = timed(moepack_load, device, cold)
        seconds[f"moepack_direct_{mode}"] = timed(lambda: moepack_load(True), device, cold)
        seconds[f"safetensors_{mode}"] = timed(
            lambda: load_file(str(layer_file), device=dev), device, cold
        )
        seconds[f"raw_checkpoint_{mode}"] = timed(
            lambda: raw_checkpoint_path(src, device, spec), device, shards if cold else None
        )
        seconds[f"disk_read_{mode}"] = timed(lambda: disk_read(layer_file, read_buf), device, cold)
    if device.type == "cuda":
        seconds["pinned_h2d"] = pinned_h2d(nbytes, device)
    rates = {k: nbytes / s / 1e9 for k, s in seconds.items()}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "geometry": {"E": spec.num_experts, "H": spec.moe_hidden, "n": spec.intermediate},
        "file_bytes": nbytes,
        "footprint_bytes": footprint,
        "prep_seconds": prep,
        "seconds": seconds,
        "gb_per_s": rates,
        "peak_over_footprint": {
            "moepack": peak_ratio(moepack_load, footprint, device),
            "safetensors": peak_ratio(
                lambda: load_file(str(layer_file), device=dev), footprint, device
            ),
            "raw_checkpoint": peak_ratio(
                lambda: raw_checkpoint_path(src, device, spec), footprint, device
            ),
        },
    }


def table(r: dict[str, Any]) -> str:
    g, s = r["gb_per_s"], r["seconds"]
    lines = [
        f"Device: {r['device']}; layer file {r['file_bytes'] / 1e9:.2f} GB "
        f"(E={r['geometry']['E']}, H={r['geometry']['H']}, n={r['geometry']['n']})",
        "",
        "| path | warm s | warm GB/s | cold s | cold GB/s | peak / footprint |",
        "|---|---|---|---|---|---|",
    ]
    peaks = r["peak_over_footprint"]
    for key, label in (
        ("moepack", "moepack load"),
        ("moepack_direct", "moepack load, O_DIRECT"),
        ("safetensors", "safetensors load_file"),
        ("raw_checkpoint", "raw checkpoint + convert"),
        ("disk_read", "disk read (limit)"),
    ):
        peak = peaks.get(key)
        lines.append(
            f"| {label} | {s[key + '_warm']:.3f} | {g[key + '_warm']:.2f} | {s[key + '_cold']:.3f}"
            f" | {g[key + '_cold']:.2f} | {'-' if peak is None else f'{peak:.2f}x'} |"
        )
    if "pinned_h2d" in g:
        lines.append(
            f"| pinned H2D copy (limit) | {s['pinned_h2d']:.3f} | {g['pinned_h2d']:.2f} | | | |"
        )
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    if "pinned_h2d" in g:
        lines.append(
            f"| warm load / pinned H2D | {g['moepack_warm'] / g['pinned_h2d']:.2f} | >= 0.5 |"
        )
    lines.append(
        f"| warm load / safetensors warm | {g['moepack_warm'] / g['safetensors_warm']:.2f} | >= 4 |"
    )
    best_cold = max(g["moepack_cold"], g["moepack_direct_cold"])
    lines.append(
        f"| cold load (best mode) / disk read cold | {best_cold / g['disk_read_cold']:.2f} | >= 0.9 |"
    )
    lines.append(
        f"| warm load / raw checkpoint warm | {g['moepack_warm'] / g['raw_checkpoint_warm']:.2f} | |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True, help="write results as JSON here")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: tmp)")
    ap.add_argument(
        "--source", type=Path, help="reuse a checkpoint made by synthetic.super_layer_spec()"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = measure(device, Path(tmp), smoke, args.source)
    print(table(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
