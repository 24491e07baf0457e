"""The machine's own ceilings for hashing and page-cache reads, measured, not assumed.

`benchmarks/verify.py` compares against `16 x single-core sha256`; that is only reachable if
16 vCPUs hash 16 times as fast as one. This prints the CPU topology (lscpu, SMT siblings, the
SHA extensions flag) and measures:

- sha256 over in-memory buffers on N threads (hashlib, which releases the GIL): the true hash
  ceiling of N threads, no I/O at all;
- sha256 of page-cached files on 16 threads, three ways of getting the bytes: `readinto` a
  16 MiB buffer (what `moepack verify` does), `readinto` a 1 MiB buffer (stays in L2), and a
  `MAP_POPULATE` mapping of each 64 MiB window (no copy), and the same in 8 MiB mappings (what
  `moepack.sha256chain.file_pieces` maps at a time);
- reading page-cached files on N threads with no hash (the copy out of the page cache alone).

    python benchmarks/machine_limits.py --workdir DIR [--out limits.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WINDOW = 64 << 20
FILE_BYTES = 256 << 20


def topology() -> dict[str, Any]:
    """lscpu's summary lines, each CPU's SMT siblings, and whether the SHA extensions are there."""
    out: dict[str, Any] = {}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lines = ""
    keep = (
        "Model name",
        "CPU(s)",
        "Thread(s) per core",
        "Core(s) per socket",
        "Socket(s)",
        "NUMA node(s)",
        "L2 cache",
        "L3 cache",
        "Hypervisor vendor",
        "CPU MHz",
        "BogoMIPS",
    )
    out["lscpu"] = [ln.strip() for ln in lines.splitlines() if ln.strip().startswith(keep)]
    siblings = set()
    for cpu in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*")):
        f = cpu / "topology" / "thread_siblings_list"
        if f.exists():
            siblings.add(f.read_text().strip())
    out["smt_sibling_sets"] = sorted(siblings)
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line
            break
    out["sha_ni"] = " sha_ni" in flags
    out["nproc"] = os.cpu_count()
    return out


def on_threads(n: int, work: Callable[[int], int]) -> float:
    """Run `work(i)` on `n` threads at once; returns bytes per second over the wall time."""
    start = threading.Barrier(n + 1)
    done: list[int] = [0] * n

    def run(i: int) -> None:
        start.wait()
        done[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def hash_ceiling(counts: list[int], per_thread: int = 1 << 30) -> dict[int, float]:
    """sha256 GB/s of N threads over in-memory 64 MiB buffers: N x 1 GiB of work handed out in
    64 MiB pieces from one queue (a thread that is slowed, or starts late, does less of it,
    as in `moepack verify`; the wall time is not the slowest thread's fixed share)."""
    bufs = [os.urandom(WINDOW) for _ in range(max(counts))]

    def rate(n: int) -> float:
        q: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(n * (per_thread // WINDOW)):
            q.put(i)

        def work(i: int) -> int:
            done = 0
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    return done
                hashlib.sha256(bufs[i]).digest()
                done += WINDOW

        return on_threads(n, work)

    rate(1)  # warm-up
    return {n: rate(n) / 1e9 for n in counts}


def make_files(root: Path, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(WINDOW)
    files = []
    for i in range(count):
        p = root / f"f{i:02d}.bin"
        if not p.exists() or p.stat().st_size != FILE_BYTES:
            with open(p, "wb") as f:
                for _ in range(FILE_BYTES // WINDOW):
                    f.write(block)
        files.append(p)
    for p in files:  # into the page cache
        with open(p, "rb", buffering=0) as f:
            while f.read(WINDOW):
                pass
    return files


def windows(files: list[Path]) -> queue.SimpleQueue[tuple[Path, int]]:
    q: queue.SimpleQueue[tuple[Path, int]] = queue.SimpleQueue()
    for p in files:
        for off in range(0, FILE_BYTES, WINDOW):
            q.put((p, off))
    return q


def cached_rate(files: list[Path], threads: int, how: str, hashed: bool) -> float:
    """GB/s over page-cached files: 64 MiB windows handed out to `threads` threads; each window
    read with `how` ('read16m', 'read1m', 'mmap') and hashed if `hashed`."""
    q = windows(files)

    def work(_: int) -> int:
        size = {"read16m": 16 << 20, "read1m": 1 << 20}.get(how, 0)
        step = 8 << 20 if how == "mmap8m" else WINDOW
        buf = bytearray(size) if size else None
        view = memoryview(buf) if buf is not None else None
        total = 0
        while True:
            try:
                path, off = q.get_nowait()
            except queue.Empty:
                return total
            h = hashlib.sha256()
            fd = os.open(path, os.O_RDONLY)
            try:
                if view is None:
                    for sub in range(off, off + WINDOW, step):
                        m = mmap.mmap(
                            fd,
                            step,
                            mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                            mmap.PROT_READ,
                            offset=sub,
                        )
                        if hashed:
                            h.update(m)
                        m.close()
                else:
                    done = 0
                    while done < WINDOW:
                        got = os.preadv(fd, [view], off + done)
                        if hashed:
                            h.update(view[:got])
                        done += got
            finally:
                os.close(fd)
            total += WINDOW

    return on_threads(threads, work) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    counts = sorted({1, 2, 4, max(1, cpus // 2), cpus * 3 // 4, cpus, 2 * cpus})
    res: dict[str, Any] = {"topology": topology()}
    for line in res["topology"]["lscpu"]:
        print(line)
    print("SMT sibling sets:", " ".join(res["topology"]["smt_sibling_sets"]))
    print("sha_ni:", res["topology"]["sha_ni"])
    res["hash_in_memory_gbps"] = hash_ceiling(counts)
    one = res["hash_in_memory_gbps"][1]
    print("\n| threads | sha256 in memory GB/s | x one thread |\n|---:|---:|---:|")
    for n, v in res["hash_in_memory_gbps"].items():
        print(f"| {n} | {v:.2f} | {v / one:.2f} |")
    files = make_files(args.workdir / "limits", 16)
    res["cached"] = {}
    print("\n| page-cached files, 64 MiB windows | threads | GB/s |\n|---|---:|---:|")
    for how in ("read16m", "read1m", "mmap", "mmap8m"):
        for rep in range(2):
            v = cached_rate(files, cpus, how, True)
            res["cached"][f"hash_{how}_t{cpus}_r{rep}"] = v
            print(f"| sha256, {how} (run {rep + 1}) | {cpus} | {v:.2f} |")
    for n in sorted({cpus // 2, cpus, cpus * 3 // 2, 2 * cpus}):
        v = cached_rate(files, n, "read16m", False)
        res["cached"][f"read_only_t{n}"] = v
        print(f"| read only, 16 MiB readinto | {n} | {v:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
