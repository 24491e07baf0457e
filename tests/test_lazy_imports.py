"""Start-up stays light: `--help`, `inspect` and `verify` import no torch, and the format and
runtime packages import nothing heavy until used. Each check runs in a fresh interpreter
(`python -c`), the way huggingface_hub tests its lazy `__init__`, because this process has long
imported everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "safetensors", "numpy", "huggingface_hub", "tqdm", "flashinfer")
"""Modules none of the light paths may import (verify's progress bar is off without a tty)."""


def _loaded_after(code: str) -> set[str]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def _cli(*args: str) -> str:
    """Run the CLI in-process (so sys.modules can be read after it), keeping its exit code."""
    return (
        "from moepack.cli import main\n"
        "try:\n"
        f"    rc = main({list(args)!r}, standalone_mode=False)\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "assert not rc, rc\n"
    )


@pytest.mark.parametrize(
    "code",
    [
        "import moepack",
        "import moepack.errors",
        "import moepack.format",
        "import moepack.runtime",
        "import moepack.runtime.verify",
        "import moepack.runtime.inspect",
        "import moepack.cli",
    ],
)
def test_imports_are_light(code: str) -> None:
    assert _loaded_after(code) == set()


def test_help_imports_no_torch() -> None:
    assert _loaded_after(_cli("--help")) == set()


def test_inspect_and_verify_import_no_torch(artifacts: dict[str, Path]) -> None:
    art = str(artifacts["super"])
    assert _loaded_after(_cli("inspect", art)) == set()
    assert _loaded_after(_cli("inspect", art, "--json")) == set()
    assert _loaded_after(_cli("verify", art, "--quick")) == set()
    assert _loaded_after(_cli("verify", art)) == set()  # hashes bytes, reads headers


def test_runtime_load_is_imported_on_first_use() -> None:
    loaded = _loaded_after(
        "import moepack.runtime as r\nassert 'load' in dir(r)\nassert callable(r.load)"
    )
    assert "torch" in loaded
    res = subprocess.run(
        [sys.executable, "-c", "import moepack.runtime as r; r.nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1 and "has no attribute 'nope'" in res.stderr
