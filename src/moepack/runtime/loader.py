"""`load`: an artifact straight into per-layer `HybridMoE` modules, with copies and views only.

Everything that can refuse the artifact is checked before a weight byte is read: the artifact's
target against the device's SM, that the chosen backends exist for the device, that the installed
FlashInfer takes the manifest's b12x scale mode, and everything `moepack verify --quick` checks
(the format's one validator, `moepack.format.validate`: manifest schema and types, path
containment, sizes, every header against the manifest and the tensor specs its geometry
implies, no unlisted files). `verify=True` adds the byte hashes; nothing else differs.

Reading. Each layer file becomes ONE device allocation of exactly its data size (from the first
tensor to the end of the file); every tensor is a `view(dtype).view(shape)` slice of it at its
header offset (all 4096-aligned, so every dtype view is legal). Nothing is computed on weights or
scales; the b12x MMA view is a strided view applied by `HybridMoE`. Peak device memory is
therefore the final footprint. How bytes get there depends on the device:

All reads are `os.preadv` calls of `chunk_bytes` (default 32 MiB) in file order, spread over
`read_threads` threads (default `min(16, cpu_count)`; `os.preadv` releases the GIL, so a warm
load is no longer limited by one thread copying out of the page cache). Buffered reads advise the
kernel (`POSIX_FADV_SEQUENTIAL`, and `POSIX_FADV_WILLNEED` for a window of `readahead_bytes`
ahead of the reads) so that a cold load keeps the disk's queue full while the threads read.

- CPU: chunks are read straight into their ranges of the final tensor; no staging.
- Discrete GPU: a ring of `staging_buffers` reused pinned host buffers (default
  `read_threads + 2`). Each chunk is read into a free buffer by a worker thread; the main thread
  takes the chunks in file order and, as soon as one's read completes, copies it host-to-device
  (`non_blocking=True`) on a side stream and records an event; the read that next reuses the
  buffer waits for that event first (in its worker thread). No pageable copies, no per-tensor
  copies. With `direct_io=True` the reads bypass the page cache (O_DIRECT; the pinned buffers
  are page aligned and every read offset is 4096-aligned), which can help cold loads on some
  disks and hurts warm ones: `benchmarks/load.py` measures both.
- Unified memory (`is_integrated`, e.g. DGX Spark GB10 / SM121): CPU and GPU share one DRAM
  pool, so a device copy would only double the footprint (the failure mode reported on Spark).
  The layer is read into one pinned (page-locked, device-mapped) host allocation and exposed to
  torch as a CUDA tensor through `__cuda_array_interface__` over the same pointer (valid under
  unified addressing), with no second copy. Untested here: no integrated GPU was available; the
  memory does not appear in `torch.cuda.memory_allocated`.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moepack.errors import CompatibilityError, UsageError, VerificationError
from moepack.format import ACTIVATIONS, B12X_MODES, PAD_PREFIX, Manifest
from moepack.format.header import Header, TensorEntry
from moepack.format.validate import read_manifest, validate_artifact
from moepack.sizes import human_bytes

from . import hostmem
from .devices import check_device
from .dtypes import TORCH_DTYPES
from .flashinfer_env import check_environment, warn_runtime_copies
from .hybrid import (
    Capability,
    HybridMoE,
    LayerSpec,
    check_backend,
    default_backend,
)

log = logging.getLogger("moepack.runtime")

CHUNK_BYTES = 32 << 20
"""One read (and one staging buffer): large enough that syscall and launch overheads vanish,
small enough that a layer splits into many chunks for the threads and that the ring of pinned
buffers stays a few hundred MiB."""

READ_THREADS = min(16, os.cpu_count() or 1)
"""Threads reading chunks in parallel. One thread copies ~7 GB/s out of the page cache on the
16-core H100 host, 16 threads 33.5 GB/s (8: 26.2, 4: 17.6; benchmarks/load.py); pinned H2D
runs ~45-55 GB/s. More threads than cores are slower (16-core H200 host: warm loads 28 GB/s
with 16 threads, 24-26 with 24 or 32; benchmarks/load_sweep.py)."""

HOST_PATHS = ("staged", "registered")
HOST_PATH = "staged"
"""How a discrete GPU gets page-cache bytes: `staged` reads them into pinned buffers first;
`registered` maps the file and page-locks the mapped page-cache pages (cudaHostRegister) so
the DMA reads them in place, one host copy fewer (`benchmarks/load.py` times both)."""

DIRECT_BELOW = 0.5
"""With `direct_io=None` (the default) a layer file less than this share of which is in the page
cache is read with O_DIRECT (where the filesystem allows it): a cold read straight from the disk
into pinned buffers beats the page cache's readahead, and a warm one stays in memory."""

READAHEAD_BYTES = 256 << 20
"""How far ahead of the reads buffered loads ask the kernel to read (POSIX_FADV_WILLNEED);
0 turns it off."""


@dataclass(repr=False)
class Artifact:
    """A loaded artifact: the manifest, one `HybridMoE` per source MoE layer index, and the
    default backend (a layer forced to another one says so in its own `.backend`). Its repr is
    one line; the manifest is in `.manifest`."""

    root: Path
    manifest: Manifest
    backend: str
    device: torch.device
    moe_layers: dict[int, HybridMoE] = field(default_factory=dict)
    load_seconds: float = 0.0
    read_paths: list[str] = field(default_factory=list)
    """How each layer file reached the device (direct, buffered, registered; empty on CPU)."""

    @property
    def nbytes(self) -> int:
        return sum(m.storage.numel() for m in self.moe_layers.values())

    def warmup(self, token_counts: Iterable[int] | None = None) -> dict[int, list[tuple[str, int]]]:
        """`HybridMoE.warmup` on every loaded layer (before capturing CUDA graphs)."""
        return {layer: moe.warmup(token_counts) for layer, moe in self.moe_layers.items()}

    def __repr__(self) -> str:
        return (
            f"Artifact({str(self.root)!r}, target={self.manifest.target}, "
            f"device={self.device}, backend={self.backend}, "
            f"moe_layers={sorted(self.moe_layers)}, {human_bytes(self.nbytes)})"
        )


def load(
    root: str | Path,
    device: str | torch.device | None = None,
    layers: Iterable[int] | None = None,
    verify: bool = False,
    backend: str | Mapping[int, str] | None = None,
    threshold: int = 64,
    *,
    max_decode_tokens: int | None = None,
    direct_io: bool | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    read_threads: int | None = None,
    staging_buffers: int | None = None,
    readahead_bytes: int = READAHEAD_BYTES,
    host_path: str = HOST_PATH,
    capability: Capability | str = "detect",
    warmup: bool | Iterable[int] = False,
) -> Artifact:
    """Load the MoE layers of the artifact at `root` onto `device` (default: cuda if present).

    `backend` is one of 'hybrid', 'cutlass', 'b12x', 'reference' for every layer, or a mapping
    layer -> backend overriding the device default per layer. `capability` overrides the
    detected `(major, minor)` (None = CPU) for planning and tests. `verify=True` checks every
    byte against the manifest first (`moepack verify`). `read_threads` (default
    `READ_THREADS`), `staging_buffers` (pinned buffers on a discrete GPU, default
    `read_threads + 2`), `chunk_bytes` and `readahead_bytes` tune the reads; none changes a byte.
    `direct_io`: True/False forces O_DIRECT or buffered reads on a discrete GPU; None (default)
    picks O_DIRECT for a layer file mostly absent from the page cache (`DIRECT_BELOW`).
    `host_path` ('staged' or 'registered', see `HOST_PATH`) is how cached bytes reach the GPU.
    `warmup` (True, or the batch sizes to warm) runs `Artifact.warmup` before returning: one
    eager call per layer, kernel path and batch size, needed before CUDA-graph capture.
    """
    if host_path not in HOST_PATHS:
        raise ValueError(f"host_path {host_path!r}: choose one of {', '.join(HOST_PATHS)}")
    start = time.perf_counter()
    root = Path(root)
    manifest = read_manifest(root)
    dev = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device is None
        else check_device(
            device,
            only="moepack loads artifacts onto 'cpu' or 'cuda' only (the tensors would stay on "
            "the CPU)",
            hint="load(DIR, device='cpu', backend='reference') runs every layer on the CPU",
        )
    )
    if isinstance(capability, str):
        if capability != "detect":
            raise UsageError(
                f"capability must be 'detect', None or (major, minor), not {capability!r}"
            )
        cap = _capability(dev)
    else:
        cap = capability
    check_target(manifest.target, cap)
    chosen = _select_layers(manifest, layers)
    per_layer = _resolve_backends(backend, chosen, cap)
    check_model(manifest)
    check_flashinfer(manifest.b12x_scale_mode, set(per_layer.values()))
    for name in sorted(set(per_layer.values())):
        check_environment(name)
    warn_runtime_copies(manifest, per_layer)
    valid = validate_artifact(root, manifest)  # what verify --quick refuses, load refuses
    if verify:
        _verify(root)
    headers = {layer: valid.headers[manifest.layer(layer).file] for layer in chosen}
    art = Artifact(root, manifest, _summary_backend(backend, cap), dev)
    reader = _Reader(
        dev,
        direct_io,
        chunk_bytes,
        threads=read_threads,
        buffers=staging_buffers,
        readahead=readahead_bytes,
        host_path=host_path,
    )
    with reader:
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
    art.read_paths = list(reader.paths)
    if warmup is not False:
        art.warmup(None if warmup is True else warmup)
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


def check_model(manifest: Manifest) -> None:
    """Refuse activations and scale modes this runtime does not implement."""
    if manifest.model.activation not in ACTIVATIONS:
        raise CompatibilityError(
            f"activation {manifest.model.activation!r} is not supported (only {ACTIVATIONS})"
        )
    if manifest.b12x_scale_mode not in B12X_MODES:
        raise CompatibilityError(f"unknown b12x scale mode {manifest.b12x_scale_mode!r}")


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


def _select_layers(manifest: Manifest, layers: Iterable[int] | None) -> list[int]:
    available = [rec.layer for rec in manifest.layers]
    if layers is None:
        return available
    chosen = [int(layer) for layer in layers]
    if not chosen:
        raise UsageError(
            f"layers=[] selects no layer: pass layers=None for all, or some of {available}"
        )
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise UsageError(f"layers {missing} are not MoE layers of this artifact ({available})")
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
            raise UsageError(f"backend overrides name layers that are not loaded: {unknown}")
        chosen = {layer: overrides.get(layer, base) for layer in layers}
    for name in set(chosen.values()):
        check_backend(name, cap)
    return chosen


def _summary_backend(backend: str | Mapping[int, str] | None, cap: Capability) -> str:
    return backend if isinstance(backend, str) else default_backend(cap)


def _verify(root: Path) -> None:
    from .verify import verify_artifact

    report = verify_artifact(root)
    if report.exit_code != 0:
        raise VerificationError(
            f"verification failed:\n{report.format_text()}", report.problems, path=root
        )


def _layer_spec(manifest: Manifest, layer: int) -> LayerSpec:
    return LayerSpec(
        layer=layer,
        geometry=manifest.geometry,
        top_k=manifest.model.top_k,
        activation=manifest.model.activation,
        b12x_mode=manifest.b12x_scale_mode,
    )


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
    return t.numpy().data.cast("B")


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
    """Moves layer files onto one device, reusing its threads and staging buffers across layers."""

    def __init__(
        self,
        device: torch.device,
        direct_io: bool | None,
        chunk_bytes: int = CHUNK_BYTES,
        *,
        threads: int | None = None,
        buffers: int | None = None,
        readahead: int = READAHEAD_BYTES,
        host_path: str = HOST_PATH,
    ) -> None:
        self.device = device
        self.direct_io = direct_io
        self.host_path = host_path
        self.paths: list[str] = []
        """How each layer was read ('direct', 'buffered', 'registered'): benchmarks report it."""
        self.chunk = max(4096, chunk_bytes // 4096 * 4096)
        self.threads = max(1, READ_THREADS if threads is None else int(threads))
        self.readahead = max(0, readahead)
        self.integrated = device.type == "cuda" and bool(
            getattr(torch.cuda.get_device_properties(device), "is_integrated", False)
        )
        self.staged = device.type == "cuda" and not self.integrated
        if self.staged:
            count = max(2, self.threads + 2 if buffers is None else int(buffers))
            self.buffers = [
                torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True) for _ in range(count)
            ]
            self.views = [_bytes_of(b) for b in self.buffers]
            self.events: list[torch.cuda.Event | None] = [None] * count
            self.stream = torch.cuda.Stream(device)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="moepack-read")

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        if self.staged:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def read_layer(self, header: Header) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nbytes = _data_size(header)
        if self.staged:
            storage = self._read_discrete(header.path, header.data_start, nbytes)
        elif self.integrated:
            storage = self._read_mapped(header.path, header.data_start, nbytes)
        else:
            storage = torch.empty(nbytes, dtype=torch.uint8)
            self.read_into(header.path, header.data_start, _bytes_of(storage))
        return storage, layer_views(storage, header)

    # -- shared machinery ---------------------------------------------------------------------

    def _open(self, path: Path, direct: bool) -> int:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
        if not direct and self.readahead and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def _advise(self, fd: int, direct: bool, advised: int, pos: int, end: int) -> int:
        """Ask for the pages up to `readahead` past `pos` (not already asked for); returns the new
        high-water mark. A cold read then finds its pages coming in, whichever thread reads."""
        if direct or not self.readahead or not hasattr(os, "posix_fadvise"):
            return advised
        want = min(end, pos + self.readahead)
        if want - advised >= min(self.chunk, end - advised) > 0:
            os.posix_fadvise(fd, advised, want - advised, os.POSIX_FADV_WILLNEED)
            return want
        return advised

    @staticmethod
    def _drain(pending: Iterable[Future[None]]) -> None:
        """Wait for reads still in flight (after an error) before their fd or buffers go away."""
        for fut in pending:
            try:
                fut.result()
            except BaseException:  # the first error is the one being raised
                pass

    # -- CPU and unified memory: straight into the destination ------------------------------

    def read_into(self, path: Path, offset: int, dst: memoryview) -> None:
        """Fill `dst` with the file's bytes from `offset`: chunks in file order, read by the
        reader's threads into disjoint ranges of `dst`."""
        fd = self._open(path, False)
        pending: deque[Future[None]] = deque()
        try:
            advised = offset
            end = offset + len(dst)
            for pos in range(0, len(dst), self.chunk):
                advised = self._advise(fd, False, advised, offset + pos, end)
                if len(pending) >= 2 * self.threads:
                    pending.popleft().result()
                piece = dst[pos : pos + self.chunk]
                pending.append(self.pool.submit(pread_into, fd, piece, offset + pos))
            while pending:
                pending.popleft().result()
        finally:
            self._drain(pending)
            os.close(fd)

    def _read_mapped(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """Unified memory: one pinned host allocation, read in place, seen by CUDA as-is."""
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.read_into(path, offset, _bytes_of(host))
        return torch.as_tensor(_DeviceAlias(host), device=self.device)

    # -- discrete GPU -------------------------------------------------------------------------

    def _read_discrete(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """O_DIRECT for a file mostly not cached (when `direct_io` is None), else the cached
        pages: registered in place or staged through the pinned ring."""
        direct = self.direct_io
        if direct is None:
            direct = bool(getattr(os, "O_DIRECT", 0)) and (
                hostmem.resident_fraction(path, offset, nbytes) < DIRECT_BELOW
            )
        if direct:
            try:
                storage = self._read_staged(path, offset, nbytes, True)
                self.paths.append("direct")
                return storage
            except _NoDirect:
                if self.direct_io:
                    raise
        if self.host_path == "registered":
            registered = self._read_registered(path, offset, nbytes)
            if registered is not None:
                self.paths.append("registered")
                return registered
        self.paths.append("buffered")
        return self._read_staged(path, offset, nbytes, False)

    def _read_registered(self, path: Path, offset: int, nbytes: int) -> torch.Tensor | None:
        """Map the file, page-lock its pages window by window on the reader threads (the first
        registrations run ahead) and copy each window to the device as it is locked. Every
        window is unlocked and the file unmapped once the copies are done. None if the driver
        refuses a registration (nothing was copied from that window on)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            mapping = hostmem.Mapping(fd, os.fstat(fd).st_size)
        except OSError:
            return None
        finally:
            os.close(fd)
        storage = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        storage.record_stream(self.stream)
        lo = offset // hostmem.PAGE * hostmem.PAGE
        end = offset + nbytes
        windows = [(pos, min(self.chunk, end - pos)) for pos in range(lo, end, self.chunk)]
        submitted: list[tuple[int, Future[bool]]] = []
        refused = False
        try:
            for pos, n in windows[: self.threads]:
                submitted.append((mapping.addr + pos, self._lock(mapping, pos, n)))
            for i, (pos, n) in enumerate(windows):
                if not submitted[i][1].result():
                    refused = True
                    break
                first = max(pos, offset)
                src = torch.from_numpy(mapping.array(first, pos + n - first))
                with torch.cuda.stream(self.stream):
                    storage[first - offset : pos + n - offset].copy_(src, non_blocking=True)
                if len(submitted) < len(windows):
                    nxt = windows[len(submitted)]
                    submitted.append((mapping.addr + nxt[0], self._lock(mapping, *nxt)))
        finally:
            self.stream.synchronize()  # the copies read the pages: done before unlocking
            for addr, fut in submitted:
                with contextlib.suppress(BaseException):
                    if fut.result():
                        hostmem.cuda_unregister(addr)
            mapping.close()
        return None if refused else storage

    def _lock(self, mapping: hostmem.Mapping, pos: int, n: int) -> Future[bool]:
        return self.pool.submit(hostmem.cuda_register, mapping.addr + pos, n)

    # -- ring of pinned buffers -----------------------------------------------------------------

    def _read_staged(self, path: Path, offset: int, nbytes: int, direct: bool) -> torch.Tensor:
        """Chunk i goes to buffer i % len(buffers). Reads run ahead on the threads (each waits
        for its buffer's previous copy); copies are issued in file order as reads complete."""
        storage = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        storage.record_stream(self.stream)
        direct = direct and all(b.data_ptr() % 4096 == 0 for b in self.buffers)
        try:
            fd = self._open(path, direct)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:  # the filesystem refuses O_DIRECT
                raise _NoDirect(str(exc)) from None
            raise
        count = len(self.buffers)
        chunks = [(pos, min(self.chunk, nbytes - pos)) for pos in range(0, nbytes, self.chunk)]
        pending: deque[Future[None]] = deque()
        try:
            advised, end, queued = offset, offset + nbytes, 0
            while queued < min(count, len(chunks)):
                advised = self._advise(fd, direct, advised, offset + chunks[queued][0], end)
                pending.append(self._queue_chunk(fd, direct, queued, offset, chunks[queued]))
                queued += 1
            for i, (pos, n) in enumerate(chunks):
                pending.popleft().result()
                slot = i % count
                with torch.cuda.stream(self.stream):
                    storage[pos : pos + n].copy_(self.buffers[slot][:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.events[slot] = event
                if queued < len(chunks):
                    advised = self._advise(fd, direct, advised, offset + chunks[queued][0], end)
                    pending.append(self._queue_chunk(fd, direct, queued, offset, chunks[queued]))
                    queued += 1
        finally:
            self._drain(pending)
            os.close(fd)
        return storage

    def _queue_chunk(
        self, fd: int, direct: bool, i: int, offset: int, chunk: tuple[int, int]
    ) -> Future[None]:
        slot = i % len(self.buffers)
        return self.pool.submit(
            self._fill, fd, direct, slot, self.events[slot], offset + chunk[0], chunk[1]
        )

    def _fill(self, fd: int, direct: bool, slot: int, after: Any, offset: int, n: int) -> None:
        """Read `n` bytes at `offset` into buffer `slot` once its previous copy (`after`) is done.
        O_DIRECT needs a 4096-multiple length: round up inside the buffer; EOF ends it short."""
        if after is not None:
            after.synchronize()
        want = -(-n // 4096) * 4096 if direct else n
        view = self.views[slot][:want]
        done = 0
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"unexpected end of file at offset {offset + done}")
            done += got


class _NoDirect(OSError):
    """O_DIRECT is not supported for this file (e.g. tmpfs)."""


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
        art.manifest.b12x_scale_mode,
        gib,
        art.load_seconds,
    )
