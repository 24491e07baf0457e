"""Load-path benchmark on one real-geometry Nemotron 3 Super MoE layer (E=512, H=1024, n=2688).

Compares, warm (page cache) and cold (pages dropped with posix_fadvise DONTNEED):
`moepack.runtime.load` (buffered and O_DIRECT), plain `safetensors.torch.load_file` of the same
layer file, the raw-checkpoint path (512 x 8 per-expert tensors + stack/pad/swizzle/alphas on the
device), and the machine's limits: pinned host-to-device copy rate and sequential disk read rate.
Reports peak device memory over the final footprint. `--threads 1 4 8 16` times `moepack load`
(buffered and O_DIRECT, warm and cold) once per reader thread count, one table row each; warm
times are the best of `--repeats`. `--device cpu` is a smoke mode on a tiny layer (no pinned
copies, no device memory figures).

    python benchmarks/load.py --out results.json            # H100: ~5 min incl. generation
    python benchmarks/load.py --source ckpt --threads 1 4 8 16 --out results.json
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

import fastckpt
import torch
from cache import drop_cache
from safetensors.torch import load_file

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint
from moepack.runtime import layout, load, scales
from moepack.runtime.loader import CHUNK_BYTES, HOST_PATH, READ_THREADS

READ_CHUNK = 64 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any], device: torch.device, cold: list[Path] | None, repeats: int = 1
) -> float:
    """Best seconds for fn() over `repeats` runs, each after dropping `cold` files from the page
    cache if given."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        if cold:
            drop_cache(cold)
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
        del result
    return best


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


def limits(layer_file: Path, device: torch.device, threads: int) -> dict[str, float]:
    """Seconds for the pieces of a warm staged load, each alone, on the layer file's data:
    threaded `preadv` into a ring of pinned buffers (no copy to the device); host-to-device
    copies of 32 MiB pinned chunks on one stream; the same on two streams; and registering the
    mapped file pages with CUDA (cudaHostRegister) and unregistering them, whole file at once."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from moepack.runtime import hostmem

    size = layer_file.stat().st_size
    chunk = 32 << 20
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads + 2)]
    views = [memoryview(b.numpy().data).cast("B") for b in ring]
    fd = os.open(layer_file, os.O_RDONLY)
    out: dict[str, float] = {}
    try:
        starts = list(range(0, size, chunk))

        def read(i: int) -> None:
            os.preadv(fd, [views[i % len(views)][: min(chunk, size - starts[i])]], starts[i])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(len(starts))))  # warm
            t0 = time.perf_counter()
            list(pool.map(read, range(len(starts))))
            out["pread_pinned_only"] = time.perf_counter() - t0
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        streams = [torch.cuda.Stream(device) for _ in range(2)]
        for name, used in (("h2d_chunks_1stream", 1), ("h2d_chunks_2streams", 2)):
            best = float("inf")
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                for i, pos in enumerate(starts):
                    n = min(chunk, size - pos)
                    with torch.cuda.stream(streams[i % used]):
                        dev[pos : pos + n].copy_(ring[i % len(ring)][:n], non_blocking=True)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            out[name] = best
        del dev
        with hostmem.Mapping(fd, size) as m:
            m.array(0, size).sum()  # fault the mapping in (pages are cached)
            t0 = time.perf_counter()
            ok = hostmem.cuda_register(m.addr, size)
            out["register_whole_file"] = time.perf_counter() - t0
            if ok:
                t0 = time.perf_counter()
                hostmem.cuda_unregister(m.addr)
                out["unregister_whole_file"] = time.perf_counter() - t0
    finally:
        os.close(fd)
    return out


def measure(
    device: torch.device,
    work: Path,
    smoke: bool,
    source: Path | None,
    threads: list[int],
    repeats: int,
) -> dict[str, Any]:
    spec = synthetic.default_spec("super") if smoke else synthetic.super_layer_spec()
    t0 = time.perf_counter()
    src = source or (
        synthetic.write_checkpoint(work / "src", spec)
        if smoke
        else fastckpt.write_fast_checkpoint(work / "src", spec)
    )
    convert_checkpoint(src, work / "art", moe_only=True)
    prep = time.perf_counter() - t0
    art_root = work / "art"
    layer_file = next((art_root / "moe").glob("layer-*.safetensors"))
    shards = sorted(src.glob("model-*.safetensors"))
    nbytes = layer_file.stat().st_size
    dev = str(device)
    read_buf = memoryview(bytearray(READ_CHUNK))
    paths: dict[str, list[str]] = {}

    def moepack_load(
        direct: bool | None = False,
        n: int | None = None,
        host_path: str = "staged",
        chunk: int = CHUNK_BYTES,
        tag: str = "",
        buffers: int | None = None,
    ) -> Any:
        art = load(
            art_root,
            device=device,
            backend="reference",
            direct_io=direct,
            read_threads=n,
            host_path=host_path,
            chunk_bytes=chunk,
            staging_buffers=buffers,
        )
        if tag:
            paths[tag] = list(art.read_paths)
        return art

    reference = moepack_load().moe_layers
    footprint = sum(m.storage.numel() for m in reference.values())
    ref_storage = next(iter(reference.values())).storage
    seconds: dict[str, float] = {}
    checks: dict[str, bool] = {}
    big = max(threads)
    for mode, cold in (("warm", None), ("cold", [layer_file])):
        reps = repeats if mode == "warm" else 1
        for n in threads:
            if mode == "warm":
                moepack_load(False, n)  # populate the page cache, warm up CUDA and the buffers
                moepack_load(True, n)
            seconds[f"moepack_t{n}_{mode}"] = timed(
                lambda n=n: moepack_load(False, n), device, cold, reps
            )
            seconds[f"moepack_direct_t{n}_{mode}"] = timed(
                lambda n=n: moepack_load(True, n), device, cold, reps
            )
        if device.type == "cuda":
            seconds[f"moepack_registered_t{big}_{mode}"] = timed(
                lambda m=mode: moepack_load(False, big, "registered", tag=f"registered_{m}"),
                device,
                cold,
                reps,
            )
            got = moepack_load(False, big, "registered").moe_layers
            checks[f"registered_{mode}_bytes_equal"] = bool(
                torch.equal(next(iter(got.values())).storage, ref_storage)
            )
            del got
            seconds[f"moepack_ring2x_t{big}_{mode}"] = timed(
                lambda: moepack_load(False, big, buffers=2 * big + 4), device, cold, reps
            )
            for chunk_mib in (8, 128):
                seconds[f"moepack_chunk{chunk_mib}_t{big}_{mode}"] = timed(
                    lambda c=chunk_mib: moepack_load(False, big, chunk=c << 20),
                    device,
                    cold,
                    reps,
                )
        seconds[f"moepack_default_{mode}"] = timed(
            lambda m=mode: moepack_load(None, None, HOST_PATH, tag=f"default_{m}"),
            device,
            cold,
            reps,
        )
        seconds[f"safetensors_{mode}"] = timed(
            lambda: load_file(str(layer_file), device=dev), device, cold, reps
        )
        seconds[f"raw_checkpoint_{mode}"] = timed(
            lambda: raw_checkpoint_path(src, device, spec), device, shards if cold else None
        )
        seconds[f"disk_read_{mode}"] = timed(
            lambda: disk_read(layer_file, read_buf), device, cold, reps
        )
    pieces: dict[str, float] = {}
    if device.type == "cuda":
        seconds["pinned_h2d"] = pinned_h2d(nbytes, device)
        pieces = limits(layer_file, device, big)
    rates = {k: nbytes / s / 1e9 for k, s in seconds.items()}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "geometry": {"E": spec.num_experts, "H": spec.moe_hidden, "n": spec.intermediate},
        "file_bytes": nbytes,
        "threads": threads,
        "default_threads": READ_THREADS,
        "default_host_path": HOST_PATH,
        "cpu_count": os.cpu_count(),
        "footprint_bytes": footprint,
        "prep_seconds": prep,
        "seconds": seconds,
        "gb_per_s": rates,
        "limits_seconds": pieces,
        "limits_gb_per_s": {k: nbytes / v / 1e9 for k, v in pieces.items()},
        "read_paths": paths,
        "checks": checks,
        "peak_over_footprint": {
            "moepack": peak_ratio(lambda: moepack_load(False, big), footprint, device),
            "moepack_registered": peak_ratio(
                lambda: moepack_load(False, big, "registered"), footprint, device
            ),
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
    threads = r["threads"]
    big = max(threads)
    lines = [
        f"Device: {r['device']}; layer file {r['file_bytes'] / 1e9:.2f} GB "
        f"(E={r['geometry']['E']}, H={r['geometry']['H']}, n={r['geometry']['n']}); "
        f"{r['cpu_count']} CPUs, default reader threads {r['default_threads']}, default host "
        f"path {r['default_host_path']}",
        "",
        "| path | threads | warm s | warm GB/s | cold s | cold GB/s | peak / footprint |",
        "|---|---|---|---|---|---|---|",
    ]
    peaks = r["peak_over_footprint"]
    rows = []
    for n in threads:
        rows.append(
            (f"moepack_t{n}", "moepack load, staged", str(n), "moepack" if n == big else "")
        )
        rows.append((f"moepack_direct_t{n}", "moepack load, O_DIRECT", str(n), ""))
    if f"moepack_registered_t{big}_warm" in s:
        rows.append(
            (
                f"moepack_registered_t{big}",
                "moepack load, registered",
                str(big),
                "moepack_registered",
            )
        )
        rows.append(
            (f"moepack_ring2x_t{big}", f"moepack load, staged, {2 * big + 4} buffers", str(big), "")
        )
        for c in (8, 128):
            rows.append(
                (f"moepack_chunk{c}_t{big}", f"moepack load, staged, {c} MiB chunks", str(big), "")
            )
    rows += [
        ("moepack_default", "moepack load, defaults", str(r["default_threads"]), ""),
        ("safetensors", "safetensors load_file", "1", "safetensors"),
        ("raw_checkpoint", "raw checkpoint + convert", "1", "raw_checkpoint"),
        ("disk_read", "disk read, 64 MiB readinto (limit)", "1", ""),
    ]
    for key, label, n, peak_key in rows:
        peak = peaks.get(peak_key)
        lines.append(
            f"| {label} | {n} | {s[key + '_warm']:.3f} | {g[key + '_warm']:.2f} "
            f"| {s[key + '_cold']:.3f} | {g[key + '_cold']:.2f} "
            f"| {'-' if peak is None else f'{peak:.2f}x'} |"
        )
    if "pinned_h2d" in g:
        lines.append(
            f"| pinned H2D copy (limit) | | {s['pinned_h2d']:.3f} | {g['pinned_h2d']:.2f} | | | |"
        )
    if r["limits_gb_per_s"]:
        lines += ["", "| piece of a warm load, alone | s | GB/s |", "|---|---|---|"]
        for k, v in r["limits_seconds"].items():
            lines.append(f"| {k} | {v:.3f} | {r['limits_gb_per_s'][k]:.2f} |")
    lines += ["", f"read paths: {r['read_paths']}; checks: {r['checks']}"]
    warm_keys = [k[: -len("_warm")] for k in s if k.startswith("moepack") and k.endswith("_warm")]
    warm_best = max(warm_keys, key=lambda k: g[k + "_warm"])
    warm = g[warm_best + "_warm"]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    if "pinned_h2d" in g:
        lines.append(
            f"| warm load (best: {warm_best}) / pinned H2D | {warm / g['pinned_h2d']:.2f} | >= 0.8 |"
        )
        lines.append(
            f"| warm load (defaults) / pinned H2D | "
            f"{g['moepack_default_warm'] / g['pinned_h2d']:.2f} | >= 0.8 |"
        )
    lines.append(
        f"| cold load (defaults) / disk read cold "
        f"| {g['moepack_default_cold'] / g['disk_read_cold']:.2f} | >= 0.9 |"
    )
    lines.append(
        f"| warm load (defaults) / raw checkpoint warm "
        f"| {g['moepack_default_warm'] / g['raw_checkpoint_warm']:.2f} | |"
    )
    lines.append(
        f"| cold load (defaults) / raw checkpoint cold "
        f"| {g['moepack_default_cold'] / g['raw_checkpoint_cold']:.2f} | |"
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
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[READ_THREADS],
        help=f"reader thread counts to time moepack load with (default: {READ_THREADS})",
    )
    ap.add_argument("--repeats", type=int, default=3, help="warm runs per figure (best kept)")
    args = ap.parse_args()
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = measure(device, Path(tmp), smoke, args.source, args.threads, args.repeats)
    print(table(result))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
