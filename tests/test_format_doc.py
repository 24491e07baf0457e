"""docs/FORMAT.md and the manifest schema agree with the code: the tensor table (parsed from the
document) equals `Geometry.tensor_specs`, the E2M1 code table equals the codec's, the byte map
is the golden layer file's, and every schema property carries a description."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from moepack.format import Geometry
from moepack.format.validate import SCHEMA_PATH
from moepack.runtime import nvfp4

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def doc_tensor_table() -> list[dict[str, str]]:
    """Rows of the table between the tensor-table markers: name, dtype, shape, modes, meaning."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    block = re.search(r"<!-- tensor-table:begin.*?-->\n(.*?)<!-- tensor-table:end -->", text, re.S)
    assert block, "FORMAT.md lost its tensor-table markers"
    lines = [line for line in block.group(1).splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["name", "dtype", "shape", "modes", "meaning"], header
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|", 4)]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _unquote(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return cell[1:-1]


def eval_shape(expr: str, env: dict[str, int]) -> tuple[int, ...]:
    """Evaluate a shape such as `[E, pad128(R13), pad4(H/16)]`: names, integers, + - * /,
    pad128() and pad4(); every division must be exact."""
    funcs = {"pad128": lambda x: -(-x // 128) * 128, "pad4": lambda x: -(-x // 4) * 4}

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div):
                assert a % b == 0, f"{expr}: {a}/{b} is not exact"
                return a // b
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            return ops[type(node.op)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            (arg,) = node.args
            return funcs[node.func.id](ev(arg))
        raise AssertionError(f"{expr}: unsupported {ast.dump(node)}")

    tree = ast.parse(expr, mode="eval").body
    assert isinstance(tree, ast.List), expr
    return tuple(ev(e) for e in tree.elts)


def doc_specs(geo: Geometry, mode: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The document's tensors of a `mode` layer file for `geo`, in document order."""
    env = {
        "E": geo.num_experts,
        "H": geo.hidden,
        "n": geo.intermediate,
        "n_p": geo.intermediate_padded,
        "R13": geo.w13_rows,
    }
    out = {}
    for row in doc_tensor_table():
        assert row["modes"] in ("both", "baked", "shared"), row
        if row["modes"] in ("both", mode):
            out[_unquote(row["name"])] = (row["dtype"], eval_shape(_unquote(row["shape"]), env))
    return out


GEOMETRIES = [
    Geometry(num_experts=8, hidden=64, intermediate=80, intermediate_padded=256, gated=False),
    Geometry(num_experts=4, hidden=64, intermediate=48, intermediate_padded=256, gated=True),
    Geometry(num_experts=3, hidden=16, intermediate=32, intermediate_padded=256, gated=False),
    Geometry(
        num_experts=512, hidden=1024, intermediate=2688, intermediate_padded=2816, gated=False
    ),
    Geometry(num_experts=128, hidden=2688, intermediate=1856, intermediate_padded=2048, gated=True),
]


@pytest.mark.parametrize(
    "geo", GEOMETRIES, ids=lambda g: f"E{g.num_experts}-H{g.hidden}-g{g.gated:d}"
)
@pytest.mark.parametrize("mode", ["baked", "shared"])
def test_tensor_table_equals_code_specs(geo: Geometry, mode: str) -> None:
    """Names, dtypes, shapes and order: the table is the code's `tensor_specs`, nothing more."""
    doc, code = doc_specs(geo, mode), geo.tensor_specs(mode)
    assert list(doc.items()) == list(code.items())


def test_e2m1_code_table_equals_codec() -> None:
    text = FORMAT_MD.read_text(encoding="utf-8")
    row = re.search(r"^\| value \|(.*)\|$", text, re.M)
    assert row, "FORMAT.md lost its E2M1 code table"
    doc = [float(c) for c in row.group(1).split("|")]
    codec = nvfp4.decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist()
    signed = lambda vs: [(v, math.copysign(1.0, v)) for v in vs]  # noqa: E731 (-0 is a code)
    assert signed(doc) == signed(codec)


def _properties(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every subschema a manifest value is checked against, with its JSON path."""
    out = [(path or "/", node)]
    for key, sub in node.get("properties", {}).items():
        out += _properties(sub, f"{path}/{key}")
    if isinstance(node.get("items"), dict):
        out += _properties(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _properties(node["additionalProperties"], f"{path}{{*}}")
    return out


def test_every_schema_property_is_described() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    nodes = _properties(schema)
    assert len(nodes) > 60  # the walk reaches the nested records
    missing = [p for p, n in nodes if not str(n.get("description", "")).strip()]
    assert not missing, f'add a "description" to these schema properties: {missing}'


def test_byte_map_is_the_golden_layer_file() -> None:
    """Section 3's picture is the golden layer file's real layout (offsets, names, dtypes,
    shapes), so it cannot drift from what the writer emits."""
    golden = Path(__file__).resolve().parent / "data" / "golden"
    spec = importlib.util.spec_from_file_location("make_golden", golden / "make_golden.py")
    assert spec and spec.loader
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    text = FORMAT_MD.read_text(encoding="utf-8")
    block = re.search(r"<!-- byte-map:begin -->\n```\n(.*?)```\n<!-- byte-map:end -->", text, re.S)
    assert block, "FORMAT.md lost its byte-map markers"
    want = make_golden.byte_map(make_golden.byte_map_file())
    assert block.group(1).rstrip("\n") == want, (
        "paste the output of `python tests/data/golden/make_golden.py --byte-map` into FORMAT.md"
    )
