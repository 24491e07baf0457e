"""Warm `moepack load` over reader threads x chunk sizes, repeated and interleaved, against the
host copy it cannot beat.

`benchmarks/load.py` keeps the best of 3 per row, and the same row moved by up to 25% between
runs; a default is only worth changing on a difference larger than that spread. Here every
configuration runs `--repeats` times in interleaved order (so drift hits them all alike) and
the table gives the median and the best. The ceilings beside it, each alone on the same cached
file: `preadv` from the page cache into a ring of pinned buffers on N threads (what a staged
load must do on the host), and one pinned host-to-device copy.

    python benchmarks/load_sweep.py --workdir DIR [--threads 16 24 32] [--chunks 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastckpt
import torch

from moepack.convert.pipeline import convert_checkpoint
from moepack.runtime import load
from moepack.runtime.loader import CHUNK_BYTES, READ_THREADS


def artifact(work: Path) -> Path:
    src = fastckpt.super_checkpoint(work / "super-1layer-fast", 1)
    art = work / "sweep-art"
    if not (art / "manifest.json").exists():
        convert_checkpoint(src, art, moe_only=True, overwrite=True)
    return art


def pinned_ring_read(path: Path, threads: int, chunk: int) -> float:
    """Seconds for `threads` threads to `preadv` the cached file into a ring of pinned buffers."""
    size = path.stat().st_size
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads + 2)]
    views = [memoryview(b.numpy().data).cast("B") for b in ring]
    starts = list(range(0, size, chunk))
    fd = os.open(path, os.O_RDONLY)
    try:

        def read(i: int) -> None:
            os.preadv(fd, [views[i % len(views)][: min(chunk, size - starts[i])]], starts[i])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(len(starts))))
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                list(pool.map(read, range(len(starts))))
                best = min(best, time.perf_counter() - t0)
    finally:
        os.close(fd)
    return best


def ring_read_beside_h2d(path: Path, threads: int, chunk: int) -> tuple[float, float]:
    """GB/s of the host ring read and of a pinned host-to-device copy when both run at once on
    separate buffers (the two halves of a staged load, without the hand-off between them): if
    each falls well below its rate alone, they share a limit (host memory bandwidth)."""
    size = path.stat().st_size
    dev = torch.device("cuda")
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device=dev)
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads + 2)]
    views = [memoryview(b.numpy().data).cast("B") for b in ring]
    starts = list(range(0, size, chunk))
    fd = os.open(path, os.O_RDONLY)
    stream = torch.cuda.Stream(dev)
    try:

        def read(i: int) -> None:
            os.preadv(fd, [views[i % len(views)][: min(chunk, size - starts[i])]], starts[i])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(len(starts))))
            torch.cuda.synchronize(dev)
            first = torch.cuda.Event(enable_timing=True)
            last = torch.cuda.Event(enable_timing=True)
            copies = 8
            with torch.cuda.stream(stream):
                first.record(stream)
                for _ in range(copies):
                    dst.copy_(host, non_blocking=True)
                last.record(stream)
            t0 = time.perf_counter()
            passes = 0
            while not last.query() and passes < 50:
                list(pool.map(read, range(len(starts))))
                passes += 1
            host_s = time.perf_counter() - t0
            torch.cuda.synchronize(dev)
            h2d = copies * size / (first.elapsed_time(last) / 1e3) / 1e9
    finally:
        os.close(fd)
    return (passes * size / host_s / 1e9 if passes else float("nan")), h2d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[16, 24, 32])
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32], help="MiB")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    art = artifact(args.workdir)
    layer = next((art / "moe").glob("layer-*.safetensors"))
    nbytes = layer.stat().st_size
    configs: list[tuple[str, int | None, int]] = [
        ("staged", t, c << 20) for t in args.threads for c in args.chunks
    ]
    configs.append(("staged", None, CHUNK_BYTES))  # the defaults, as `load(root)` runs
    configs += [("registered", 16, c << 20) for c in (32, 128, 512)]

    def once(path: str, threads: int | None, chunk: int) -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        a = load(
            art,
            device=dev,
            backend="reference",
            read_threads=threads,
            chunk_bytes=chunk,
            host_path=path,
        )
        torch.cuda.synchronize(dev)
        took = time.perf_counter() - t0
        del a
        return took

    for cfg in configs:  # page cache, pinned-buffer cache, CUDA context
        once(*cfg)
    times: dict[tuple[str, int | None, int], list[float]] = {}
    for _ in range(args.repeats):
        for cfg in configs:
            times.setdefault(cfg, []).append(once(*cfg))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h2d = []
    for _ in range(5):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        d.copy_(host, non_blocking=True)
        torch.cuda.synchronize(dev)
        h2d.append(time.perf_counter() - t0)
    del host, d
    pinned = nbytes / min(h2d) / 1e9
    ring = {
        (t, c << 20): nbytes / pinned_ring_read(layer, t, c << 20) / 1e9
        for t in args.threads
        for c in args.chunks
    }
    print(
        f"Device {torch.cuda.get_device_name(dev)}; {os.cpu_count()} CPUs; layer file "
        f"{nbytes / 1e9:.2f} GB, warm; {args.repeats} interleaved runs each; default threads "
        f"{READ_THREADS}, chunk {CHUNK_BYTES >> 20} MiB; pinned H2D {pinned:.2f} GB/s\n"
    )
    print(
        "| host path | threads | chunk MiB | median GB/s | best GB/s | median / pinned H2D | "
        "host ring read alone GB/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for (path, t, c), ts in times.items():
        med, best = nbytes / statistics.median(ts) / 1e9, nbytes / min(ts) / 1e9
        alone = ring.get((t or READ_THREADS, c), float("nan")) if path == "staged" else None
        rows.append(
            {
                "host_path": path,
                "threads": t,
                "chunk_mib": c >> 20,
                "median": med,
                "best": best,
                "ring_read": alone,
                "seconds": ts,
            }
        )
        print(
            f"| {path} | {t or f'default ({READ_THREADS})'} | {c >> 20} | {med:.2f} | "
            f"{best:.2f} | {med / pinned:.2f} | {'-' if alone is None else f'{alone:.2f}'} |"
        )
    both_host, both_h2d = ring_read_beside_h2d(layer, READ_THREADS, CHUNK_BYTES)
    alone = ring.get((READ_THREADS, CHUNK_BYTES), float("nan"))
    print(
        f"\nAt once on separate buffers ({READ_THREADS} threads, {CHUNK_BYTES >> 20} MiB): host "
        f"ring read {both_host:.2f} GB/s (alone {alone:.2f}), pinned H2D {both_h2d:.2f} GB/s "
        f"(alone {pinned:.2f})"
    )
    if args.out:
        out = {"pinned_h2d": pinned, "rows": rows, "at_once": [both_host, both_h2d]}
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
