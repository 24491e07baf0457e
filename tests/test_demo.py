"""The README's offline demo: synthetic checkpoint -> convert -> verify -> load -> forward."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moepack.cli import main


@pytest.mark.parametrize(
    "variant,mode", [("super", "shared"), ("gated", "baked"), ("nano", "shared")]
)
def test_demo_runs_and_checks_itself(tmp_path, variant, mode):
    res = CliRunner().invoke(
        main,
        ["demo", "--dir", str(tmp_path), "--variant", variant, "--b12x-scales", mode, "--json"],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["ok"] and result["verify_exit_code"] == 0 and result["backend"] == "reference"
    for row in result["layers"]:
        assert row["paths"] == ["cutlass", "b12x"]
        if mode == "shared":
            assert row["vs_source_rel"] < 0.01
    assert (tmp_path / f"artifact-{mode}" / "manifest.json").exists()
