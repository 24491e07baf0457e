"""Shared fixtures: small synthetic ModelOpt checkpoints and artifacts converted from them,
built once per session, and network isolation for the Hub tests."""

from __future__ import annotations

import socket
import types
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants, file_download

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint


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


ARTIFACTS: dict[str, tuple[str, dict[str, Any]]] = {
    # artifact name: (synthetic checkpoint, convert_checkpoint options)
    "super": ("super", {"b12x_scales": "baked"}),
    "super-moe-only": ("super", {"b12x_scales": "baked", "moe_only": True}),
    "nano": ("nano", {"b12x_scales": "shared", "target": "sm121"}),
    "gated": ("gated", {"b12x_scales": "baked"}),
    "gated-untied": ("gated-untied", {"b12x_scales": "shared"}),
}


def build_artifacts(checkpoints: dict[str, Path], root: Path) -> dict[str, Path]:
    """Convert each synthetic checkpoint the ways `ARTIFACTS` lists, under `root`."""
    out = {}
    for name, (source, options) in ARTIFACTS.items():
        convert_checkpoint(checkpoints[source], root / name, **options)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def artifacts(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    return build_artifacts(checkpoints, tmp_path_factory.mktemp("artifacts"))


@pytest.fixture
def isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real network (non-loopback connect() fails the test), no user token, offline off.

    huggingface_hub reads HF_HOME/HF_ENDPOINT/HF_HUB_OFFLINE once at import, hence explicit
    ``cache_dir=``/``endpoint=``/``token=`` everywhere and the patched constant below."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import time

    real_connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture
def retry_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """huggingface_hub sleeps 1 s before each in-call retry: record instead of sleeping."""
    sleeps: list[float] = []
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=sleeps.append))
    return sleeps
