"""Shared fixtures: small synthetic ModelOpt checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moepack.convert import synthetic


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per synthetic variant, plus a gated one with untied gate/up scales."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {
        v: synthetic.write_checkpoint(root / v, synthetic.default_spec(v))
        for v in synthetic.VARIANTS
    }
    out["gated-untied"] = synthetic.write_checkpoint(
        root / "gated-untied", synthetic.default_spec("gated", untied_gate_up=True, seed=3)
    )
    return out
