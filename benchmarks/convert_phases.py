"""Where one layer's conversion time goes, warm, phase by phase (each timed alone, in order).

    python benchmarks/convert_phases.py CHECKPOINT SCRATCH_DIR [--out phases.json]

Phases: source sha256 (all files, as `moepack convert` hashes them), each projection's scales
gathered into their padded buffer (the payload is only located: it streams into the file as it
is written), the rest of `convert_layer` (swizzle, bake, scalars), the payloads streamed alone,
the sampled fidelity measurement, the layer file's write with its sha256 taken as it is written,
the same write without hashing (+ fsync), and the sha256 of the written file read back.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastckpt
import torch

from moepack.convert import pipeline, source, transform
from moepack.convert.checkpoint import Checkpoint
from moepack.convert.moe_layers import find_moe_layers
from moepack.convert.writer import Blob, write_safetensors
from moepack.runtime.verify import sha256_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("scratch", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def phase(name: str, fn):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - t0
        return result

    root = args.checkpoint
    if not (root / "config.json").exists():
        fastckpt.super_checkpoint(root, 1)
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    ck = Checkpoint(root)
    for p in sorted(root.glob("*.safetensors")):  # warm: everything in the page cache
        sha256_file(p)
    phase("source sha256 (all files, parallel)", lambda: source._hash_files(root, names))
    moe = find_moe_layers(ck.weight_map, ck.quant, ck.config)[0]
    geo = transform.geometry_of(ck, moe)
    e, h, n, n_p = geo.num_experts, geo.hidden, geo.intermediate, geo.intermediate_padded
    cpu = torch.device("cpu")
    phase(
        "fc1 (up): scales gathered, payload located",
        lambda: transform._load_proj(ck, moe, ("up",), (e, n, n_p, h, h), cpu),
    )
    phase(
        "fc2 (down): scales gathered, payload located",
        lambda: transform._load_proj(ck, moe, ("down",), (e, h, h, n, n_p), cpu),
    )
    result = phase(
        "convert_layer (scale gathers + swizzle + bake; payload not read)",
        lambda: transform.convert_layer(ck, moe, geo, "baked"),
    )

    def stream_payloads() -> None:
        for _name, t in result.tensors:
            if isinstance(t, Blob):
                for _ in t.chunks():
                    pass

    phase("payloads streamed from the shards alone (w13 + w2, no write)", stream_payloads)
    phase("fidelity (sampled)", result.measure)
    phase(
        "fidelity (exact)",
        transform.convert_layer(ck, moe, geo, "baked", exact_fidelity=True).measure,
    )
    out = args.scratch
    phase(
        "write + sha256 as written + fsync",
        lambda: write_safetensors(out, "a.safetensors", list(result.tensors), {}),
    )
    phase(
        "write + fsync, no hash",
        lambda: write_safetensors(out, "b.safetensors", list(result.tensors), {}, digest=False),
    )
    phase("sha256 of the written file, read back", lambda: sha256_file(out / "b.safetensors"))

    def pipeline_write() -> None:
        """What convert does with a layer file: write, hash following the write, fsync beside."""
        with ThreadPoolExecutor(pipeline.HASH_WORKERS) as pool:
            _, hashing, syncing = pipeline._write_layer(
                out, "d.safetensors", list(result.tensors), {}, pool
            )
            hashing.result()
            syncing.result()

    phase("write + sha256 following it + fsync beside (convert's path)", pipeline_write)

    def alongside(name: str, other) -> None:  # noqa: ANN001
        """convert_layer while `other` runs in a thread: what the pipeline overlaps."""
        t = threading.Thread(target=other)
        t.start()
        phase(
            f"convert_layer + measure, while {name}",
            lambda: transform.convert_layer(ck, moe, geo, "baked").measure(),
        )
        t.join()

    alongside(
        "another layer file is written",
        lambda: write_safetensors(out, "c.safetensors", list(result.tensors), {}, digest=False),
    )
    alongside("a written file is hashed back", lambda: sha256_file(out / "b.safetensors"))
    for f in ("a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"):
        (out / f).unlink()
    width = max(map(len, times))
    print("| phase (one layer, warm) | s |\n|---|---:|")
    for k, v in times.items():
        print(f"| {k:<{width}} | {v:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(times, indent=2) + "\n")


if __name__ == "__main__":
    main()
