"""Hub source: conversion overlapping the download, against the download alone.

Serves a multi-shard real-geometry checkpoint (`fastckpt`, 4 shards a layer) from the loopback
fake hub (`tests/fake_hub.py`) with a bandwidth cap on all file bodies together, and times, in
one run, each in a fresh child process with an empty HF cache:

- download alone: every file of the job fetched and sha256-verified (`HubRepo.fetch`), nothing
  converted;
- convert from the hub: `convert_checkpoint` from the repo id (the download overlapped);
- convert the same files from local disk (no download): with the download alone, the time the
  behaviour before the overlap took (download everything, then convert), as their sum.

    python benchmarks/hub_overlap.py --workdir DIR [--layers 4] [--experts 512] [--rate 200]

Prints a markdown table; `--out` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastckpt
from convert import machine

from moepack.convert import synthetic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_hub import FakeHub  # noqa: E402

REPO = "bench/super"
CHILD = """
import json, logging, sys, time
from moepack.convert import hub as _  # huggingface_hub imported before the clock starts
from moepack.convert.pipeline import convert_checkpoint  # torch too
from moepack.convert.source import open_source
what, src, out, endpoint, cache = sys.argv[1:6]
t0 = time.perf_counter()
layers, downloaded = [], None

class Layers(logging.Handler):
    def emit(self, record):
        global downloaded
        if record.getMessage().startswith("layer "):
            layers.append(round(time.perf_counter() - t0, 3))
        elif record.getMessage().startswith("download finished"):
            downloaded = round(time.perf_counter() - t0, 3)

logging.getLogger("moepack.convert").addHandler(Layers())
logging.getLogger("moepack.convert").setLevel(logging.INFO)
hub = {"endpoint": endpoint, "cache_dir": cache, "token": False}
if what == "download":
    src = open_source(src, **hub)
    src.repo.fetch(src.files(moe_only=False))
else:
    convert_checkpoint(src, out, **(hub if what == "hub" else {}))
print(json.dumps({"seconds": time.perf_counter() - t0, "layers_converted_at": layers,
                  "download_finished_at": downloaded}))
"""


def checkpoint(workdir: Path, layers: int, experts: int) -> Path:
    """Super geometry (H 1024, n 2688) with `experts` experts a layer, made once, then reused
    (with all 512 experts, the same checkpoint as `convert.py`'s in the same workdir)."""
    if experts == synthetic.super_layer_spec().num_experts:
        return fastckpt.super_checkpoint(workdir / f"super-{layers}layer-fast", layers)
    root = workdir / f"hub-{layers}x{experts}"
    base = synthetic.super_layer_spec()
    spec = synthetic.SyntheticSpec(
        **{**base.__dict__, "pattern": "E" * layers, "shards": 4 * layers, "num_experts": experts}
    )
    if not (root / "config.json").exists():
        fastckpt.write_fast_checkpoint(root, spec)
    return root


def child(what: str, src: str, out: Path, endpoint: str, cache: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, what, src, str(out), endpoint, str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(workdir: Path, layers: int, experts: int, rate_mb: float) -> dict[str, Any]:
    src = checkpoint(workdir, layers, experts)
    source_bytes = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    out, cache = workdir / "hub-artifact", workdir / "hub-cache"
    with FakeHub(rate=rate_mb * 1e6) as hub:
        hub.add_repo(REPO, src)
        t0 = time.perf_counter()
        download = child("download", REPO, out, hub.endpoint, cache)
        overlapped = child("hub", REPO, out, hub.endpoint, cache)
        local = child("local", str(src), out, hub.endpoint, cache)
        wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "layers": layers,
        "experts": experts,
        "shards": 4 * layers,
        "rate_mb_s": rate_mb,
        "source_bytes": source_bytes,
        "download_s": download["seconds"],
        "hub_convert_s": overlapped["seconds"],
        "hub_layers_converted_at": overlapped["layers_converted_at"],
        "hub_download_finished_at": overlapped["download_finished_at"],
        "local_convert_s": local["seconds"],
        "sequential_s": download["seconds"] + local["seconds"],
        "ratio": overlapped["seconds"] / download["seconds"],
        "wall_s": wall,
    }


def table(r: dict[str, Any]) -> str:
    gb, dl = r["source_bytes"] / 1e9, r["download_s"]
    first, last = r["hub_layers_converted_at"][0], r["hub_layers_converted_at"][-1]
    lines = [
        f"Machine: {r['machine']}; {r['date']}; {r['layers']} MoE layer(s) of E={r['experts']}, "
        f"H=1024, n=2688 in {r['shards']} shards ({gb:.2f} GB); loopback fake hub capped at "
        f"{r['rate_mb_s']:.0f} MB/s",
        "",
        "| run | seconds | / download alone |",
        "|---|---:|---:|",
        f"| download alone (fetch + sha256 verify every file, no conversion) | {dl:.1f} | 1.00x |",
        f"| convert from the hub (download overlapped) | {r['hub_convert_s']:.1f} | "
        f"{r['ratio']:.2f}x |",
        f"| download, then convert (before: download alone + local convert {r['local_convert_s']:.1f} s) "
        f"| {r['sequential_s']:.1f} | {r['sequential_s'] / dl:.2f}x |",
        "",
        f"Convert from the hub: first layer converted at {first:.1f} s, last at {last:.1f} s; "
        f"its download finished at {r['hub_download_finished_at']:.1f} s (the download alone "
        f"took {dl:.1f} s), {r['hub_convert_s'] - r['hub_download_finished_at']:.1f} s before "
        "the end. Target: convert from the hub <= 1.1x the download alone.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch (~4x the checkpoint)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=512, help="experts a layer (512: real)")
    ap.add_argument("--rate", type=float, default=200, help="bandwidth cap, MB/s")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.layers, args.experts, args.rate)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
