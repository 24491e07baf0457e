"""Benchmark start-up: the wall time of each `moepack` command against `python -c pass`.

A user runs `moepack inspect` or `moepack verify` in a shell loop or a deployment script; the
interpreter's own start-up is the floor, and anything above it is imports. Each command runs in
a fresh process (`python -m moepack ...`, the same code path as the installed `moepack` script)
`--repeats` times after one warm-up run; the table reports the best and the median wall time and
the median's ratio to `python -c pass`. `python -c "import torch"` is printed as a reference:
it is what every command paid before imports were made lazy.

    python benchmarks/startup.py [--repeats 10] [--dir DIR]

The artifact is a tiny synthetic conversion (`moepack demo`'s "super" checkpoint), so hashing
and header reads cost almost nothing and the numbers are start-up, not I/O.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(argv: list[str], repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of `argv`, after one warm-up run that must succeed."""
    subprocess.run(argv, check=True, capture_output=True)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        runs.append(time.perf_counter() - t0)
    return min(runs), statistics.median(runs)


def _artifact(root: Path) -> Path:
    from moepack.convert import synthetic
    from moepack.convert.pipeline import convert_checkpoint

    ckpt = synthetic.write_checkpoint(root / "checkpoint", synthetic.default_spec("super"))
    convert_checkpoint(ckpt, root / "artifact", overwrite=True)
    return root / "artifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--dir", type=Path, help="Where to build the artifact (default: a temp dir)."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moepack-startup-") as tmp:
        art = str(_artifact(args.dir or Path(tmp)))
        py = sys.executable
        cases = [
            ("python -c pass", [py, "-c", "pass"]),
            ('python -c "import torch" (reference)', [py, "-c", "import torch"]),
            ("moepack --help", [py, "-m", "moepack", "--help"]),
            ("moepack inspect ART", [py, "-m", "moepack", "inspect", art]),
            ("moepack verify --quick ART", [py, "-m", "moepack", "verify", "--quick", art]),
            ("moepack verify ART", [py, "-m", "moepack", "verify", art]),
        ]
        rows = [(name, *_time(argv, args.repeats)) for name, argv in cases]
    floor = rows[0][2]
    print("| command | best (s) | median (s) | median / `python -c pass` |")
    print("|---|---:|---:|---:|")
    for name, best, median in rows:
        print(f"| `{name}` | {best:.3f} | {median:.3f} | {median / floor:.1f}x |")


if __name__ == "__main__":
    main()
