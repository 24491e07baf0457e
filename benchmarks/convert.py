"""Convert throughput and peak RSS on real-geometry Nemotron 3 Super layers vs the I/O floor.

The floor is what any converter must do on the same machine: read the source shards and write
the artifact's bytes (fsynced), sequentially, as `moepack convert` does. Both run cold
(source pages dropped with posix_fadvise DONTNEED) and warm (source in page cache). The
conversion runs in a child process so its peak RSS (ru_maxrss) is its own.

    python benchmarks/convert.py --workdir /path/with/space [--layers 1] [--device cpu]

Prints a markdown table; `--out` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastckpt
from cache import drop_cache

CHUNK = 16 << 20
CHILD = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)6.0f ms %(message)s")
from moepack.convert.pipeline import convert_checkpoint
t0 = time.perf_counter()
s = convert_checkpoint(sys.argv[1], sys.argv[2], moe_only=True, overwrite=True,
                       b12x_scales=sys.argv[3], device=sys.argv[4])
took = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else 0
print(json.dumps({"seconds": took, "bytes": s["bytes"], "peak_rss": peak}))
"""


def checkpoint(workdir: Path, layers: int) -> Path:
    """A real-geometry Super checkpoint with `layers` MoE layers (generated once, then reused;
    random expert bytes, see fastckpt.py: conversion costs the same on any valid bytes)."""
    root = workdir / f"super-{layers}layer-fast"
    t0 = time.perf_counter()
    fastckpt.super_checkpoint(root, layers)
    print(f"checkpoint {root} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root


def io_floor(shards: list[Path], out_bytes: int, scratch: Path, cold: bool) -> float:
    """Seconds to read every shard and write `out_bytes` (fsynced), one after the other."""
    if cold:
        drop_cache(shards)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in shards:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    with open(scratch, "wb", buffering=0) as f:
        left = out_bytes
        while left:
            left -= f.write(view[: min(left, CHUNK)])
        os.fsync(f.fileno())
    took = time.perf_counter() - t0
    scratch.unlink()
    return took


def convert_once(src: Path, out: Path, mode: str, device: str, cold: bool) -> dict[str, Any]:
    if cold:
        drop_cache(sorted(src.glob("*.safetensors")))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(out), mode, device],
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's max
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen
    if proc.returncode:
        raise SystemExit(f"conversion failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    # VmHWM of the child's own address space: ru_maxrss would also count the parent's resident
    # memory at fork/exec time (Linux carries the old mm's high-water mark across exec).
    if not result.get("peak_rss"):
        result["peak_rss"] = usage.ru_maxrss * 1024
    return result


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"


def run(workdir: Path, layers: int, mode: str, device: str) -> dict[str, Any]:
    src = checkpoint(workdir, layers)
    shards = sorted(src.glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in shards)
    out = workdir / "artifact"
    rows = []
    for cold in (True, False):
        conv = convert_once(src, out, mode, device, cold)
        layer_bytes = max(p.stat().st_size for p in (out / "moe").glob("*.safetensors"))
        floor = io_floor(shards, conv["bytes"], workdir / "floor.bin", cold)
        rows.append(
            {
                "cache": "cold" if cold else "warm",
                "floor_s": floor,
                "convert_s": conv["seconds"],
                "ratio": floor / conv["seconds"],
                "peak_rss": conv["peak_rss"],
                "layer_bytes": layer_bytes,
            }
        )
    return {
        "machine": machine(),
        "device": device,
        "mode": mode,
        "layers": layers,
        "source_bytes": in_bytes,
        "artifact_bytes": conv["bytes"],
        "rows": rows,
    }


def table(r: dict[str, Any]) -> str:
    gb = r["source_bytes"] / 1e9
    lines = [
        f"Machine: {r['machine']}; conversion arithmetic on {r['device']}; b12x scales {r['mode']}; "
        f"{r['layers']} layer(s) of E=512, H=1024, n=2688 ({gb:.2f} GB in, "
        f"{r['artifact_bytes'] / 1e9:.2f} GB out)",
        "",
        "| cache | I/O floor s | floor GB/s | convert s | convert GB/s | convert / floor | peak RSS GB | RSS / layer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        rss = row["peak_rss"]
        lines.append(
            f"| {row['cache']} | {row['floor_s']:.2f} | {gb / row['floor_s']:.2f} | "
            f"{row['convert_s']:.2f} | {gb / row['convert_s']:.2f} | {row['ratio']:.2f}x | "
            + f"{rss / 1e9:.2f} | {rss / row['layer_bytes']:.2f}x |"
        )
    lines.append("")
    lines.append("Targets: convert / floor >= 0.8x; peak RSS <= 2x one layer file.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch space (~3 GB a layer)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--b12x-scales", dest="mode", choices=("baked", "shared"), default="baked")
    ap.add_argument("--device", default="cpu", help="where convert runs its arithmetic")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.layers, args.mode, args.device)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
