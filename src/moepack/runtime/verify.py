"""`moepack verify`: prove that an artifact's bytes are the ones that were converted.

Artifacts travel between machines, disks and object stores before they are served, and a flipped
bit in a scale byte serves wrong answers silently. This module checks, without trusting anything
on disk: the manifest against its schema (by a small built-in validator, so the runtime needs no
`jsonschema`), that every path stays inside the artifact, every file's size and sha256 (streamed,
parallel across files), every safetensors header against the manifest and every MoE layer file
against the tensor specs its geometry implies. Every fault becomes a `Problem`; nothing raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .format import (
    ALIGNMENT,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PAD_PREFIX,
    Geometry,
    layer_file,
)
from .layout import padded_intermediate
from .safetensors_header import Header, HeaderError, read_header

CHUNK = 16 << 20
"""Read size for hashing: large reads keep syscall overhead negligible next to sha256."""
SCHEMA_PATH = Path(__file__).with_name("schema") / "manifest.schema.json"
LEFTOVER_MARKERS = (".moepack-tmp", ".moepack-partial")
"""Names a conversion uses while it runs; their presence means it was interrupted."""


@dataclass
class Problem:
    """One fault: which file (relative path) and tensor, if any, and what was expected vs found."""

    file: str | None
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = ":".join(x for x in (self.file, self.tensor) if x)
        return f"{where}: {self.message}" if where else self.message


@dataclass
class VerifyReport:
    """The verdict on one artifact; `exit_code` is what `moepack verify` returns."""

    root: str
    quick: bool
    problems: list[Problem] = field(default_factory=list)
    unusable: bool = False
    files_checked: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when everything holds, 1 on any mismatch, 2 when the artifact cannot be used at all."""
        if self.unusable:
            return 2
        return 1 if self.problems else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "unusable": self.unusable,
            "quick": self.quick,
            "files_checked": self.files_checked,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "problems": [asdict(p) for p in self.problems],
        }

    def format_text(self) -> str:
        lines = [f"  {p}" for p in self.problems]
        rate = self.bytes_hashed / self.seconds / 1e9 if self.seconds > 0 else 0.0
        stats = (
            f"{self.files_checked} files checked in {self.seconds:.1f} s, quick: sizes and headers only"
            if self.quick
            else f"{self.files_checked} files, {self.bytes_hashed / 1e9:.2f} GB hashed in {self.seconds:.1f} s ({rate:.2f} GB/s)"
        )
        if self.unusable:
            head = f"UNUSABLE: {self.root} is not a usable moepack artifact"
        elif self.problems:
            head = f"FAILED: {self.root}: {len(self.problems)} problem(s); {stats}"
        else:
            head = f"OK: {self.root}; {stats}"
        return "\n".join([head, *lines])


# ---------------------------------------------------------------------------------------------
# Manifest schema: a validator for the subset of JSON Schema that manifest.schema.json uses.
# Reading the shipped schema (instead of restating it in code) keeps the two from drifting.

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_IGNORED = {"$schema", "$id", "title", "description"}


def _same(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python, `true` is not `1`."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_errors(value: Any, schema: dict[str, Any], where: str = "manifest") -> Iterator[str]:
    """Yield one message per violation of `schema` by `value`, each naming the JSON path."""
    unknown = schema.keys() - _IGNORED - _KEYWORDS.keys()
    if unknown:
        raise ValueError(f"schema keywords {sorted(unknown)} are not supported by this validator")
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in names):
            yield f"{where}: expected {' or '.join(names)}, found {_short(value)}"
            return
    for key, check in _KEYWORDS.items():
        if key in schema:
            yield from check(value, schema[key], schema, where)


def _k_const(v: Any, const: Any, _s: dict, where: str) -> Iterator[str]:
    if not _same(v, const):
        yield f"{where}: expected {_short(const)}, found {_short(v)}"


def _k_enum(v: Any, options: list, _s: dict, where: str) -> Iterator[str]:
    if not any(_same(v, o) for o in options):
        yield f"{where}: expected one of {_short(options)}, found {_short(v)}"


def _k_required(v: Any, keys: list, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, dict):
        for k in keys:
            if k not in v:
                yield f"{where}: required key {k!r} is missing"


def _k_properties(v: Any, props: dict, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, dict):
        for k, sub in props.items():
            if k in v:
                yield from schema_errors(v[k], sub, f"{where}.{k}")


def _k_additional(v: Any, extra: Any, s: dict, where: str) -> Iterator[str]:
    if not isinstance(v, dict):
        return
    for k in v.keys() - s.get("properties", {}).keys():
        if extra is False:
            yield f"{where}: unexpected key {k!r}"
        elif isinstance(extra, dict):
            yield from schema_errors(v[k], extra, f"{where}[{k!r}]")


def _k_items(v: Any, sub: dict, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, list):
        for i, item in enumerate(v):
            yield from schema_errors(item, sub, f"{where}[{i}]")


def _k_minimum(v: Any, low: float, _s: dict, where: str) -> Iterator[str]:
    if _TYPES["number"](v) and v < low:
        yield f"{where}: expected >= {low}, found {v}"


def _k_multiple(v: Any, base: int, _s: dict, where: str) -> Iterator[str]:
    if _TYPES["number"](v) and v % base:
        yield f"{where}: expected a multiple of {base}, found {v}"


def _k_pattern(v: Any, pattern: str, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, str) and not re.search(pattern, v):
        yield f"{where}: {_short(v)} does not match {pattern!r}"


def _k_min_length(v: Any, n: int, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, str) and len(v) < n:
        yield f"{where}: expected at least {n} characters, found {_short(v)}"


def _k_min_items(v: Any, n: int, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, list) and len(v) < n:
        yield f"{where}: expected at least {n} items, found {len(v)}"


def _k_max_items(v: Any, n: int, _s: dict, where: str) -> Iterator[str]:
    if isinstance(v, list) and len(v) > n:
        yield f"{where}: expected at most {n} items, found {len(v)}"


_KEYWORDS: dict[str, Callable[[Any, Any, dict, str], Iterator[str]]] = {
    "const": _k_const,
    "enum": _k_enum,
    "required": _k_required,
    "properties": _k_properties,
    "additionalProperties": _k_additional,
    "items": _k_items,
    "minimum": _k_minimum,
    "multipleOf": _k_multiple,
    "pattern": _k_pattern,
    "minLength": _k_min_length,
    "minItems": _k_min_items,
    "maxItems": _k_max_items,
    "type": lambda *_: iter(()),  # handled first, in schema_errors
}


def manifest_errors(manifest: Any) -> list[str]:
    """Schema violations plus the cross-field rules a schema cannot express."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    errors = list(schema_errors(manifest, schema))
    if not errors:
        errors = _consistency_errors(manifest)
    return errors


def _consistency_errors(m: dict[str, Any]) -> list[str]:
    errors = []
    paths = [f["path"] for f in m["files"]]
    if len(set(paths)) != len(paths):
        errors.append("manifest.files: a path is listed more than once")
    kinds = {f["path"]: f["kind"] for f in m["files"]}
    layers = [entry["layer"] for entry in m["layers"]]
    if layers != m["model"]["moe_layers"]:
        errors.append(
            f"manifest.layers: layers {layers} differ from model.moe_layers {m['model']['moe_layers']}"
        )
    for i, entry in enumerate(m["layers"]):
        if entry["file"] != layer_file(entry["layer"]):
            errors.append(
                f"manifest.layers[{i}].file: expected {layer_file(entry['layer'])!r}, found {entry['file']!r}"
            )
        elif kinds.get(entry["file"]) != "moe_layer":
            errors.append(f"manifest.layers[{i}].file: {entry['file']!r} is not a listed moe_layer")
    for i, f in enumerate(m["files"]):
        if f["path"].endswith(".safetensors") and "tensors" not in f:
            errors.append(f"manifest.files[{i}]: safetensors file without a tensor listing")
    n, n_p = m["model"]["intermediate_size"], m["model"]["intermediate_size_padded"]
    if n_p != padded_intermediate(n):
        errors.append(
            f"manifest.model.intermediate_size_padded: expected {padded_intermediate(n)} for n={n}, found {n_p}"
        )
    return errors


# ---------------------------------------------------------------------------------------------
# Paths


def unsafe_path(root: Path, rel: str) -> str | None:
    """Why `rel` may not be used inside `root` (`..`, absolute, escaping symlink), or None."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return "path must be relative, use '/', and not be empty"
    parts = PurePosixPath(rel).parts
    if ".." in parts:
        return "path contains '..'"
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        return f"path cannot be resolved: {exc}"
    if not resolved.is_relative_to(root.resolve()):
        return f"path resolves outside the artifact (to {resolved})"
    return None


def _walk(root: Path) -> Iterator[str]:
    """Every entry under `root` that is not a plain directory, relative; symlinked and leftover
    directories are yielded whole, not entered."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        opaque = [d for d in dirnames if d in LEFTOVER_MARKERS or (base / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in opaque]
        for name in [*opaque, *filenames]:
            yield (base / name).relative_to(root).as_posix()


def _extra_files(root: Path, listed: set[str]) -> list[Problem]:
    problems = []
    for rel in sorted(_walk(root)):
        if rel == MANIFEST or rel in listed:
            continue
        if any(marker in rel for marker in LEFTOVER_MARKERS):
            why = "leftover of an interrupted conversion (not listed in the manifest)"
        else:
            why = "not listed in the manifest; a finished artifact holds no other files"
        problems.append(Problem(rel, None, why))
    return problems


# ---------------------------------------------------------------------------------------------
# Per-file checks


class _Progress:
    """A byte counter shared by hashing threads, drawn with tqdm on stderr when available."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.lock = threading.Lock()
        self.done = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, desc="sha256", file=sys.stderr, leave=False
            )

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sha256_file(path: Path, progress: _Progress | None = None, chunk: int = CHUNK) -> str:
    """Stream `path` through sha256 in large reads into one reused buffer (hashlib drops the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress.add(n)
    return h.hexdigest()


@dataclass
class _Context:
    root: Path
    manifest: dict[str, Any]
    quick: bool
    progress: _Progress
    layer_of: dict[str, int]


def _check_file(ctx: _Context, rec: dict[str, Any]) -> tuple[list[Problem], int]:
    """Every check of one listed file; returns its problems and the bytes hashed."""
    rel = rec["path"]
    path = ctx.root / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        return [Problem(rel, None, "listed in the manifest but missing")], 0
    except OSError as exc:
        return [Problem(rel, None, f"cannot stat: {exc.strerror or exc}")], 0
    if not stat.S_ISREG(st.st_mode):
        return [Problem(rel, None, "not a regular file")], 0
    problems = []
    if st.st_size != rec["size"]:
        problems.append(
            Problem(rel, None, f"size: expected {rec['size']} bytes, found {st.st_size}")
        )
    if "tensors" in rec:
        problems += _check_header(ctx, rec, path, st.st_size)
    if ctx.quick:
        return problems, 0
    try:
        digest = sha256_file(path, ctx.progress)
    except OSError as exc:
        return [*problems, Problem(rel, None, f"cannot read: {exc.strerror or exc}")], 0
    if digest != rec["sha256"]:
        problems.append(Problem(rel, None, f"sha256: expected {rec['sha256']}, found {digest}"))
    return problems, st.st_size


def _check_header(ctx: _Context, rec: dict[str, Any], path: Path, size: int) -> list[Problem]:
    rel = rec["path"]
    try:
        header = read_header(path, size)
    except HeaderError as exc:
        message = str(exc).removeprefix(f"{path}: ")
        return [Problem(rel, None, f"safetensors header: {message}")]
    problems = _compare_listing(rel, rec["tensors"], header)
    if rec["kind"] == "moe_layer":
        problems += _check_layer(ctx, rel, header)
    return problems


def _compare_listing(rel: str, listed: dict[str, Any], header: Header) -> list[Problem]:
    """The header must hold exactly the manifest's tensors, each with its dtype, shape, offsets."""
    problems = []
    for name, want in listed.items():
        got = header.tensors.get(name)
        if got is None:
            problems.append(Problem(rel, name, "listed in the manifest but absent from the file"))
            continue
        found = {
            "dtype": got.dtype,
            "shape": list(got.shape),
            "data_offsets": [got.start - header.data_start, got.end - header.data_start],
        }
        for key in ("dtype", "shape", "data_offsets"):
            if want.get(key) != found[key]:
                problems.append(
                    Problem(rel, name, f"{key}: expected {want.get(key)}, found {found[key]}")
                )
    for name in header.tensors.keys() - listed.keys():
        problems.append(Problem(rel, name, "in the file but not listed in the manifest"))
    return problems


def _check_layer(ctx: _Context, rel: str, header: Header) -> list[Problem]:
    """A layer file must hold exactly the tensors FORMAT.md section 2 prescribes, aligned."""
    model, mode = ctx.manifest["model"], ctx.manifest["b12x_scale_mode"]
    specs = Geometry.from_manifest(model).tensor_specs(mode)
    problems = []
    ordered = sorted(header.tensors.values(), key=lambda t: t.start)
    real = [t for t in ordered if not t.name.startswith(PAD_PREFIX)]
    pads = [t for t in ordered if t.name.startswith(PAD_PREFIX)]
    for name, (dtype, shape) in specs.items():
        got = header.tensors.get(name)
        if got is None:
            problems.append(Problem(rel, name, f"missing: expected {dtype}{list(shape)}"))
        elif (got.dtype, got.shape) != (dtype, shape):
            problems.append(
                Problem(
                    rel,
                    name,
                    f"expected {dtype}{list(shape)} from the manifest geometry, found {got.dtype}{list(got.shape)}",
                )
            )
    for t in real:
        if t.name not in specs:
            problems.append(Problem(rel, t.name, f"not a tensor of a {mode}-mode layer file"))
        elif t.start % ALIGNMENT:
            problems.append(
                Problem(rel, t.name, f"starts at byte {t.start}, not a multiple of {ALIGNMENT}")
            )
    if [t.name for t in real if t.name in specs] != [n for n in specs if n in header.tensors]:
        problems.append(Problem(rel, None, f"tensors are not in the order {list(specs)}"))
    for i, t in enumerate(pads):
        if t.name != f"{PAD_PREFIX}{i}" or t.dtype != "U8" or len(t.shape) != 1:
            problems.append(
                Problem(rel, t.name, f"filler {i} in file order: expected {PAD_PREFIX}{i} U8[n]")
            )
    if header.data_start % ALIGNMENT:
        problems.append(
            Problem(
                rel, None, f"data starts at byte {header.data_start}, not a multiple of {ALIGNMENT}"
            )
        )
    want_meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "layer": str(ctx.layer_of.get(rel)),
    }
    if header.metadata != want_meta:
        problems.append(
            Problem(rel, None, f"__metadata__: expected {want_meta}, found {header.metadata}")
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Entry point


def _load_manifest(root: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The manifest if usable; otherwise the reasons it is not (each makes the artifact unusable)."""
    path = root / MANIFEST
    if not root.is_dir():
        return None, [Problem(None, None, f"{root} is not a directory")]
    why = unsafe_path(root, MANIFEST)
    if why:
        return None, [Problem(MANIFEST, None, why)]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Problem(MANIFEST, None, "missing: not a moepack artifact, or unfinished")]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, [Problem(MANIFEST, None, f"unreadable: {exc}")]
    if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version")
        return None, [
            Problem(
                MANIFEST,
                None,
                f"format_version: this moepack reads {FORMAT_VERSION}, found {found!r}",
            )
        ]
    if isinstance(manifest, dict) and manifest.get("complete") is not True:
        return None, [
            Problem(MANIFEST, None, "completeness marker missing: the conversion did not finish")
        ]
    problems = [Problem(MANIFEST, None, e) for e in manifest_errors(manifest)]
    if not problems:
        for rec in manifest["files"]:
            why = unsafe_path(root, rec["path"])
            if why:
                problems.append(Problem(rec["path"], None, f"unsafe path: {why}"))
    return (None if problems else manifest), problems


def verify_artifact(
    root: Path, *, quick: bool = False, jobs: int | None = None, progress: bool = False
) -> VerifyReport:
    """Check the artifact at `root`; `quick` skips hashing; `jobs` threads hash files in parallel."""
    root = Path(root)
    started = time.perf_counter()
    report = VerifyReport(root=str(root), quick=quick)
    try:
        _verify(root, report, jobs, progress)
    except Exception as exc:  # a bug here must still give a verdict, never a traceback
        report.problems.append(Problem(None, None, f"internal error: {type(exc).__name__}: {exc}"))
        report.unusable = True
    report.seconds = time.perf_counter() - started
    return report


def _verify(root: Path, report: VerifyReport, jobs: int | None, progress: bool) -> None:
    manifest, problems = _load_manifest(root)
    report.problems += problems
    if manifest is None:
        report.unusable = True
        return
    records = sorted(manifest["files"], key=lambda r: -r["size"])  # biggest first: balance
    bar = _Progress(0 if report.quick else sum(r["size"] for r in records), progress)
    ctx = _Context(
        root, manifest, report.quick, bar, {e["file"]: e["layer"] for e in manifest["layers"]}
    )
    workers = max(1, min(jobs or os.cpu_count() or 1, len(records) or 1))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda rec: _check_file(ctx, rec), records))
    finally:
        bar.close()
    by_path = dict(zip((r["path"] for r in records), results, strict=True))
    for rec in manifest["files"]:  # report in manifest order, not completion order
        file_problems, hashed = by_path[rec["path"]]
        report.problems += file_problems
        report.bytes_hashed += hashed
    report.files_checked = len(records)
    report.problems += _extra_files(root, {r["path"] for r in records})
