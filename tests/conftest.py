"""Shared fixtures: one cached factory of small synthetic ModelOpt checkpoints and the artifacts
converted from them, and network isolation for the Hub tests.

Every test that needs a checkpoint or an artifact asks `artifact_factory` (or the `checkpoints`
and `artifacts` mappings over it). Each distinct build is made once per session, on first use,
so running one test file builds only what that file needs and the whole suite builds each
conversion once. Builds are shared: a test that damages one must copy it first.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from huggingface_hub import constants, file_download

from moepack.convert import synthetic
from moepack.convert.pipeline import convert_checkpoint

LAYOUTS = ("sharded", "single")
"""The two layouts ModelOpt exports: shards with `model.safetensors.index.json`, or one
`model.safetensors` and no index (small models)."""

CHECKPOINTS: dict[str, synthetic.SyntheticSpec] = {
    **{v: synthetic.default_spec(v) for v in synthetic.VARIANTS},
    "gated-untied": synthetic.default_spec("gated", untied_gate_up=True, seed=3),
}
"""Synthetic checkpoint name -> spec (a gated one with untied gate/up `weight_scale_2` too)."""

ARTIFACTS: dict[str, tuple[str, dict[str, Any]]] = {
    # artifact name: (synthetic checkpoint, convert_checkpoint options)
    "super": ("super", {"b12x_scales": "baked"}),
    "super-moe-only": ("super", {"b12x_scales": "baked", "moe_only": True}),
    "nano": ("nano", {"b12x_scales": "shared", "target": "sm121"}),
    "gated": ("gated", {"b12x_scales": "baked"}),
    "gated-untied": ("gated-untied", {"b12x_scales": "shared"}),
}


def run_moepack(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m moepack ARGS` in a child process with `env`, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "moepack", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


class ArtifactFactory:
    """Builds synthetic checkpoints and conversions on first request and caches them by what
    they depend on (checkpoint, layout, convert options)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[Any, ...], Path] = {}

    def _once(self, key: tuple[Any, ...], build: Callable[[Path], Path]) -> Path:
        if key not in self._cache:
            path = self.root / "-".join(str(k) for k in key if k not in ((), None))
            self._cache[key] = build(path)
        return self._cache[key]

    def checkpoint(self, name: str, layout: str = "sharded") -> Path:
        """Synthetic checkpoint `name` (a key of CHECKPOINTS) in `layout` (one of LAYOUTS)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")
        spec, single = CHECKPOINTS[name], layout == "single"
        return self._once(
            ("ckpt", name, layout),
            lambda p: synthetic.write_checkpoint(p, spec, single_file=single),
        )

    def artifact(
        self,
        name: str,
        *,
        b12x_scales: str = "baked",
        target: str = "sm120",
        moe_only: bool = False,
        layout: str = "sharded",
    ) -> Path:
        """`name`'s checkpoint converted with these options (convert_checkpoint's defaults)."""
        src = self.checkpoint(name, layout)
        options = {"b12x_scales": b12x_scales, "target": target, "moe_only": moe_only}

        def build(path: Path) -> Path:
            convert_checkpoint(src, path, **options)
            return path

        key = ("art", name, layout, b12x_scales, target, "moe-only" if moe_only else None)
        return self._once(key, build)


K = TypeVar("K")


class LazyMap(Mapping[K, Path]):
    """A read-only mapping whose values are built (through the factory) when first looked up."""

    def __init__(self, keys: list[K], get: Callable[[K], Path]) -> None:
        self._keys, self._get = keys, get

    def __getitem__(self, key: K) -> Path:
        if key not in self._keys:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[K]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory: pytest.TempPathFactory) -> ArtifactFactory:
    return ArtifactFactory(tmp_path_factory.mktemp("factory"))


@pytest.fixture(scope="session")
def checkpoints(artifact_factory: ArtifactFactory) -> Mapping[str, Path]:
    """Synthetic checkpoint name -> its sharded checkpoint directory (built on first use)."""
    return LazyMap(list(CHECKPOINTS), artifact_factory.checkpoint)


@pytest.fixture(scope="session")
def artifacts(artifact_factory: ArtifactFactory) -> Mapping[str, Path]:
    """Artifact name (a key of ARTIFACTS) -> its artifact directory (built on first use)."""
    return LazyMap(
        list(ARTIFACTS),
        lambda name: artifact_factory.artifact(ARTIFACTS[name][0], **ARTIFACTS[name][1]),
    )


@pytest.fixture(scope="session")
def by_mode(artifact_factory: ArtifactFactory) -> Mapping[tuple[str, str], Path]:
    """`(checkpoint name, b12x scale mode)` -> that checkpoint converted for sm120 in that mode."""
    keys = [(name, mode) for name in CHECKPOINTS for mode in ("baked", "shared")]
    return LazyMap(keys, lambda k: artifact_factory.artifact(k[0], b12x_scales=k[1]))


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
