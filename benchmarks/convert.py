"""Convert throughput and peak RSS on real-geometry Nemotron 3 Super layers vs the I/O floor.

The floor is what any converter must do on the same machine: read the source shards and write
the artifact's bytes (fsynced), sequentially, as `moepack convert` does. Both run cold
(source pages dropped with posix_fadvise DONTNEED) and warm (source in page cache), into a new
directory as the floor writes a new file, and warm once more over the artifact just written.
The conversion runs in a child process so its peak RSS (VmHWM) is its own.

    python benchmarks/convert.py --workdir /path/with/space [--layers 1] [--device cpu]

Prints a markdown table; `--out` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastckpt
from cache import drop_cache

CHUNK = 16 << 20
CHILD = """
import json, logging, os, sys, threading, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)6.0f ms %(message)s")
from moepack.convert.pipeline import convert_checkpoint
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
base, top, stop = rss(), [0, 0.0], threading.Event()
def sample():  # when the peak happened, for the log beside it
    while not stop.wait(0.01):
        r = rss()
        if r > top[0]:
            top[:] = [r, time.perf_counter() - t0]
t0, cpu0 = time.perf_counter(), os.times()
threading.Thread(target=sample, daemon=True).start()
s = convert_checkpoint(sys.argv[1], sys.argv[2], moe_only=True, overwrite=True,
                       b12x_scales=sys.argv[3], device=sys.argv[4])
took, cpu1 = time.perf_counter() - t0, os.times()
stop.set()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else 0
print(f"peak RSS {top[0] / 1e9:.2f} GB at {top[1]:.2f} s (start {base / 1e9:.2f} GB)", file=sys.stderr)
print(json.dumps({"seconds": took, "bytes": s["bytes"], "peak_rss": peak, "start_rss": base,
                  "peak_at_s": top[1], "cpu_s": cpu1.user + cpu1.system - cpu0.user - cpu0.system}))
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
    os.sync()  # the freed blocks' discards (ext4 -o discard) land now, not in the next timing
    return took


def convert_once(
    src: Path, out: Path, mode: str, device: str, cold: bool, fresh: bool, log: Path | None
) -> dict[str, Any]:
    """One conversion in a child process. `fresh` removes an earlier artifact at `out` first
    (outside the timing: the floor writes a new file too); otherwise the child replaces it."""
    if fresh and out.exists():
        shutil.rmtree(out)
        os.sync()
    if cold:
        drop_cache(sorted(src.glob("*.safetensors")))
    with open(log, "w") if log else open(os.devnull, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(src), str(out), mode, device],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen
    if proc.returncode:
        raise SystemExit(f"conversion failed with exit code {proc.returncode} (log: {log})")
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


def run(
    workdir: Path, layers: int, mode: str, device: str, logdir: Path | None = None
) -> dict[str, Any]:
    src = checkpoint(workdir, layers)
    shards = sorted(src.glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in shards)
    out = workdir / "artifact"
    rows = []
    # cold and warm into a new directory, as the floor writes a new file; then warm once more
    # over the artifact just written (a rerun with --overwrite: replacing files costs extra).
    for cache, cold, fresh in (
        ("cold", True, True),
        ("warm", False, True),
        ("warm, over the previous artifact", False, False),
    ):
        log = (
            None
            if logdir is None
            else logdir / f"convert-{cache.split(',')[0]}{'' if fresh else '-over'}.log"
        )
        conv = convert_once(src, out, mode, device, cold, fresh, log)
        layer_bytes = max(p.stat().st_size for p in (out / "moe").glob("*.safetensors"))
        floor = io_floor(shards, conv["bytes"], workdir / "floor.bin", cold)
        rows.append(
            {
                "cache": cache,
                "floor_s": floor,
                "convert_s": conv["seconds"],
                "ratio": floor / conv["seconds"],
                "peak_rss": conv["peak_rss"],
                "start_rss": conv.get("start_rss", 0),
                "peak_at_s": conv.get("peak_at_s", 0.0),
                "cpu_s": conv["cpu_s"],
                "layer_bytes": layer_bytes,
            }
        )
    return {
        "machine": machine(),
        "cores": os.cpu_count() or 1,
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
        "| cache | I/O floor s | floor GB/s | convert s | convert GB/s | convert / floor "
        "| peak RSS GB (at s) | RSS / layer file | CPU s (busy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        rss = row["peak_rss"]
        lines.append(
            f"| {row['cache']} | {row['floor_s']:.2f} | {gb / row['floor_s']:.2f} | "
            f"{row['convert_s']:.2f} | {gb / row['convert_s']:.2f} | {row['ratio']:.2f}x | "
            + f"{rss / 1e9:.2f} ({row['peak_at_s']:.1f}) | {rss / row['layer_bytes']:.2f}x | "
            + f"{row['cpu_s']:.1f} ({row['cpu_s'] / (r['cores'] * row['convert_s']):.0%}) |"
        )
    lines.append("")
    lines.append(
        "Targets: convert / floor >= 0.8x; peak RSS <= 2x one layer file. CPU s: the "
        "conversion's user + system time; busy: that over all cores for its wall time."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch space (~3 GB a layer)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--b12x-scales", dest="mode", choices=("baked", "shared"), default="baked")
    ap.add_argument("--device", default="cpu", help="where convert runs its arithmetic")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--logdir", type=Path, help="keep each conversion's log here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.logdir:
        args.logdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.layers, args.mode, args.device, args.logdir)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
