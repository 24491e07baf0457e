"""Regenerate the golden artifacts under tests/data/golden/ (docs/FORMAT.md, section 9).

    python tests/data/golden/make_golden.py

For each case it writes `CASE/source/`, a tiny synthetic ModelOpt NVFP4 checkpoint (single-file
layout), and `CASE/artifact/`, today's conversion of it. `tests/test_golden.py` checks that the
committed artifact still verifies and loads, that today's converter reproduces it byte for byte
from the committed source, and that an independent reader written from FORMAT.md alone decodes
it to the source's values. After an intended format change: run this, review `git diff`, commit
both together with the FORMAT.md change.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint

HERE = Path(__file__).resolve().parent

CASES: dict[str, tuple[synthetic.SyntheticSpec, dict[str, Any]]] = {
    # relu2 (non-gated) with a latent MoE (H=16 < hidden 32), three experts, baked b12x scales,
    # pass-through included: every tensor kind and both file kinds of a full artifact.
    "relu2-baked": (
        synthetic.SyntheticSpec("super", 32, 16, 32, 3, 2, "E", shards=1, seed=11),
        {"b12x_scales": "baked", "target": "sm120"},
    ),
    # gated (SwiGLU, [up; gate] halves each padded), shared b12x scales, MoE layers only.
    "gated-shared": (
        synthetic.SyntheticSpec("gated", 32, 32, 16, 2, 1, "E", shards=1, seed=12),
        {"b12x_scales": "shared", "target": "sm121", "moe_only": True},
    ),
}


def source_dir(case: str) -> Path:
    return HERE / case / "source"


def artifact_dir(case: str) -> Path:
    return HERE / case / "artifact"


LARGE = ("lm_head", "embeddings", "embed_tokens")
"""Dense tensors left out of the golden sources: the random 256-token vocabulary would be most
of their bytes and tests nothing the other pass-through tensors do not."""


def write_source(case: str) -> Path:
    """The synthetic checkpoint of `case`, single-file layout, without the vocabulary tensors."""
    out = synthetic.write_checkpoint(source_dir(case), CASES[case][0], single_file=True)
    weights = out / "model.safetensors"
    tensors = {n: t for n, t in load_file(weights).items() if n.split(".")[-2] not in LARGE}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def convert(case: str, out: Path) -> Path:
    """Today's conversion of the committed source of `case` into `out`."""
    convert_checkpoint(source_dir(case), out, **CASES[case][1])
    return out


def main() -> int:
    for case in CASES:
        shutil.rmtree(HERE / case, ignore_errors=True)
        write_source(case)
        convert(case, artifact_dir(case))
        size = sum(p.stat().st_size for p in (HERE / case).rglob("*") if p.is_file())
        print(f"{case}: {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
