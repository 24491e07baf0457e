"""Reading a hub-style ModelOpt checkpoint directory: config, quant config, tensor index, tensors."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from moepack.errors import CheckpointError, HeaderError, UnsupportedModel
from moepack.format.header import Header, TensorEntry, read_header
from moepack.runtime.dtypes import TORCH_DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
QUANT_CONFIG = "hf_quant_config.json"
SUPPORTED_ALGOS = ("NVFP4", "MIXED_PRECISION")
PASS_THROUGH_MAX = 64 << 20
"""Non-weight files up to this size (config, tokenizer, chat template, custom code) pass through."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")


@dataclass(frozen=True)
class QuantConfig:
    """Which modules are NVFP4, from `hf_quant_config.json` or `config.json:quantization_config`."""

    algo: str
    group_size: int
    quantized_layers: dict[str, str] = field(default_factory=dict)
    exclude_modules: tuple[str, ...] = ()

    @classmethod
    def parse(cls, obj: dict[str, Any], where: str) -> QuantConfig:
        algo = str(obj.get("quant_algo") or "").upper()
        if algo not in SUPPORTED_ALGOS:
            raise UnsupportedModel(
                f"{where}: quant_algo {obj.get('quant_algo')!r} is not NVFP4 or MIXED_PRECISION"
            )
        layers = {
            name: str((spec or {}).get("quant_algo", "")).upper()
            for name, spec in (obj.get("quantized_layers") or {}).items()
        }
        sizes = {int(obj.get("group_size") or 16)} | {
            int(spec.get("group_size", 16))
            for spec in (obj.get("quantized_layers") or {}).values()
            if isinstance(spec, dict) and str(spec.get("quant_algo", "")).upper() == "NVFP4"
        }
        if sizes != {16}:
            raise UnsupportedModel(f"{where}: NVFP4 group_size {sorted(sizes)} (only 16 is NVFP4)")
        if algo == "MIXED_PRECISION" and "NVFP4" not in layers.values():
            raise UnsupportedModel(f"{where}: MIXED_PRECISION config lists no NVFP4 module")
        return cls(algo, 16, layers, tuple(obj.get("exclude_modules") or ()))

    def is_nvfp4(self, module: str) -> bool:
        if self.algo == "MIXED_PRECISION":
            return self.quantized_layers.get(module) == "NVFP4"
        return not any(fnmatch.fnmatchcase(module, pat) for pat in self.exclude_modules)


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def load_quant_config(root: Path, config: dict[str, Any]) -> QuantConfig:
    """`hf_quant_config.json` when present (ModelOpt's own file), else `config.json`'s copy."""
    path = Path(root) / QUANT_CONFIG
    if path.exists():
        obj = read_json(path)
        return QuantConfig.parse(obj.get("quantization", obj), str(path))
    if isinstance(config.get("quantization_config"), dict):
        return QuantConfig.parse(config["quantization_config"], f"{root}/config.json")
    raise UnsupportedModel(f"{root}: no {QUANT_CONFIG} and no quantization_config in config.json")


def is_pass_through(name: str, size: int) -> bool:
    """Model files that travel with the artifact unchanged (weights are handled separately)."""
    top = name.split("/")[0]
    return (
        not top.startswith(".")
        and not name.endswith(_WEIGHT_SUFFIXES)
        and name != INDEX
        and size <= PASS_THROUGH_MAX
    )


def weight_map_of(root: Path, header: Callable[[str], Header]) -> dict[str, str]:
    """Tensor name -> shard, from the index, or from the one file's header when there is none."""
    if (root / INDEX).exists():
        weight_map = read_json(root / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{root / INDEX}: no weight_map", path=root / INDEX)
        return {str(k): str(v) for k, v in weight_map.items()}
    if (root / SINGLE).exists():
        return dict.fromkeys(header(SINGLE).tensors, SINGLE)
    raise CheckpointError(f"{root}: neither {INDEX} nor {SINGLE}", path=root)


class Files(Protocol):
    """Where a checkpoint's files come from (`moepack.convert.source.Source`): local paths on
    demand (a hub source waits for a file's download), and the headers, sizes and pass-through
    list that planning needs before the bytes are there."""

    def path(self, name: str) -> Path: ...

    def header(self, name: str) -> Header: ...

    def size(self, name: str) -> int: ...

    def ready(self, name: str) -> bool: ...

    def pass_through_files(self) -> list[str]: ...


class Checkpoint:
    """A checkpoint's tensors, read lazily, one file handle per shard.

    Standing alone, `Checkpoint(root)` reads a local directory's config, quant config and index.
    `moepack.convert.source.Source` builds it from what it has already parsed (`config`,
    `quant`, `weight_map`), handing out the files themselves as `files`, so nothing is read
    twice.
    """

    def __init__(
        self,
        root: Path,
        *,
        config: dict[str, Any] | None = None,
        quant: QuantConfig | None = None,
        weight_map: dict[str, str] | None = None,
        files: Files | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")
        self._source = files
        self.config = read_json(self.root / "config.json") if config is None else config
        self.quant = load_quant_config(self.root, self.config) if quant is None else quant
        # The caches exist before the weight map is built: a single-file checkpoint's map is
        # read from its header (ModelOpt writes that layout for small models).
        self._headers: dict[str, Header] = {}
        self._files: dict[str, BinaryIO] = {}
        self.weight_map = (
            weight_map_of(self.root, self.header) if weight_map is None else weight_map
        )

    def path(self, name: str) -> Path:
        """The local path of the checkpoint file `name` (fetched first if the source must)."""
        return self._source.path(name) if self._source is not None else self.root / name

    def size(self, name: str) -> int:
        """The size of the checkpoint file `name` (known before a hub source fetches it)."""
        return (
            self._source.size(name) if self._source is not None else self.path(name).stat().st_size
        )

    def ready(self, tensors: list[str]) -> bool:
        """Whether the shards holding `tensors` can be read now (a hub source's may still be
        downloading)."""
        if self._source is None:
            return True
        shards = {self.weight_map[t] for t in tensors if t in self.weight_map}
        return all(self._source.ready(shard) for shard in shards)

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def header(self, shard: str) -> Header:
        if shard not in self._headers:
            try:
                self._headers[shard] = (
                    read_header(self.path(shard))
                    if self._source is None
                    else self._source.header(shard)
                )
            except HeaderError as exc:
                raise CheckpointError(str(exc)) from None
        return self._headers[shard]

    def where(self, name: str) -> Path | None:
        """The shard file holding tensor `name` (None when the index does not list it)."""
        shard = self.weight_map.get(name)
        return None if shard is None else self.root / shard

    @contextmanager
    def naming_shards(self) -> Iterator[None]:
        """Errors about a tensor (raised by code that sees only tensor names, e.g. the
        transform) come out naming the shard file that holds it."""
        try:
            yield
        except CheckpointError as exc:
            shard = self.where(exc.tensor) if exc.tensor and exc.path is None else None
            if shard is None:
                raise
            raise type(exc)(
                f"{shard}: {exc.message}",
                path=shard,
                tensor=exc.tensor,
                expected=exc.expected,
                found=exc.found,
            ) from None

    def entry(self, name: str) -> TensorEntry:
        """The header entry (dtype, shape, absolute byte range) of tensor `name`, from its
        shard's header alone (a hub source need not have the shard yet); errors name shard and
        tensor."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(
                f"{self.root}: tensor {name!r} is not in the checkpoint index", tensor=name
            )
        entry = self.header(shard).tensors.get(name)
        if entry is None:
            raise CheckpointError(
                f"{self.root / shard}: tensor {name!r} is not in this shard",
                path=self.root / shard,
                tensor=name,
            )
        if entry.dtype not in TORCH_DTYPES:
            raise CheckpointError(
                f"{self.root / shard}: tensor {name!r}: dtype {entry.dtype}",
                path=self.root / shard,
                tensor=name,
            )
        return entry

    def locate(self, name: str) -> tuple[int, TensorEntry]:
        """An open file descriptor of the shard holding `name` and its header entry, so that
        callers can read a tensor's bytes straight into their own buffers."""
        entry = self.entry(name)
        shard = self.weight_map[name]
        if shard not in self._files:
            self._files[shard] = open(self.path(shard), "rb")  # noqa: SIM115 (closed in close())
        return self._files[shard].fileno(), entry

    def short_read(self, name: str) -> CheckpointError:
        """The error for a tensor whose byte range runs past the end of its shard."""
        shard = self.root / self.weight_map[name]
        return CheckpointError(
            f"{shard}: tensor {name!r}: file ends early", path=shard, tensor=name
        )

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with a positioned read (no mmap: a converted layer's source pages are
        not kept mapped, so resident memory stays about one layer); errors name shard and tensor."""
        fd, entry = self.locate(name)
        data = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes and os.preadv(fd, [data.numpy().data], entry.start) != entry.nbytes:
            raise self.short_read(name)
        return data.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)

    def pass_through_files(self) -> list[str]:
        if self._source is not None:
            return self._source.pass_through_files()
        return self.pass_through_files_of(self.root)

    @staticmethod
    def pass_through_files_of(root: Path) -> list[str]:
        """The files under `root` that pass through unchanged (`is_pass_through`)."""
        return sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and is_pass_through(str(p.relative_to(root)), p.stat().st_size)
        )

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
