"""THE validator: what makes a directory a valid moepack artifact, short of its byte hashes.

`load`, `verify` and `inspect` all ask this module, so they cannot disagree about what is valid:

- the manifest (`manifest_problems`): readable JSON, the format name and version, the
  completeness marker, the shipped JSON schema (types included: `"num_experts": "4"` is
  refused), the cross-field rules a schema cannot express (layer list, file names, padding),
  and path containment (no `..`, no absolute path, no symlink leaving the artifact);
- each listed file (`check_file`): a regular file of the listed size whose safetensors header is
  sound and equals the manifest's listing, and, for a layer file, holds exactly the tensors its
  geometry implies (exact shapes: a `[1]`-shaped scalar is refused like CUTLASS refuses it),
  aligned, with its metadata;
- the directory (`extra_files`): nothing unlisted, no leftovers of an interrupted conversion.

`verify` adds the sha256 of every file on top; `validate_artifact` is everything else, raising
(`ManifestError` exit 2, `VerificationError` exit 1) for `load(verify=False)`. Every fault is a
`Problem` naming its file and tensor. No torch here.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from moepack.errors import HeaderError, ManifestError, VerificationError

from .constants import (
    ALIGNMENT,
    FORMAT_NAME,
    LEFTOVER_MARKERS,
    MANIFEST,
    PAD_PREFIX,
    READ_VERSIONS,
    layer_file,
)
from .flashinfer import RELEASES
from .header import Header, read_header
from .manifest import FileRecord, Manifest
from .specs import padded_intermediate

SCHEMA_PATH = Path(__file__).with_name("schema") / "manifest.schema.json"


@dataclass
class Problem:
    """One fault: which file (relative path) and tensor, if any, and what was expected vs found."""

    file: str | None
    tensor: str | None
    message: str

    def __str__(self) -> str:
        where = ":".join(x for x in (self.file, self.tensor) if x)
        return f"{where}: {self.message}" if where else self.message


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
_SCHEMA: dict[str, Any] | None = None


def schema() -> dict[str, Any]:
    """The shipped manifest schema, parsed once."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return _SCHEMA


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


def _k_const(v: Any, const: Any, _s: dict[str, Any], where: str) -> Iterator[str]:
    if not _same(v, const):
        yield f"{where}: expected {_short(const)}, found {_short(v)}"


def _k_enum(v: Any, options: list[Any], _s: dict[str, Any], where: str) -> Iterator[str]:
    if not any(_same(v, o) for o in options):
        yield f"{where}: expected one of {_short(options)}, found {_short(v)}"


def _k_required(v: Any, keys: list[str], _s: dict[str, Any], where: str) -> Iterator[str]:
    if isinstance(v, dict):
        for k in keys:
            if k not in v:
                yield f"{where}: required key {k!r} is missing"


def _k_properties(v: Any, props: dict[str, Any], _s: dict[str, Any], where: str) -> Iterator[str]:
    if isinstance(v, dict):
        for k, sub in props.items():
            if k in v:
                yield from schema_errors(v[k], sub, f"{where}.{k}")


def _k_additional(v: Any, extra: Any, s: dict[str, Any], where: str) -> Iterator[str]:
    if not isinstance(v, dict):
        return
    for k in v.keys() - s.get("properties", {}).keys():
        if extra is False:
            yield f"{where}: unexpected key {k!r}"
        elif isinstance(extra, dict):
            yield from schema_errors(v[k], extra, f"{where}[{k!r}]")


def _k_items(v: Any, sub: dict[str, Any], _s: dict[str, Any], where: str) -> Iterator[str]:
    if isinstance(v, list):
        for i, item in enumerate(v):
            yield from schema_errors(item, sub, f"{where}[{i}]")


def _k_minimum(v: Any, low: float, _s: dict[str, Any], where: str) -> Iterator[str]:
    if _TYPES["number"](v) and v < low:
        yield f"{where}: expected >= {low}, found {v}"


def _k_multiple(v: Any, base: int, _s: dict[str, Any], where: str) -> Iterator[str]:
    if _TYPES["number"](v) and v % base:
        yield f"{where}: expected a multiple of {base}, found {v}"


def _k_pattern(v: Any, pattern: str, s: dict[str, Any], where: str) -> Iterator[str]:
    """A node's `description` says in words what its pattern means (a user should not have to
    read the regular expression)."""
    if isinstance(v, str) and not re.search(pattern, v):
        if isinstance(s.get("description"), str):
            yield f"{where}: {_short(v)} is not allowed here: {s['description']}"
        else:
            yield f"{where}: {_short(v)} does not match {pattern!r}"


def _k_min_length(v: Any, n: int, _s: dict[str, Any], where: str) -> Iterator[str]:
    if isinstance(v, str) and len(v) < n:
        yield f"{where}: expected at least {n} characters, found {_short(v)}"


def _k_min_items(v: Any, n: int, _s: dict[str, Any], where: str) -> Iterator[str]:
    if isinstance(v, list) and len(v) < n:
        yield f"{where}: expected at least {n} items, found {len(v)}"


def _k_max_items(v: Any, n: int, _s: dict[str, Any], where: str) -> Iterator[str]:
    if isinstance(v, list) and len(v) > n:
        yield f"{where}: expected at most {n} items, found {len(v)}"


_KEYWORDS: dict[str, Callable[[Any, Any, dict[str, Any], str], Iterator[str]]] = {
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
    errors = list(schema_errors(manifest, schema()))
    if not errors:
        errors = _consistency_errors(manifest)
    return errors


def chunks_of(size: int, chunk: int) -> int:
    """Chunks of a `size`-byte file in a `sha256_chain` of `chunk`-byte chunks (at least one)."""
    return max(1, -(-size // chunk))


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
    layer_files = {entry["file"] for entry in m["layers"]}
    for i, f in enumerate(m["files"]):
        if f["path"].endswith(".safetensors") and "tensors" not in f:
            errors.append(f"manifest.files[{i}]: safetensors file without a tensor listing")
        if f["kind"] == "moe_layer" and f["path"] not in layer_files:
            errors.append(f"manifest.files[{i}]: moe_layer {f['path']!r} is not in manifest.layers")
        chain = f.get("sha256_chain")
        if chain is not None:
            if m["format_version"] < 2:
                errors.append(f"manifest.files[{i}]: sha256_chain needs format_version 2")
            want = chunks_of(f["size"], chain["chunk_size"]) - 1
            if len(chain["states"]) != want:
                errors.append(
                    f"manifest.files[{i}].sha256_chain: {len(chain['states'])} states, expected "
                    f"{want} for {f['size']} bytes in chunks of {chain['chunk_size']}"
                )
    n, n_p = m["model"]["intermediate_size"], m["model"]["intermediate_size_padded"]
    tile = m["kernel_abi"]["pad_tile"]
    if n_p != padded_intermediate(n, tile):
        errors.append(
            f"manifest.model.intermediate_size_padded: expected {padded_intermediate(n, tile)} "
            f"for n={n} and kernel_abi.pad_tile={tile}, found {n_p}"
        )
    listed = m["kernel_abi"].get("flashinfer_copy_free")
    if listed is not None:
        errors += _copy_free_errors(n_p, listed)
    elif m["format_version"] >= 2:
        errors.append(
            "manifest.kernel_abi: required key 'flashinfer_copy_free' is missing "
            "(format_version 2 records it; only version-1 manifests may omit it)"
        )
    return errors


def _copy_free_errors(n_p: int, listed: list[str]) -> list[str]:
    """The recorded copy-free releases must be what each checked release does with `n_p`;
    a release this moepack has not checked (recorded by a newer one) is taken as stated."""
    errors = []
    for rel in RELEASES:
        if rel.copy_free(n_p) != (rel.version in listed):
            does = "uses it as stored" if rel.copy_free(n_p) else "copies the weights"
            errors.append(
                f"manifest.kernel_abi.flashinfer_copy_free: FlashInfer {rel.version} {does} "
                f"at intermediate_size_padded={n_p}, but the manifest "
                f"{'omits' if rel.copy_free(n_p) else 'lists'} it"
            )
    if len(set(listed)) != len(listed):
        errors.append("manifest.kernel_abi.flashinfer_copy_free: a release is listed twice")
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


def extra_files(root: Path, listed: set[str]) -> list[Problem]:
    """Everything in the directory that the manifest does not list (a finished artifact has none)."""
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
# The manifest


def manifest_problems(root: Path) -> tuple[Manifest | None, list[Problem]]:
    """The manifest if usable; otherwise the reasons it is not (each makes the artifact unusable)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        return None, [Problem(None, None, f"{root} is not a directory")]
    why = unsafe_path(root, MANIFEST)
    if why:
        return None, [Problem(MANIFEST, None, why)]
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Problem(MANIFEST, None, "missing: not a moepack artifact, or unfinished")]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, [Problem(MANIFEST, None, f"unreadable: {exc}")]
    if isinstance(obj, dict) and not any(
        _same(obj.get("format_version"), v) for v in READ_VERSIONS
    ):
        found = obj.get("format_version")
        return None, [
            Problem(
                MANIFEST,
                None,
                f"format_version {found!r} is not supported (this moepack reads "
                f"{', '.join(map(str, READ_VERSIONS))})",
            )
        ]
    if isinstance(obj, dict) and obj.get("complete") is not True:
        return None, [
            Problem(MANIFEST, None, "completeness marker missing: the conversion did not finish")
        ]
    problems = [Problem(MANIFEST, None, e) for e in manifest_errors(obj)]
    if problems:
        return None, problems
    for rec in obj["files"]:
        why = unsafe_path(root, rec["path"])
        if why:
            problems.append(Problem(rec["path"], None, f"unsafe path: {why}"))
    if problems:
        return None, problems
    return Manifest.from_valid_json(obj), []


def read_manifest(root: Path) -> Manifest:
    """The validated manifest of the artifact at `root`; `ManifestError` naming every reason not."""
    manifest, problems = manifest_problems(Path(root))
    if manifest is None:
        first = problems[0]
        raise ManifestError(
            f"{root}: not a usable moepack artifact: "
            + ("; ".join(str(p) for p in problems) if len(problems) <= 3 else _lines(problems)),
            path=Path(root) / (first.file or ""),
            found=first.message,
        )
    return manifest


def _lines(problems: list[Problem]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"{count}:\n" + "\n".join(f"  {p}" for p in problems)


# ---------------------------------------------------------------------------------------------
# Listed files (everything but the hash)


@dataclass
class FileCheck:
    """The result of checking one listed file: its problems, its size and header (if sound)."""

    problems: list[Problem] = field(default_factory=list)
    size: int | None = None
    header: Header | None = None

    @property
    def readable(self) -> bool:
        """A regular file that can be hashed."""
        return self.size is not None


def check_file(root: Path, manifest: Manifest, rec: FileRecord) -> FileCheck:
    """Every check of one listed file short of hashing it."""
    rel = rec.path
    path = root / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        return FileCheck([Problem(rel, None, "listed in the manifest but missing")])
    except OSError as exc:
        return FileCheck([Problem(rel, None, f"cannot stat: {exc.strerror or exc}")])
    if not stat.S_ISREG(st.st_mode):
        return FileCheck([Problem(rel, None, "not a regular file")])
    out = FileCheck(size=st.st_size)
    if st.st_size != rec.size:
        out.problems.append(
            Problem(rel, None, f"size: expected {rec.size} bytes, found {st.st_size}")
        )
    if rec.tensors is not None:
        try:
            header = read_header(path, st.st_size)
        except HeaderError as exc:
            message = str(exc).removeprefix(f"{path}: ")
            out.problems.append(Problem(rel, None, f"safetensors header: {message}"))
            return out
        out.header = header
        out.problems += _compare_listing(rel, rec, header)
        if rec.kind == "moe_layer":
            out.problems += _check_layer(manifest, rel, header)
    return out


def _compare_listing(rel: str, rec: FileRecord, header: Header) -> list[Problem]:
    """The header must hold exactly the manifest's tensors, each with its dtype, shape, offsets."""
    problems = []
    listed = rec.tensors or {}
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
        wanted = want.to_json()
        for key in ("dtype", "shape", "data_offsets"):
            if wanted[key] != found[key]:
                problems.append(
                    Problem(rel, name, f"{key}: expected {wanted[key]}, found {found[key]}")
                )
    for name in header.tensors.keys() - listed.keys():
        problems.append(Problem(rel, name, "in the file but not listed in the manifest"))
    return problems


def _check_layer(manifest: Manifest, rel: str, header: Header) -> list[Problem]:
    """A layer file must hold exactly the tensors FORMAT.md section 2 prescribes, aligned."""
    mode = manifest.b12x_scale_mode
    specs = manifest.geometry.tensor_specs(mode)
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
        "format_version": str(manifest.format_version),
        "layer": str(manifest.layer_of_file(rel)),
    }
    if header.metadata != want_meta:
        problems.append(
            Problem(rel, None, f"__metadata__: expected {want_meta}, found {header.metadata}")
        )
    return problems


# ---------------------------------------------------------------------------------------------
# The whole artifact, short of hashes


@dataclass(frozen=True)
class ValidArtifact:
    """An artifact that passed every check but the hashes: its manifest and its parsed headers
    (by relative path), so a reader need not parse them again."""

    root: Path
    manifest: Manifest
    headers: dict[str, Header]


def validate_artifact(root: Path, manifest: Manifest | None = None) -> ValidArtifact:
    """Everything `verify --quick` checks; raises `ManifestError` (unusable, exit 2) or
    `VerificationError` (files disagree with the manifest, exit 1) listing every problem."""
    root = Path(root)
    if manifest is None:
        manifest = read_manifest(root)
    problems: list[Problem] = []
    headers: dict[str, Header] = {}
    for rec in manifest.files:
        check = check_file(root, manifest, rec)
        problems += check.problems
        if check.header is not None:
            headers[rec.path] = check.header
    problems += extra_files(root, {f.path for f in manifest.files})
    if problems:
        raise VerificationError(
            f"{root}: the artifact's files do not match its manifest: {_lines(problems)}",
            problems,
            path=root / (problems[0].file or ""),
        )
    return ValidArtifact(root, manifest, headers)
