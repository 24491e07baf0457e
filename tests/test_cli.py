"""The CLI error boundary: every anticipated error becomes its exit code, one line on stderr (or a
JSON error object on stdout with --json), never a traceback unless MOEPACK_DEBUG=1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from moepack import errors
from moepack.cli import main


def _run(args: list[str], **env: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, args, env=env or None)
    return res.exit_code, res.stdout, res.stderr


def test_every_error_class_states_its_exit_code() -> None:
    classes = [
        getattr(errors, name) for name in errors.__all__ if isinstance(getattr(errors, name), type)
    ]
    assert all(issubclass(c, errors.MoepackError) for c in classes)
    failed = {c.__name__ for c in classes if c.exit_code == errors.EXIT_CHECK_FAILED}
    assert failed == {"VerificationError"}  # the rest: unusable input (2)
    assert all(c.exit_code in (1, 2) for c in classes)
    # Callers that caught the builtin bases before the hierarchy existed still catch these.
    assert issubclass(errors.ManifestError, ValueError)
    assert issubclass(errors.HubError, RuntimeError)
    assert issubclass(errors.BackendError, errors.CompatibilityError)
    assert issubclass(errors.UnsupportedModel, errors.CheckpointError)


def test_error_attributes_reach_the_json_object() -> None:
    exc = errors.CheckpointError(
        "ckpt/model.safetensors: tensor 'a.weight': expected U8, found F32",
        path="ckpt/model.safetensors",
        tensor="a.weight",
        expected="U8",
        found="F32",
    )
    assert str(exc).startswith("ckpt/model.safetensors: tensor 'a.weight'")
    assert exc.to_dict() == {
        "type": "CheckpointError",
        "message": str(exc),
        "path": "ckpt/model.safetensors",
        "tensor": "a.weight",
        "expected": "U8",
        "found": "F32",
    }


def test_unusable_input_exits_2_without_traceback(tmp_path: Path) -> None:
    for command in ("inspect", "verify"):
        code, out, err = _run([command, str(tmp_path)])
        assert code == 2, (command, out, err)
        assert "Traceback" not in out + err
    code, out, err = _run(["inspect", str(tmp_path)])
    assert err.startswith("moepack: error: ") and "manifest" in err and out == ""


def test_json_error_object_on_stdout(tmp_path: Path) -> None:
    code, out, err = _run(["inspect", str(tmp_path), "--json"])
    assert code == 2 and "Traceback" not in out + err
    obj = json.loads(out)
    assert obj["ok"] is False and obj["exit_code"] == 2
    assert obj["error"]["type"] == "ManifestError" and "manifest" in obj["error"]["message"]


def test_convert_source_errors_exit_2(tmp_path: Path) -> None:
    code, out, err = _run(
        ["convert", str(tmp_path / "nope"), "--target", "sm120", "-o", str(tmp_path / "o")]
    )
    assert code == 2 and "nope: no such directory" in err and "Traceback" not in out + err
    (tmp_path / "ckpt").mkdir()
    code, out, err = _run(
        [
            "convert",
            str(tmp_path / "ckpt"),
            "--target",
            "sm120",
            "-o",
            str(tmp_path / "o"),
            "--json",
        ]
    )
    obj = json.loads(out)
    assert code == 2 and obj["error"]["type"] == "CheckpointError"
    assert "config.json" in obj["error"]["message"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    code, out, err = _run(["inspect", str(tmp_path)], MOEPACK_DEBUG="1")
    assert code == 2 and "Traceback" in err and "ManifestError" in err


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("moepack.runtime.inspect.describe", interrupted)
    code, out, err = _run(["inspect", str(tmp_path)])
    assert code == 130 and "interrupted" in err and "Traceback" not in out + err


def test_os_errors_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def denied(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "manifest.json"))

    monkeypatch.setattr("moepack.runtime.inspect.describe", denied)
    code, out, err = _run(["inspect", str(tmp_path), "--json"])
    obj = json.loads(out)
    assert code == 2 and obj["error"]["type"] == "PermissionError"
    assert obj["error"]["path"] == str(tmp_path / "manifest.json")


def test_verify_source_errors_exit_2(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """A broken --source checkpoint is unusable input, reported, not a traceback."""
    art = Path(shutil.copytree(artifacts["super"], tmp_path / "art"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src/config.json").write_text("{not json")
    code, out, err = _run(["verify", str(art), "--quick", "--source", str(tmp_path / "src")])
    assert code == 2 and "config.json" in err and "Traceback" not in out + err


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    import moepack

    code, out, _ = _run(["--version"])
    assert code == 0 and out.strip() == f"moepack, version {version('moepack')}"
    assert moepack.__version__ == version("moepack")
