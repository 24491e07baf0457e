"""Regenerate the golden artifacts under tests/data/golden/ (docs/FORMAT.md, section 9).

    python tests/data/golden/make_golden.py              # regenerate (prints the new byte map)
    python tests/data/golden/make_golden.py --byte-map   # only print FORMAT.md's byte map

For each case it writes `CASE/source/`, a tiny synthetic ModelOpt NVFP4 checkpoint (single-file
layout), and `CASE/artifact/`, today's conversion of it. `tests/test_golden.py` checks that the
committed artifact still verifies and loads, that today's converter reproduces it byte for byte
from the committed source, and that an independent reader written from FORMAT.md alone decodes
it to the source's values. After an intended format change: run this, review `git diff`, commit
both together with the FORMAT.md change.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint

HERE = Path(__file__).resolve().parent

CASES: dict[str, tuple[synthetic.SyntheticSpec, dict[str, Any]]] = {
    # relu2 (non-gated) with a latent MoE (H=128 < hidden 256), three experts, baked b12x scales,
    # pass-through included: every tensor kind and both file kinds of a full artifact.
    "relu2-baked": (
        synthetic.SyntheticSpec("super", 256, 128, 32, 3, 2, "E", shards=1, seed=11),
        {"b12x_scales": "baked", "target": "sm120"},
    ),
    # gated (SwiGLU, [up; gate] halves each padded), shared b12x scales, MoE layers only.
    "gated-shared": (
        synthetic.SyntheticSpec("gated", 128, 128, 16, 2, 1, "E", shards=1, seed=12),
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


BYTE_MAP_CASE = "relu2-baked"
"""The case whose first layer file docs/FORMAT.md draws (section 3)."""


def byte_map(path: Path) -> str:
    """The byte map of a layer file as FORMAT.md section 3 prints it: every header entry at its
    absolute file offset, 4 KiB boundaries drawn as rules."""
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    width = 66
    rule = "├" + "─" * width + "┤"
    lines = [
        "offset  ┌" + "─" * width + "┐",
        f"{0:>6}  │ {'header length: u64 little-endian = ' + str(n):<{width - 1}}│",
        f"{8:>6}  │ {f'JSON header: {len(raw[8 : 8 + n].rstrip()):,} bytes, then spaces up to byte {8 + n}':<{width - 1}}│",
    ]
    for name, t in header.items():
        begin, end = (8 + n + o for o in t["data_offsets"])
        if begin % 4096 == 0:
            lines.append(f"{'':>6}  {rule} {begin // 4096} x 4 KiB")
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        size = "zeros" if name.startswith("__pad__.") else f"{end - begin:,} B"
        row = f"{name:<23} {t['dtype']:<8} {shape:<14} {size:>10}"
        lines.append(f"{begin:>6}  │ {row:<{width - 1}}│")
    lines.append(f"{len(raw):>6}  └" + "─" * width + "┘ end of file")
    return "\n".join(lines)


def repo_relative_source(case: str) -> None:
    """The manifest records the absolute source directory it was converted from; the committed
    copy names it relative to the repository instead, so no developer's path is committed."""
    manifest = artifact_dir(case) / "manifest.json"
    m = json.loads(manifest.read_text(encoding="utf-8"))
    m["source"]["path"] = source_dir(case).relative_to(HERE.parents[2]).as_posix()
    manifest.write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")


def byte_map_file() -> Path:
    return artifact_dir(BYTE_MAP_CASE) / "moe" / "layer-00000.safetensors"


def main() -> int:
    if sys.argv[1:] == ["--byte-map"]:
        print(byte_map(byte_map_file()))
        return 0
    for case in CASES:
        shutil.rmtree(HERE / case, ignore_errors=True)
        write_source(case)
        convert(case, artifact_dir(case))
        repo_relative_source(case)
        size = sum(p.stat().st_size for p in (HERE / case).rglob("*") if p.is_file())
        print(f"{case}: {size} bytes")
    print(f"byte map of {byte_map_file().relative_to(HERE)} (FORMAT.md section 3):")
    print(byte_map(byte_map_file()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
