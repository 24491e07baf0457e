"""The manifest as typed dataclasses: `Manifest.from_json` (validating) and `to_json`.

Readers get attributes with the types the schema promises instead of `dict[str, Any]` key reads;
`from_json` refuses anything the validator refuses (`ManifestError`, every violation listed), so a
missing key or a string where a number belongs can never surface later as a `KeyError` or a
wrong computation. `to_json` writes the same keys in the same order the writer always did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moepack.errors import ManifestError

from .constants import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from .flashinfer import copy_free_releases
from .specs import Geometry


def _drop_none(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Optional keys the schema types as non-null are left out rather than written as null."""
    return {k: v for k, v in obj.items() if not (k in keys and v is None)}


@dataclass(frozen=True)
class ToolInfo:
    name: str
    version: str
    torch: str | None = None
    safetensors: str | None = None

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ToolInfo:
        return cls(o["name"], o["version"], o.get("torch"), o.get("safetensors"))

    def to_json(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "version": self.version,
            "torch": self.torch,
            "safetensors": self.safetensors,
        }
        return _drop_none(d, "torch", "safetensors")


@dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class SourceInfo:
    """Where the checkpoint came from: a pinned hub commit or a local path, and its files."""

    type: str  # "hub" | "local"
    files: tuple[SourceFile, ...]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    path: str | None = None

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> SourceInfo:
        return cls(
            type=o["type"],
            files=tuple(SourceFile(f["path"], f["size"], f["sha256"]) for f in o["files"]),
            repo_id=o.get("repo_id"),
            revision=o.get("revision"),
            commit=o.get("commit"),
            path=o.get("path"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": self.path,
            "files": [f.to_json() for f in self.files],
        }


@dataclass(frozen=True)
class ModelInfo:
    """The model and the one MoE geometry all its converted layers share."""

    activation: str
    gated: bool
    moe_hidden_size: int
    intermediate_size: int
    intermediate_size_padded: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    model_type: str | None = None
    architectures: tuple[Any, ...] | None = None
    quant_algo: str | None = None
    num_hidden_layers: int | None = None
    hidden_size: int | None = None

    @property
    def geometry(self) -> Geometry:
        return Geometry(
            num_experts=self.num_experts,
            hidden=self.moe_hidden_size,
            intermediate=self.intermediate_size,
            intermediate_padded=self.intermediate_size_padded,
            gated=self.gated,
        )

    @classmethod
    def with_geometry(cls, geo: Geometry, **rest: Any) -> ModelInfo:
        """The model record of `geo` plus the non-geometry fields in `rest`."""
        return cls(
            gated=geo.gated,
            moe_hidden_size=geo.hidden,
            intermediate_size=geo.intermediate,
            intermediate_size_padded=geo.intermediate_padded,
            num_experts=geo.num_experts,
            **rest,
        )

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> ModelInfo:
        archs = o.get("architectures")
        return cls(
            activation=o["activation"],
            gated=o["gated"],
            moe_hidden_size=o["moe_hidden_size"],
            intermediate_size=o["intermediate_size"],
            intermediate_size_padded=o["intermediate_size_padded"],
            num_experts=o["num_experts"],
            top_k=o["top_k"],
            moe_layers=tuple(o["moe_layers"]),
            model_type=o.get("model_type"),
            architectures=None if archs is None else tuple(archs),
            quant_algo=o.get("quant_algo"),
            num_hidden_layers=o.get("num_hidden_layers"),
            hidden_size=o.get("hidden_size"),
        )

    def to_json(self) -> dict[str, Any]:
        d = {
            "model_type": self.model_type,
            "architectures": None if self.architectures is None else list(self.architectures),
            "quant_algo": self.quant_algo,
            "activation": self.activation,
            "gated": self.gated,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "moe_hidden_size": self.moe_hidden_size,
            "intermediate_size": self.intermediate_size,
            "intermediate_size_padded": self.intermediate_size_padded,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": list(self.moe_layers),
        }
        return _drop_none(d, "quant_algo", "num_hidden_layers", "hidden_size")


@dataclass(frozen=True)
class KernelAbi:
    """What the tensors were laid out for. `pad_tile` is the intermediate-size tile and
    `flashinfer_copy_free` the FlashInfer releases it avoids every run-time copy on
    (`moepack.format.flashinfer`)."""

    flashinfer: str
    pad_tile: int
    flashinfer_copy_free: tuple[str, ...]
    sf_block: int
    sf_layout: str
    w13_order: tuple[str, ...]
    alignment: int
    prefill_min_tokens: int

    @classmethod
    def from_json(cls, o: dict[str, Any], intermediate_padded: int) -> KernelAbi:
        """`intermediate_padded` derives `flashinfer_copy_free` where a version-1 manifest,
        written before moepack recorded it, omits it: which releases copy depends only on it."""
        listed = o.get("flashinfer_copy_free")
        return cls(
            flashinfer=o["flashinfer"],
            pad_tile=o["pad_tile"],
            flashinfer_copy_free=(
                copy_free_releases(intermediate_padded) if listed is None else tuple(listed)
            ),
            sf_block=o["sf_block"],
            sf_layout=o["sf_layout"],
            w13_order=tuple(o["w13_order"]),
            alignment=o["alignment"],
            prefill_min_tokens=o["prefill_min_tokens"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "flashinfer": self.flashinfer,
            "pad_tile": self.pad_tile,
            "flashinfer_copy_free": list(self.flashinfer_copy_free),
            "sf_block": self.sf_block,
            "sf_layout": self.sf_layout,
            "w13_order": list(self.w13_order),
            "alignment": self.alignment,
            "prefill_min_tokens": self.prefill_min_tokens,
        }


@dataclass(frozen=True)
class Fidelity:
    """How far a layer's b12x scales (and any gate/up requantization) moved from the source."""

    b12x_max_rel_err: float
    b12x_mean_rel_err: float
    b12x_flushed_scales: int | None = None
    requant_max_rel_err: float | None = None
    b12x_err_experts: int | None = None
    """Experts the b12x error was measured on (a sample unless --exact-fidelity)."""

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> Fidelity:
        return cls(
            o["b12x_max_rel_err"],
            o["b12x_mean_rel_err"],
            o.get("b12x_flushed_scales"),
            o.get("requant_max_rel_err"),
            o.get("b12x_err_experts"),
        )

    def to_json(self) -> dict[str, Any]:
        d = {
            "b12x_max_rel_err": self.b12x_max_rel_err,
            "b12x_mean_rel_err": self.b12x_mean_rel_err,
            "b12x_flushed_scales": self.b12x_flushed_scales,
            "requant_max_rel_err": self.requant_max_rel_err,
            "b12x_err_experts": self.b12x_err_experts,
        }
        return _drop_none(d, "b12x_flushed_scales", "requant_max_rel_err", "b12x_err_experts")


@dataclass(frozen=True)
class LayerRecord:
    layer: int
    source_prefix: str
    file: str
    fidelity: Fidelity
    gate_up_requantized_experts: int | None = None

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> LayerRecord:
        return cls(
            o["layer"],
            o["source_prefix"],
            o["file"],
            Fidelity.from_json(o["fidelity"]),
            o.get("gate_up_requantized_experts"),
        )

    def to_json(self) -> dict[str, Any]:
        d = {
            "layer": self.layer,
            "source_prefix": self.source_prefix,
            "file": self.file,
            "fidelity": self.fidelity.to_json(),
            "gate_up_requantized_experts": self.gate_up_requantized_experts,
        }
        return _drop_none(d, "gate_up_requantized_experts")


@dataclass(frozen=True)
class TensorRecord:
    """One safetensors header entry as the manifest lists it (offsets relative to the data)."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data_offsets": list(self.data_offsets),
        }


@dataclass(frozen=True)
class Sha256Chain:
    """Format v2: the file's SHA-256 state after every `chunk_size` bytes (`moepack.sha256chain`)."""

    chunk_size: int
    states: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "states": list(self.states)}


@dataclass(frozen=True)
class FileRecord:
    path: str
    kind: str  # "moe_layer" | "model_shard" | "model_file"
    size: int
    sha256: str
    tensors: dict[str, TensorRecord] | None = None
    sha256_chain: Sha256Chain | None = None

    @classmethod
    def from_json(cls, o: dict[str, Any]) -> FileRecord:
        tensors = o.get("tensors")
        return cls(
            o["path"],
            o["kind"],
            o["size"],
            o["sha256"],
            None
            if tensors is None
            else {
                name: TensorRecord(t["dtype"], tuple(t["shape"]), tuple(t["data_offsets"]))
                for name, t in tensors.items()
            },
            None
            if o.get("sha256_chain") is None
            else Sha256Chain(o["sha256_chain"]["chunk_size"], tuple(o["sha256_chain"]["states"])),
        )

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.tensors is not None:
            d["tensors"] = {name: t.to_json() for name, t in self.tensors.items()}
        if self.sha256_chain is not None:
            d["sha256_chain"] = self.sha256_chain.to_json()
        return d


@dataclass(frozen=True)
class Manifest:
    """A complete, valid v1 manifest (`manifest.json`)."""

    tool: ToolInfo
    source: SourceInfo
    target: str
    model: ModelInfo
    b12x_scale_mode: str
    kernel_abi: KernelAbi
    layers: tuple[LayerRecord, ...]
    files: tuple[FileRecord, ...]
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    complete: bool = True
    _by_path: dict[str, FileRecord] = field(init=False, repr=False, compare=False)

    _layer_of: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_path", {f.path: f for f in self.files})
        object.__setattr__(self, "_layer_of", {r.file: r.layer for r in self.layers})

    @property
    def geometry(self) -> Geometry:
        return self.model.geometry

    def file(self, path: str) -> FileRecord:
        """The record of the listed file `path` (KeyError if it is not listed)."""
        return self._by_path[path]

    def layer_of_file(self, path: str) -> int | None:
        """The MoE layer whose file is `path`, None if it is no layer's file."""
        return self._layer_of.get(path)

    def layer(self, layer: int) -> LayerRecord:
        """The record of MoE layer `layer` (KeyError if the artifact has no such layer)."""
        for rec in self.layers:
            if rec.layer == layer:
                return rec
        raise KeyError(layer)

    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST) -> Manifest:
        """A `Manifest` from parsed JSON; `ManifestError` listing every violation otherwise."""
        from .validate import manifest_errors  # validate builds on this module

        errors = manifest_errors(obj)
        if errors:
            raise ManifestError(
                f"{where}: not a valid moepack manifest:\n  " + "\n  ".join(errors),
                path=where,
                found=errors[0],
            )
        return cls.from_valid_json(obj)

    @classmethod
    def from_valid_json(cls, o: dict[str, Any]) -> Manifest:
        """`from_json` without validating: only for objects `manifest_errors` already passed."""
        return cls(
            format=o["format"],
            format_version=o["format_version"],
            tool=ToolInfo.from_json(o["tool"]),
            source=SourceInfo.from_json(o["source"]),
            target=o["target"],
            model=ModelInfo.from_json(o["model"]),
            b12x_scale_mode=o["b12x_scale_mode"],
            kernel_abi=KernelAbi.from_json(o["kernel_abi"], o["model"]["intermediate_size_padded"]),
            layers=tuple(LayerRecord.from_json(x) for x in o["layers"]),
            files=tuple(FileRecord.from_json(x) for x in o["files"]),
            complete=o["complete"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "tool": self.tool.to_json(),
            "source": self.source.to_json(),
            "target": self.target,
            "model": self.model.to_json(),
            "b12x_scale_mode": self.b12x_scale_mode,
            "kernel_abi": self.kernel_abi.to_json(),
            "layers": [x.to_json() for x in self.layers],
            "files": [x.to_json() for x in self.files],
            "complete": self.complete,
        }
