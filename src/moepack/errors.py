"""Every error moepack anticipates, in one hierarchy, each with the CLI exit code it maps to.

A caller catches `MoepackError` for "moepack refused this, and the message says why"; anything
else escaping the library is a bug. The command line (`moepack.cli`) turns these into exit codes
in one place, from `exit_code`:

- 0 success;
- 1 a check failed: the input was readable but is not what it should be (verify found
  mismatches, demo outputs disagreed);
- 2 unusable input or a wrong call: no artifact, a manifest that is not one, a checkpoint moepack
  cannot read or convert, a device or FlashInfer that cannot serve the artifact, a Hub failure;
- 130 interrupted (Ctrl-C; `KeyboardInterrupt`, not a `MoepackError`).

Attributes say where and what (`path`, `tensor`, `expected`, `found`, each None where it does not
apply) so that programs need not parse messages; `str(error)` is the full human message, naming
the file and tensor as before. The subclasses that used to derive from `ValueError` or
`RuntimeError` still do, so existing `except ValueError` callers keep working.

This module imports nothing heavy: the CLI, `verify` and `inspect` use it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_UNUSABLE = 2
EXIT_INTERRUPTED = 130


class MoepackError(Exception):
    """Base of every anticipated moepack error; `exit_code` is what the CLI exits with."""

    exit_code: ClassVar[int] = EXIT_UNUSABLE

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.expected = expected
        self.found = found

    def to_dict(self) -> dict[str, Any]:
        """The JSON error object `--json` prints: kind, message, and the attributes that apply."""
        out: dict[str, Any] = {"type": type(self).__name__, "message": self.message}
        for key in ("path", "tensor", "expected", "found"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value if isinstance(value, (str, int, float, bool, list)) else str(value)
        return out


class UsageError(MoepackError, ValueError):
    """An argument value moepack cannot act on (unknown target, layer or backend name). Exit 2."""


# -- artifacts ---------------------------------------------------------------------------------


class ArtifactError(MoepackError, ValueError):
    """The directory is not a usable moepack artifact. Exit 2."""


class ManifestError(ArtifactError):
    """`manifest.json` is missing, unreadable, not a complete v1 manifest, breaks the schema or
    names an unsafe path (`..`, absolute, a symlink leaving the artifact). Exit 2."""


class HeaderError(ArtifactError):
    """A safetensors header is malformed or inconsistent with its file's size. Exit 2 when it is
    raised; inside `verify` it becomes a check failure of that file (exit 1)."""


class VerificationError(ArtifactError):
    """The artifact's files are not what its manifest says (size, header, tensors, sha256, extra
    files). `problems` holds every fault found, each naming its file and tensor. Exit 1."""

    exit_code: ClassVar[int] = EXIT_CHECK_FAILED

    def __init__(
        self, message: str, problems: Sequence[Any] = (), *, path: str | Path | None = None
    ) -> None:
        first = problems[0] if problems else None
        super().__init__(
            message,
            path=path,
            tensor=getattr(first, "tensor", None),
            expected=getattr(first, "expected", None),
            found=getattr(first, "found", None),
        )
        self.problems = list(problems)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["problems"] = [str(p) for p in self.problems]
        return out


class CompatibilityError(MoepackError, ValueError):
    """A valid artifact that cannot be served here: its target is not this GPU, a backend or
    kernel is missing, or the installed FlashInfer lacks what its scale mode needs. Exit 2."""


class BackendError(CompatibilityError):
    """A backend that cannot run on this device or with this artifact's layer (activation,
    expert parallelism, input dtype). Exit 2."""


# -- conversion --------------------------------------------------------------------------------


class SourceError(MoepackError, ValueError):
    """The conversion source is not a recipe alias, a checkpoint directory or a hub repo. Exit 2."""


class CheckpointError(SourceError):
    """The checkpoint is not a readable ModelOpt NVFP4 checkpoint; the message names the file
    and tensor. Exit 2."""


class UnsupportedModel(CheckpointError):
    """A readable checkpoint that moepack cannot convert, refused before weights are fetched
    (activation, quant algorithm, expert layout). Exit 2."""


class HubError(MoepackError, RuntimeError):
    """A Hub failure explained: names the repo, revision and file, never the token. Exit 2."""


class ConvertError(MoepackError, RuntimeError):
    """The conversion cannot proceed (output directory holds another artifact, layers differ in
    geometry); the message says why and names the file. Exit 2."""


class DiskSpaceError(ConvertError):
    """Not enough free space for the conversion (checked before writing), or the disk filled up
    while writing: names the directory or file; `expected` is the bytes needed, `found` the
    bytes free. Exit 2."""


__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNUSABLE",
    "ArtifactError",
    "BackendError",
    "CheckpointError",
    "CompatibilityError",
    "ConvertError",
    "DiskSpaceError",
    "HeaderError",
    "HubError",
    "ManifestError",
    "MoepackError",
    "SourceError",
    "UnsupportedModel",
    "UsageError",
    "VerificationError",
]
