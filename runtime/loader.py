"""`load`: an artifact straight into per-layer `HybridMoE` modules, with copies and views only.

Everything that can refuse the artifact is checked before a weight byte is read: the format
version, the artifact's target against the device's SM, that the chosen backends exist for the
device, that the installed FlashInfer takes the manifest's b12x scale mode, and every layer
file's header against the tensor specs its geometry implies.

Reading. Each layer file becomes ONE device allocation of exactly its data size (from the first
tensor to the end of the file); every tensor is a `view(dtype).view(shape)` slice of it at its
header offset (all 4096-aligned, so every dtype view is legal). Nothing is computed on weights or
scales; the b12x MMA view is a strided view applied by `HybridMoE`. Peak device memory is
therefore the final footprint. How bytes get there depends on the device:

- CPU: `os.preadv` straight into the final tensor; no staging.
- Discrete GPU: large reads into two reused pinned host buffers, double-buffered: chunk i+1 is
  read from disk while chunk i is copied host-to-device (`non_blocking=True`) on a side stream;
  a buffer is reused only after the event of its previous copy completes. No pageable copies,
  no per-tensor copies. With `direct_io=True` the reads bypass the page cache (O_DIRECT; the
  pinned buffers are page aligned and every read offset is 4096-aligned), which can help cold
  loads on some disks and hurts warm ones: `benchmarks/load.py` measures both.
- Unified memory (`is_integrated`, e.g. DGX Spark GB10 / SM121): CPU and GPU share one DRAM
  pool, so a device copy would only double the footprint (the failure mode reported on Spark).
  The layer is read into one pinned (page-locked, device-mapped) host allocation and exposed to
  torch as a CUDA tensor through `__cuda_array_interface__` over the same pointer (valid under
  unified addressing), with no second copy. Untested here: no integrated GPU was available; the
  memory does not appear in `torch.cuda.memory_allocated`.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .format import ACTIVATIONS, B12X_MODES, PAD_PREFIX, TORCH_DTYPES, Geometry, read_manifest
from .hybrid import (
    BackendError,
    Capability,
    HybridMoE,
    LayerSpec,
    check_backend,
    default_backend,
)
from .safetensors_header import Header, TensorEntry, read_header

log = logging.getLogger("moepack.runtime")

CHUNK_BYTES = 64 << 20
"""Staging buffer size: large enough that syscall and launch overheads vanish, small enough
that two of them are a trivial amount of pinned memory."""


class CompatibilityError(ValueError):
    """The artifact cannot be served on this device or with this FlashInfer."""


@dataclass
class Artifact:
    """A loaded artifact: the manifest, one `HybridMoE` per source MoE layer index, and the
    default backend (a layer forced to another one says so in its own `.backend`)."""

    root: Path
    manifest: dict[str, Any]
    backend: str
    device: torch.device
    moe_layers: dict[int, HybridMoE] = field(default_factory=dict)
    load_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(m.storage.numel() for m in self.moe_layers.values())


def load(
    root: str | Path,
    device: str | torch.device | None = None,
    layers: Iterable[int] | None = None,
    verify: bool = False,
    backend: str | Mapping[int, str] | None = None,
    threshold: int = 64,
    *,
    max_decode_tokens: int | None = None,
    direct_io: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    capability: Capability | str = "detect",
) -> Artifact:
    """Load the MoE layers of the artifact at `root` onto `device` (default: cuda if present).

    `backend` is one of 'hybrid', 'cutlass', 'b12x', 'reference' for every layer, or a mapping
    layer -> backend overriding the device default per layer. `capability` overrides the
    detected `(major, minor)` (None = CPU) for planning and tests. `verify=True` checks every
    byte against the manifest first (`moepack verify`).
    """
    start = time.perf_counter()
    root = Path(root)
    manifest = read_manifest(root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cap = _capability(dev) if capability == "detect" else capability
    check_target(manifest["target"], cap)
    chosen = _select_layers(manifest, layers)
    per_layer = _resolve_backends(backend, chosen, cap)
    check_model(manifest)
    check_flashinfer(manifest["b12x_scale_mode"], set(per_layer.values()))
    if verify:
        _verify(root)
    headers = {layer: _checked_header(root, manifest, layer) for layer in chosen}
    art = Artifact(root, manifest, _summary_backend(backend, cap), dev)
    with _Reader(dev, direct_io, chunk_bytes) as reader:
        for layer in chosen:
            storage, tensors = reader.read_layer(headers[layer])
            art.moe_layers[layer] = HybridMoE(
                _layer_spec(manifest, layer),
                tensors,
                storage,
                per_layer[layer],
                threshold=threshold,
                max_decode_tokens=max_decode_tokens,
            )
    art.load_seconds = time.perf_counter() - start
    _log_load(art, cap, threshold)
    return art


# -- compatibility ----------------------------------------------------------------------------


def _capability(dev: torch.device) -> Capability:
    if dev.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(dev))  # type: ignore[return-value]


def check_target(target: str, capability: Capability) -> None:
    """An SM12x device must match the artifact's target; other devices fall back and may load."""
    if capability is None or capability[0] != 12:
        return
    device_target = f"sm12{capability[1]}"
    if target != device_target:
        raise CompatibilityError(
            f"artifact targets {target} but this GPU is {device_target.upper()}: reconvert with "
            f"`moepack convert ... --target {device_target}`"
        )


def check_model(manifest: dict[str, Any]) -> None:
    """Refuse activations and scale modes this runtime does not implement."""
    model = manifest["model"]
    if model["activation"] not in ACTIVATIONS:
        raise CompatibilityError(
            f"activation {model['activation']!r} is not supported (only {ACTIVATIONS})"
        )
    if manifest["b12x_scale_mode"] not in B12X_MODES:
        raise CompatibilityError(f"unknown b12x scale mode {manifest['b12x_scale_mode']!r}")


def check_flashinfer(b12x_mode: str, backends: set[str]) -> None:
    """The kernels the chosen backends call must exist in the installed FlashInfer; shared mode
    needs `B12xMoEWrapper.run(..., input_global_scale=...)` (FlashInfer 0.7.x)."""
    if backends & {"hybrid", "cutlass"}:
        _require("flashinfer.fused_moe", "cutlass_fused_moe")
    if backends & {"hybrid", "b12x"}:
        wrapper = _require("flashinfer", "B12xMoEWrapper")
        params = inspect.signature(wrapper.run).parameters
        if b12x_mode == "shared" and "input_global_scale" not in params:
            raise CompatibilityError(
                "this artifact uses b12x scale mode 'shared', which needs "
                "B12xMoEWrapper.run(input_global_scale=...) (FlashInfer >=0.7.2); the installed "
                "FlashInfer lacks it: upgrade it, or reconvert with --b12x-scales baked"
            )


def _require(module: str, name: str) -> Any:
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as exc:
        raise CompatibilityError(
            f"{module}.{name} is not available ({exc}); install `moepack[sm12x]` "
            "(flashinfer-python >=0.7.2,<0.8 with nvidia-cutlass-dsl and its cu13 libs)"
        ) from None


def _select_layers(manifest: dict[str, Any], layers: Iterable[int] | None) -> list[int]:
    available = [int(rec["layer"]) for rec in manifest["layers"]]
    if layers is None:
        return available
    chosen = [int(layer) for layer in layers]
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise ValueError(f"layers {missing} are not MoE layers of this artifact ({available})")
    return chosen


def _resolve_backends(
    backend: str | Mapping[int, str] | None, layers: list[int], cap: Capability
) -> dict[int, str]:
    base = default_backend(cap)
    if isinstance(backend, str):
        chosen = dict.fromkeys(layers, backend)
    else:
        overrides = dict(backend or {})
        unknown = sorted(set(overrides) - set(layers))
        if unknown:
            raise ValueError(f"backend overrides name layers that are not loaded: {unknown}")
        chosen = {layer: overrides.get(layer, base) for layer in layers}
    for name in set(chosen.values()):
        try:
            check_backend(name, cap)
        except BackendError as exc:
            raise CompatibilityError(str(exc)) from None
    return chosen


def _summary_backend(backend: str | Mapping[int, str] | None, cap: Capability) -> str:
    return backend if isinstance(backend, str) else default_backend(cap)


def _verify(root: Path) -> None:
    from .verify import verify_artifact

    report = verify_artifact(root)
    if report.exit_code != 0:
        raise CompatibilityError(f"verification failed:\n{report.format_text()}")


def _layer_record(manifest: dict[str, Any], layer: int) -> dict[str, Any]:
    return next(rec for rec in manifest["layers"] if int(rec["layer"]) == layer)


def _layer_spec(manifest: dict[str, Any], layer: int) -> LayerSpec:
    model = manifest["model"]
    return LayerSpec(
        layer=layer,
        geometry=Geometry.from_manifest(model),
        top_k=int(model["top_k"]),
        activation=model["activation"],
        b12x_mode=manifest["b12x_scale_mode"],
    )


def _shape_ok(expected: tuple[int, ...], actual: tuple[int, ...]) -> bool:
    """Exact, except that a one-element scalar may be stored 0-d or `[1]`."""
    if expected == actual:
        return True
    return len(expected) <= 1 and len(actual) <= 1 and _numel(expected) == _numel(actual) == 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _checked_header(root: Path, manifest: dict[str, Any], layer: int) -> Header:
    """The layer file's header, refused unless it holds exactly the tensors FORMAT.md requires."""
    path = root / _layer_record(manifest, layer)["file"]
    header = read_header(path)
    specs = Geometry.from_manifest(manifest["model"]).tensor_specs(manifest["b12x_scale_mode"])
    found = {n: t for n, t in header.tensors.items() if not n.startswith(PAD_PREFIX)}
    if set(found) != set(specs):
        raise CompatibilityError(
            f"{path}: tensors {sorted(found)} do not match the format's {sorted(specs)}"
        )
    for name, (dtype, shape) in specs.items():
        t = found[name]
        if t.dtype != dtype or not _shape_ok(shape, t.shape):
            raise CompatibilityError(
                f"{path}: {name} is {t.dtype}{list(t.shape)}, expected {dtype}{list(shape)}"
            )
    return header


# -- reading ----------------------------------------------------------------------------------


def pread_into(fd: int, dst: memoryview, offset: int) -> None:
    """Fill `dst` from `fd` at `offset`, looping over short reads (the kernel caps one at ~2 GiB)."""
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file at offset {offset + done}")
        done += n


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def layer_views(storage: torch.Tensor, header: Header) -> dict[str, torch.Tensor]:
    """Every non-filler tensor of `header` as a view into `storage` (the file's data bytes)."""
    out = {}
    for name, entry in header.tensors.items():
        if not name.startswith(PAD_PREFIX):
            out[name] = _view(storage, entry, header.data_start)
    return out


def _view(storage: torch.Tensor, entry: TensorEntry, base: int) -> torch.Tensor:
    raw = storage[entry.start - base : entry.end - base]
    return raw.view(TORCH_DTYPES[entry.dtype]).view(entry.shape)


def _data_size(header: Header) -> int:
    return max((t.end for t in header.tensors.values()), default=header.data_start) - (
        header.data_start
    )


class _Reader:
    """Moves layer files onto one device, reusing its staging buffers across layers."""

    def __init__(self, device: torch.device, direct_io: bool, chunk_bytes: int) -> None:
        self.device = device
        self.direct_io = direct_io
        self.chunk = max(4096, chunk_bytes // 4096 * 4096)
        self.integrated = device.type == "cuda" and bool(
            getattr(torch.cuda.get_device_properties(device), "is_integrated", False)
        )
        self.staged = device.type == "cuda" and not self.integrated
        if self.staged:
            self.buffers = [
                torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
            self.views = [_bytes_of(b) for b in self.buffers]
            self.events: list[torch.cuda.Event | None] = [None, None]
            self.stream = torch.cuda.Stream(device)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.staged:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def read_layer(self, header: Header) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nbytes = _data_size(header)
        if self.staged:
            storage = self._read_staged(header.path, header.data_start, nbytes)
        elif self.integrated:
            storage = self._read_mapped(header.path, header.data_start, nbytes)
        else:
            storage = torch.empty(nbytes, dtype=torch.uint8)
            self._read_host(header.path, header.data_start, _bytes_of(storage))
        return storage, layer_views(storage, header)

    def _read_host(self, path: Path, offset: int, dst: memoryview) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            pread_into(fd, dst, offset)
        finally:
            os.close(fd)

    def _read_mapped(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """Unified memory: one pinned host allocation, read in place, seen by CUDA as-is."""
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._read_host(path, offset, _bytes_of(host))
        return torch.as_tensor(_DeviceAlias(host), device=self.device)

    def _open(self, path: Path) -> int:
        direct = self.direct_io and all(b.data_ptr() % 4096 == 0 for b in self.buffers)
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
        return os.open(path, flags)

    def _read_staged(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        storage = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        storage.record_stream(self.stream)
        fd = self._open(path)
        try:
            for i, pos in enumerate(range(0, nbytes, self.chunk)):
                n = min(self.chunk, nbytes - pos)
                slot = i % 2
                if self.events[slot] is not None:
                    self.events[slot].synchronize()
                self._read_chunk(fd, slot, offset + pos, n)
                with torch.cuda.stream(self.stream):
                    storage[pos : pos + n].copy_(self.buffers[slot][:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.events[slot] = event
        finally:
            os.close(fd)
        return storage

    def _read_chunk(self, fd: int, slot: int, offset: int, n: int) -> None:
        """O_DIRECT needs a 4096-multiple length: round up inside the buffer; EOF ends it short."""
        want = -(-n // 4096) * 4096 if self.direct_io else n
        view = self.views[slot][:want]
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"unexpected end of file at offset {offset + done}")
            done += got


class _DeviceAlias:
    """`__cuda_array_interface__` over a pinned host allocation, for unified-memory devices."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": (host.numel(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "version": 3,
            "strides": None,
        }


def _log_load(art: Artifact, cap: Capability, threshold: int) -> None:
    per = sorted({m.backend for m in art.moe_layers.values()})
    where = "CPU" if cap is None else f"SM{cap[0]}{cap[1]}"
    detail = f"CUTLASS for T>={threshold}, b12x below" if per == ["hybrid"] else ", ".join(per)
    gib = art.nbytes / 2**30
    log.info(
        "moepack: %d MoE layers from %s on %s (%s): backend %s (%s), b12x scales %s, "
        "%.2f GiB in %.2f s",
        len(art.moe_layers),
        art.root,
        art.device,
        where,
        art.backend,
        detail,
        art.manifest["b12x_scale_mode"],
        gib,
        art.load_seconds,
    )
