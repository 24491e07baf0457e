"""Benchmark `moepack verify` against `sha256sum` over the same files, warm and cold.

The artifact is synthetic but has the real structure: aligned layer files with every tensor of
FORMAT.md section 2 at Nemotron 3 Super's per-expert geometry (H=1024, n=2688, fewer experts so
the default size stays small), random payload bytes, and a manifest that `verify` accepts.
"Cold" drops each file from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` before the
run (nothing machine-wide), so reads come from the disk.

    python benchmarks/verify.py [--gb 2] [--dir DIR] [--jobs N] [--keep]

Prints a markdown table: GB/s per tool and the ratio to the target
`min(disk, cores x single-core sha256)`, the bound a hash-bound verifier cannot beat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from cache import drop_cache

from moepack.convert.writer import Blob, write_json, write_safetensors
from moepack.format import FORMAT_VERSION, Geometry, layer_file
from moepack.format.flashinfer import copy_free_releases
from moepack.runtime import verify as verify_mod
from moepack.runtime.layout import padded_intermediate
from moepack.runtime.verify import sha256_file, verify_artifact

EXPERTS, HIDDEN, INTERMEDIATE = 64, 1024, 2688
RANDOM = 64 << 20


def _random_blob(pool: memoryview, dtype: str, shape: tuple[int, ...]) -> Blob:
    """A tensor whose bytes cycle through a shared random pool (hashing cost is content-blind)."""
    nbytes = 4 if dtype == "F32" else 1
    for d in shape:
        nbytes *= d

    def chunks() -> Iterable[memoryview]:
        left = nbytes
        while left:
            n = min(left, len(pool))
            yield pool[:n]
            left -= n

    return Blob(dtype, shape, nbytes, chunks)


def build(root: Path, gigabytes: float, experts: int = EXPERTS) -> list[Path]:
    """Write enough baked layer files for `gigabytes` of artifact, and their manifest (format
    v2: each file's sha256 chain is recorded as it is written)."""
    geo = Geometry(experts, HIDDEN, INTERMEDIATE, padded_intermediate(INTERMEDIATE), False)
    specs = geo.tensor_specs("baked")
    pool = memoryview(torch.randint(0, 256, (RANDOM,), dtype=torch.uint8).numpy()).cast("B")
    per_layer = sum(_random_blob(pool, d, s).nbytes for d, s in specs.values())
    layers = list(range(max(1, round(gigabytes * 1e9 / per_layer))))
    files = []
    for layer in layers:
        blobs = [(name, _random_blob(pool, d, s)) for name, (d, s) in specs.items()]
        meta = {"format": "moepack", "format_version": str(FORMAT_VERSION), "layer": str(layer)}
        files.append(write_safetensors(root, layer_file(layer), blobs, meta).record("moe_layer"))
    write_json(root, "manifest.json", _manifest(geo, layers, files))
    return [root / f["path"] for f in files]


def _manifest(geo: Geometry, layers: list[int], files: list[dict]) -> dict:
    return {
        "format": "moepack",
        "format_version": FORMAT_VERSION,
        "tool": {"name": "moepack", "version": "benchmark"},
        "source": {"type": "local", "path": "synthetic", "files": []},
        "target": "sm120",
        "model": {
            "activation": "relu2",
            "gated": False,
            "moe_hidden_size": geo.hidden,
            "intermediate_size": geo.intermediate,
            "intermediate_size_padded": geo.intermediate_padded,
            "num_experts": geo.num_experts,
            "top_k": 22,
            "moe_layers": layers,
        },
        "b12x_scale_mode": "baked",
        "kernel_abi": {
            "flashinfer": ">=0.7.2,<0.8",
            "pad_tile": 256,
            "flashinfer_copy_free": list(copy_free_releases(geo.intermediate_padded)),
            "sf_block": 16,
            "sf_layout": "cutlass_128x4",
            "w13_order": ["up"],
            "alignment": 4096,
            "prefill_min_tokens": 64,
        },
        "layers": [
            {
                "layer": i,
                "source_prefix": f"backbone.layers.{i}.mixer",
                "file": layer_file(i),
                "fidelity": {"b12x_max_rel_err": 0.0, "b12x_mean_rel_err": 0.0},
            }
            for i in layers
        ],
        "files": files,
        "complete": True,
    }


def read_all(files: list[Path], jobs: int) -> None:
    """Plain parallel reads, no hashing: what the disk (or page cache) delivers."""

    def read(path: Path) -> None:
        buf = bytearray(16 << 20)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(read, files))


def sha256sum(files: list[Path], jobs: int) -> None:
    """Coreutils sha256sum, one process per file, `jobs` at a time (xargs -P)."""
    args = ["xargs", "-0", "-n", "1", "-P", str(jobs), "sha256sum"]
    data = b"\0".join(str(f).encode() for f in files)
    subprocess.run(args, input=data, check=True, stdout=subprocess.DEVNULL)


def moepack_verify(root: Path, jobs: int, chains: bool = True) -> None:
    """`chains=False` ignores the files' sha256 chains (whole-file sha256 per file, as v1)."""
    saved = verify_mod.sha256chain.available
    if not chains:
        verify_mod.sha256chain.available = lambda: False  # type: ignore[method-assign]
    try:
        report = verify_artifact(root, jobs=jobs)
    finally:
        verify_mod.sha256chain.available = saved  # type: ignore[method-assign]
    if report.exit_code:
        sys.exit(f"verify failed on the benchmark artifact:\n{report.format_text()}")


def timed(fn: Callable[[], None], files: list[Path], cold: bool, repeat: int) -> float:
    """Best wall time of `repeat` runs (warm runs after one untimed warm-up)."""
    best = float("inf")
    if not cold:
        fn()
    for _ in range(repeat):
        if cold:
            drop_cache(files)
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def single_core_sha256(files: list[Path], repeat: int) -> float:
    """Bytes/s of the faster of coreutils and OpenSSL (hashlib) sha256 on one core, warm.

    coreutils may lack the SHA extensions OpenSSL uses; the target must use the faster one.
    """
    one = [max(files, key=lambda f: f.stat().st_size)]
    size = one[0].stat().st_size
    coreutils = size / timed(lambda: sha256sum(one, 1), one, False, repeat)
    openssl = size / timed(lambda: sha256_file(one[0]), one, False, repeat)
    return max(coreutils, openssl)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run(root: Path, files: list[Path], jobs: int, repeat: int) -> str:
    total = sum(f.stat().st_size for f in files)
    core = single_core_sha256(files, repeat)
    gbps: dict[tuple[str, str], float] = {}
    bound: dict[str, float] = {}
    for temp in ("warm", "cold"):
        cold = temp == "cold"
        disk = total / timed(lambda: read_all(files, jobs), files, cold, repeat)
        bound[temp] = min(disk, jobs * core) if cold else jobs * core
        gbps[temp, "read only (no hash)"] = disk
        gbps[temp, "sha256sum, 1 process"] = total / timed(
            lambda: sha256sum(files, 1), files, cold, repeat
        )
        gbps[temp, f"sha256sum, {jobs} processes (xargs -P)"] = total / timed(
            lambda: sha256sum(files, jobs), files, cold, repeat
        )
        gbps[temp, "moepack verify --jobs 1"] = total / timed(
            lambda: moepack_verify(root, 1), files, cold, repeat
        )
        gbps[temp, f"moepack verify --jobs {jobs}"] = total / timed(
            lambda: moepack_verify(root, jobs), files, cold, repeat
        )
        gbps[temp, f"moepack verify --jobs {jobs}, whole-file sha256 only (v1 path)"] = (
            total / timed(lambda: moepack_verify(root, jobs, chains=False), files, cold, repeat)
        )
    lines = [
        f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; single-core sha256 {core / 1e9:.2f} GB/s. "
        f"Artifact: {len(files)} layer files, {total / 1e9:.2f} GB. Cold = posix_fadvise(DONTNEED) "
        f"on each file before each run; best of {repeat}.",
        "",
        "| cache | tool | GB/s | vs target |",
        "|---|---|---:|---:|",
    ]
    for (temp, tool), rate in gbps.items():
        lines.append(f"| {temp} | {tool} | {rate / 1e9:.2f} | {rate / bound[temp]:.2f}x |")
    lines += [
        "",
        f"Target: warm {jobs} x {core / 1e9:.2f} = {bound['warm'] / 1e9:.2f} GB/s; "
        f"cold min(disk, {jobs} cores x sha256) = {bound['cold'] / 1e9:.2f} GB/s. "
        "Goal: moepack verify >= 0.9x.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="artifact size to generate")
    parser.add_argument("--dir", type=Path, help="where to build it (default: a temp dir)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated artifact")
    parser.add_argument(
        "--experts", type=int, default=EXPERTS, help="experts a layer file (2048: ~7.4 GB files)"
    )
    args = parser.parse_args()
    parent = args.dir or Path(tempfile.mkdtemp(prefix="moepack-bench-"))
    root = parent / "artifact"
    try:
        t = time.perf_counter()
        files = build(root, args.gb, args.experts)
        print(f"built {root} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        print(run(root, files, args.jobs, args.repeat))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            if args.dir is None:
                parent.rmdir()


if __name__ == "__main__":
    main()
