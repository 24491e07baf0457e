"""The conversion job: source -> per-layer files -> pass-through -> manifest, resumable.

Order matters for crash safety: every file is written under a temporary name and renamed; each
finished file is recorded in `.moepack-partial/state.json`; `manifest.json` is written last and
its presence is what makes the directory an artifact. A rerun with the same job keeps recorded
files whose bytes still hash to the recorded sha256 and redoes the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch

import moepack
from moepack import sha256chain
from moepack.errors import (
    CheckpointError,
    ConvertError,
    DiskSpaceError,
    UsageError,
)
from moepack.format import (
    Fidelity,
    FileRecord,
    Geometry,
    KernelAbi,
    LayerRecord,
    Manifest,
    ModelInfo,
    SourceInfo,
    ToolInfo,
)
from moepack.format import constants as fmt
from moepack.format.flashinfer import DEFAULT_PAD_TILE, PAD_TILES, copy_free_releases
from moepack.format.validate import manifest_errors
from moepack.runtime.devices import check_device
from moepack.runtime.verify import sha256_file

from .checkpoint import (
    INDEX,
    Checkpoint,
)
from .moe_layers import MoELayer
from .outdir import (
    OutputLock,
    check_free_space,
    check_not_source,
    foreign_files,
    prune_empty,
    refuse_foreign,
)
from .source import SourceRecord, open_source
from .transform import convert_layer, geometry_of
from .writer import (
    TMP_SUFFIX,
    Blob,
    WrittenFile,
    copy_file,
    planned_safetensors_size,
    write_json,
    write_safetensors,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("moepack.convert")

PARTIAL = ".moepack-partial"
STATE = f"{PARTIAL}/state.json"


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at 2: with one arena per thread (torch's pool, the fidelity
    and writer threads) freed layer temporaries stay resident; on a 16-core host a two-layer
    conversion peaked at 9.9 GB RSS, 4.6 GB with MALLOC_ARENA_MAX=2. No-op without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8
    mallopt(m_arena_max, 2)


class _State:
    """Finished-file records of an interrupted job, valid only for the same job fingerprint.

    Nothing recorded is trusted until `reusable` has checked the file's size and sha256; what
    was kept after that check and what was written are counted for the summary.
    """

    def __init__(
        self, out: Path, fingerprint: dict[str, Any], settle: Callable[[], None] | None = None
    ) -> None:
        self.out, self.fingerprint, self._settle = out, fingerprint, settle
        self.done: dict[str, dict[str, Any]] = {}
        self.recorded: set[str] = set()
        """Every file any earlier job's state lists (moepack wrote them, whatever the job)."""
        self.kept: list[str] = []
        self.written: list[str] = []
        self._checked: dict[str, bool] = {}
        path = out / STATE
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if not isinstance(data, dict):
                data = {}
            if isinstance(data.get("done"), dict):
                self.recorded = set(data["done"])
            if data.get("fingerprint") == fingerprint:
                self.done = data.get("done", {})
            elif data:
                log.info("previous partial job differs; starting over")

    def seed(self, manifest: dict[str, Any]) -> None:
        """Take a finished manifest's files as this job's records (a rerun of the same job)."""
        geo = ModelInfo.from_json(manifest["model"]).geometry.__dict__
        by_path = {f["path"]: f for f in manifest["files"]}
        self.done = {rel: {"file": rec} for rel, rec in by_path.items()}
        for layer in manifest["layers"]:
            self.done[layer["file"]] = {
                "file": by_path[layer["file"]],
                "geometry": dict(geo),
                "fidelity": layer["fidelity"],
                "gate_up_requantized_experts": layer["gate_up_requantized_experts"],
            }

    def discard(self) -> None:
        self.done = {}

    def check(self, relpath: str) -> bool:
        """Whether the file on disk still has its recorded size and sha256 (hashed once)."""
        if relpath not in self._checked:
            rec = self.done.get(relpath)
            path = self.out / relpath
            self._checked[relpath] = (
                rec is not None
                and path.is_file()
                and not path.is_symlink()
                and path.stat().st_size == rec["file"]["size"]
                and sha256_file(path) == rec["file"]["sha256"]
            )
        return self._checked[relpath]

    def reusable(self, relpath: str) -> dict[str, Any] | None:
        """The record of `relpath` if the file on disk still has its recorded bytes."""
        if not self.check(relpath):
            return None
        self.kept.append(relpath)
        return self.done[relpath]

    def size_matches(self, relpath: str) -> bool:
        """Cheap pre-check for planning: recorded and of the recorded size (not yet hashed)."""
        rec = self.done.get(relpath)
        path = self.out / relpath
        return rec is not None and path.is_file() and path.stat().st_size == rec["file"]["size"]

    def add(self, relpath: str, record: dict[str, Any]) -> None:
        self.done[relpath] = record
        self._checked[relpath] = True
        self.written.append(relpath)
        if self._settle is not None:  # the fingerprint's source hashes are needed from here on
            self._settle()
            self._settle = None
        write_json(self.out, STATE, {"fingerprint": self.fingerprint, "done": self.done})


def _job_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The job fingerprint a finished manifest was written by."""
    return {
        "tool": manifest.get("tool", {}).get("version"),
        "format_version": manifest.get("format_version"),
        "target": manifest.get("target"),
        "b12x_scales": manifest.get("b12x_scale_mode"),
        "pad_tile": manifest.get("kernel_abi", {}).get("pad_tile"),
        "moe_only": all(f.get("kind") == "moe_layer" for f in manifest.get("files", [])),
        "source": manifest.get("source", {}).get("files"),
    }


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    """The moepack manifest at `out`, or None when there is none (or it is not moepack's: then
    `manifest.json` counts as a file moepack did not write)."""
    path = out / fmt.MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        return None
    if not isinstance(manifest.get("files"), list):
        return None
    return manifest


def _listed(manifest: dict[str, Any] | None) -> set[str]:
    if manifest is None:
        return set()
    return {str(f.get("path")) for f in manifest["files"] if isinstance(f, dict)}


def _remove_files(out: Path, rels: Iterable[str]) -> None:
    """Remove files moepack wrote under `out` (never following a symlink out of it)."""
    root = out.resolve()
    for rel in rels:
        path = out / rel
        if path.is_symlink() or (path.is_file() and path.resolve().is_relative_to(root)):
            path.unlink()


class _NoBar:
    """Stands in for tqdm where it is not installed (a runtime-only install converting a local
    checkpoint): no bar, same calls."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=False)


HASH_WORKERS = max(2, min(4, (os.cpu_count() or 1) // 2))
"""Threads hashing and fsyncing layer files (a file's hash and its fsync are two tasks). A
file's sha256 is one serial stream (~1.2 GB/s on one core, slower than a fast disk takes the
bytes), so files are hashed from the page cache on these threads while the next layers are
converted and written."""


@dataclass
class _InFlight:
    """A converted layer whose file is being written, or written and being hashed and synced."""

    moe: MoELayer
    rel: str
    writing: Future[tuple[WrittenFile, Future[tuple[str, list[str]]], Future[None]]]
    rec: dict[str, Any]

    def ready(self) -> bool:
        if not self.writing.done():
            return False
        if self.writing.exception() is not None:
            return True
        _, hashing, syncing = self.writing.result()
        return hashing.done() and syncing.done()


class _HashFollower:
    """Hashes a file while it is being written, from the page cache, a little behind the writer.

    A file's sha256 is one serial stream (~1.2 GB/s on one core, slower than a write hands
    bytes to the page cache): hashed only after the write, the last layer's hash came on top of
    its write (2.95 s for both on the H200 host, warm). Following the writer, the hash ends
    about when it would have taken alone. The writer reports each write (`advance`); the first
    report opens the temporary file, so the rename that ends the write cannot race the reader.
    """

    def __init__(self, tmp: Path, rel: str) -> None:
        self.tmp, self.rel = tmp, rel
        self.fd: int | None = None
        self.written = 0
        self.size: int | None = None
        self.failed = False
        self.cond = threading.Condition()

    def advance(self, written: int) -> None:
        with self.cond:
            if self.fd is None:
                self.fd = os.open(self.tmp, os.O_RDONLY)
            self.written = written
            self.cond.notify()

    def finish(self, size: int) -> None:
        with self.cond:
            self.size = size
            self.cond.notify()

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify()

    def _next(self, pos: int) -> int | None:
        """The end of the next range to hash: whole `WINDOW`s until the write is done, then the
        rest; None once the write failed."""
        window = sha256chain.WINDOW
        with self.cond:
            while not self.failed and self.size is None and self.written - pos < window:
                self.cond.wait()
            if self.failed:
                return None
            if self.size is not None:
                return self.size
            return pos + (self.written - pos) // window * window

    def run(self) -> tuple[str, list[str]]:
        t0 = time.perf_counter()
        h: Any = sha256chain.Chain() if sha256chain.available() else hashlib.sha256()
        pos = 0
        try:
            while (end := self._next(pos)) is not None:
                assert self.fd is not None or end == pos
                if end > pos and self.fd is not None:
                    for piece in sha256chain.file_pieces(self.fd, pos, end - pos, self.tmp):
                        h.update(piece if isinstance(h, sha256chain.Chain) else _view(piece))
                pos = end
                if pos == self.size:
                    break
            if self.failed:
                return "", []
        finally:
            if self.fd is not None:
                os.close(self.fd)
        log.info("%s hashed %.2fs after its write began", self.rel, time.perf_counter() - t0)
        return h.hexdigest(), list(getattr(h, "states", []))


def _view(piece: sha256chain.Region | memoryview) -> memoryview:
    return piece.view() if isinstance(piece, sha256chain.Region) else piece


def _write_layer(
    out: Path,
    rel: str,
    tensors: list[tuple[str, torch.Tensor | Blob]],
    meta: dict[str, str],
    hashes: ThreadPoolExecutor,
) -> tuple[WrittenFile, Future[tuple[str, list[str]]], Future[None]]:
    """Write a layer file (its payload streamed from the source) and return once its bytes are
    in the page cache (its memory freed). On the `hashes` pool it is hashed as it is written
    (`_HashFollower`) and, once written, fsynced and renamed, so the next layer's write starts
    while this one reaches the disk and its hash ends soon after its write."""
    t0 = time.perf_counter()
    finish: list[Callable[[], None]] = []
    follower = _HashFollower(out / (rel + TMP_SUFFIX), rel)
    hashing = hashes.submit(follower.run)
    try:
        written = write_safetensors(
            out,
            rel,
            tensors,
            meta,
            release=True,
            digest=False,
            deferred=finish,
            progress=follower.advance,
        )
    except BaseException:
        follower.abort()
        raise
    follower.finish(written.size)
    log.info("%s handed to the page cache in %.2fs", rel, time.perf_counter() - t0)

    def complete() -> None:
        t1 = time.perf_counter()
        for step in finish:  # fsync, rename, fsync the directory
            step()
        log.info("%s on disk %.2fs later", rel, time.perf_counter() - t1)

    return written, hashing, hashes.submit(complete)


def _layer_meta(moe: MoELayer) -> dict[str, str]:
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": str(fmt.FORMAT_VERSION),
        "layer": str(moe.layer),
    }


def _layer_files(
    ckpt: Checkpoint,
    layers: list[MoELayer],
    out: Path,
    mode: str,
    state: _State,
    progress: bool,
    device: str,
    exact_fidelity: bool = False,
    pad_tile: int = fmt.PAD_TILE,
    download: Callable[[list[MoELayer]], None] | None = None,
) -> Iterator[tuple[MoELayer, dict[str, Any]]]:
    """Convert and write each layer, yielding its record (in layer order) once its file is in
    place and hashed. `download` starts a hub source's background download, told the layers
    still to convert once the finished ones are known.

    One write is in flight at a time: layer L's fidelity is measured, and layer L+1's scales
    read and converted, while layer L's file is written. The payloads (most of a layer file)
    stream from the source shards into the file as it is written, so what is resident at peak
    is about two layers' scales, not two layers. Each file is hashed while it is written, from
    the page cache, and fsynced once written, on `HASH_WORKERS` threads (several files at
    once): the last layer's hash ends soon after its write.
    """
    with (
        _progress(len(layers), "convert", progress) as bar,
        ThreadPoolExecutor(1, thread_name_prefix="moepack-write") as writes,
        ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="moepack-hash") as hashes,
    ):
        inflight: deque[_InFlight] = deque()
        kept = {moe.layer: state.reusable(fmt.layer_file(moe.layer)) for moe in layers}
        todo = [moe for moe in layers if kept[moe.layer] is None]
        if download is not None:
            download(todo)
        try:
            for moe in layers:
                rel = fmt.layer_file(moe.layer)
                rec = kept[moe.layer]
                if rec is None:
                    if inflight and not ckpt.ready(moe.tensors()):
                        # Its shards are still downloading: record the layers in flight while
                        # waiting, so that a conversion killed meanwhile keeps them.
                        while inflight:
                            yield _record(inflight.popleft(), state, bar)
                    t0 = time.perf_counter()
                    geo = geometry_of(ckpt, moe, pad_tile)
                    result = convert_layer(ckpt, moe, geo, mode, device, exact_fidelity)
                    if inflight:
                        inflight[-1].writing.result()  # its memory is freed once written
                    while inflight and inflight[0].ready():
                        yield _record(inflight.popleft(), state, bar)
                    inflight.append(
                        _InFlight(
                            moe,
                            rel,
                            writes.submit(
                                _write_layer,
                                out,
                                rel,
                                result.tensors,
                                _layer_meta(moe),
                                hashes,
                            ),
                            {
                                "file": None,
                                "geometry": geo.__dict__,
                                "fidelity": result.measure(),
                                "gate_up_requantized_experts": result.gate_up_requantized_experts,
                            },
                        )
                    )
                    del result
                    log.info("layer %d converted in %.2fs", moe.layer, time.perf_counter() - t0)
                    continue
                while inflight:
                    yield _record(inflight.popleft(), state, bar)
                bar.update(1)
                yield moe, rec
            while inflight:
                yield _record(inflight.popleft(), state, bar)
        except BaseException:
            while inflight:  # keep layers whose write was under way: a rerun will not redo them
                with contextlib.suppress(Exception):
                    _record(inflight.popleft(), state, bar)
            raise


def _record(done: _InFlight, state: _State, bar: Any) -> tuple[MoELayer, dict[str, Any]]:
    """Wait for an in-flight layer file (written and hashed) and record it as finished."""
    written, hashing, syncing = done.writing.result()
    written.sha256, written.chain = hashing.result()
    syncing.result()
    done.rec["file"] = written.record("moe_layer")
    state.add(done.rel, done.rec)
    bar.update(1)
    return done.moe, done.rec


def _dense_shards(ckpt: Checkpoint, expert_names: set[str]) -> dict[str, list[str]]:
    by_shard: dict[str, list[str]] = {}
    for name, shard in ckpt.weight_map.items():
        if name not in expert_names:
            by_shard.setdefault(shard, []).append(name)
    return by_shard


def _pass_through(
    ckpt: Checkpoint, layers: list[MoELayer], out: Path, state: _State
) -> list[dict[str, Any]]:
    """Model files byte for byte; each shard's non-expert tensors as raw byte ranges, unchanged."""
    records = []
    experts = {n for n in ckpt.weight_map if any(n.startswith(m.prefix + ".") for m in layers)}
    dense = _dense_shards(ckpt, experts)
    total_size = 0
    weight_map: dict[str, str] = {}
    for shard, names in sorted(dense.items()):
        rel = f"{fmt.MODEL_DIR}/{shard}"
        rec = state.reusable(rel)
        if rec is None:
            header = ckpt.header(shard)
            blobs = [
                (n, Blob.file_range(ckpt.path(shard), t.dtype, t.shape, t.start, t.end))
                for n in sorted(names, key=lambda n: header.tensors[n].start)
                for t in [header.tensors[n]]
            ]
            rec = {
                "file": write_safetensors(
                    out, rel, blobs, header.metadata or None, align=False
                ).record("model_shard")
            }
            state.add(rel, rec)
        records.append(rec["file"])
        for n in names:
            weight_map[n] = shard
        total_size += sum(ckpt.header(shard).tensors[n].nbytes for n in names)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    for name in ckpt.pass_through_files():
        rel = f"{fmt.MODEL_DIR}/{name}"
        rec = state.reusable(rel)
        if rec is None:
            rec = {"file": copy_file(ckpt.path(name), out, rel).record("model_file")}
            state.add(rel, rec)
        records.append(rec["file"])
    records.append(write_json(out, f"{fmt.MODEL_DIR}/{INDEX}", index).record("model_file"))
    return records


def _model_record(ckpt: Checkpoint, layers: list[MoELayer], geo: Geometry) -> ModelInfo:
    cfg = ckpt.config
    archs = cfg.get("architectures")
    return ModelInfo.with_geometry(
        geo,
        model_type=cfg.get("model_type"),
        architectures=None if archs is None else tuple(archs),
        quant_algo=ckpt.quant.algo,
        activation="silu" if geo.gated else "relu2",
        num_hidden_layers=int(cfg.get("num_hidden_layers") or max(m.layer for m in layers) + 1),
        hidden_size=int(cfg.get("hidden_size") or geo.hidden),
        top_k=int(cfg.get("num_experts_per_tok") or cfg.get("moe_topk") or 0),
        moe_layers=tuple(m.layer for m in layers),
    )


def _plan(
    ckpt: Checkpoint, layers: list[MoELayer], mode: str, moe_only: bool, pad_tile: int
) -> dict[str, int]:
    """Every file this job writes -> its size in bytes (exact for safetensors, from headers and
    geometry alone: nothing is read). The free-space check and the ownership check use it."""
    plan: dict[str, int] = {}
    for moe in layers:
        geo = geometry_of(ckpt, moe, pad_tile)
        specs = [(n, d, s) for n, (d, s) in geo.tensor_specs(mode).items()]
        plan[fmt.layer_file(moe.layer)] = planned_safetensors_size(specs, _layer_meta(moe))
    if not moe_only:
        experts = {n for n in ckpt.weight_map if any(n.startswith(m.prefix + ".") for m in layers)}
        for shard, names in _dense_shards(ckpt, experts).items():
            tensors = ckpt.header(shard).tensors
            specs = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
            meta = ckpt.header(shard).metadata or None
            plan[f"{fmt.MODEL_DIR}/{shard}"] = planned_safetensors_size(specs, meta, align=False)
        for name in ckpt.pass_through_files():
            plan[f"{fmt.MODEL_DIR}/{name}"] = ckpt.size(name)
        plan[f"{fmt.MODEL_DIR}/{INDEX}"] = 128 * len(ckpt.weight_map) + 1024
    plan[fmt.MANIFEST] = 4096 + 1024 * len(plan)
    return plan


def _finished_layers(layers: list[MoELayer], state: _State, out: Path) -> list[int]:
    return [
        m.layer
        for m in layers
        if fmt.layer_file(m.layer) in state.done and (out / fmt.layer_file(m.layer)).is_file()
    ]


def _kept_note(layers: list[MoELayer], state: _State, out: Path) -> str:
    done = _finished_layers(layers, state, out)
    if not done:
        return "no MoE layer was finished, nothing kept"
    return (
        f"kept {len(done)} of {len(layers)} finished MoE layers "
        f"({', '.join(map(str, done))}) in {out}; rerun the same command to resume"
    )


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    target: str = "sm120",
    b12x_scales: str = "baked",
    pad_tile: int = DEFAULT_PAD_TILE,
    moe_only: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    device: str = "cpu",
    exact_fidelity: bool = False,
    **hub: Any,
) -> dict[str, Any]:
    """Convert `source` into an artifact at `out`; returns the summary that `--json` prints.

    `device` runs the per-layer arithmetic there (e.g. "cuda"); the bytes are the same.
    `exact_fidelity` measures the baked-scale error on every expert instead of a sample.
    `pad_tile` (128 or 256) is the intermediate-size tile: 256, the default, is used as stored
    by every FlashInfer release in range; 128 is smaller and copy-free only from FlashInfer 0.7.4
    on (`moepack.format.flashinfer`). The manifest records the tile and those releases.
    Everything that can refuse the job (arguments, device, source, the output directory's
    owner and lock, free space) is checked before the artifact's first byte is written; a
    failure leaves no empty directory behind.
    """
    if target not in fmt.TARGETS:
        raise UsageError(f"target {target!r}: choose one of {', '.join(fmt.TARGETS)}")
    if b12x_scales not in fmt.B12X_MODES:
        raise UsageError(f"b12x scales {b12x_scales!r}: choose one of {', '.join(fmt.B12X_MODES)}")
    if pad_tile not in PAD_TILES:
        raise UsageError(f"pad tile {pad_tile!r}: choose one of {', '.join(map(str, PAD_TILES))}")
    check_device(  # before anything is read or made
        device,
        only="conversion runs on 'cpu' or 'cuda' only",
        hint="use --device cpu, which writes the same bytes",
    )
    t0 = time.perf_counter()
    _limit_malloc_arenas()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory", path=out)
    if Path(str(source)).is_dir():
        check_not_source(out, Path(str(source)))
    origin = open_source(str(source), revision, progress, **hub)
    check_not_source(out, origin.root)
    layers = origin.moe_layers  # refused here, before a hub source's weights are downloaded
    src = origin.record(moe_only, defer_hashes=True)
    if (out / fmt.MANIFEST).exists() or (out / STATE).exists():
        src.files()  # a finished or interrupted job there is matched by the source hashes
    ckpt = origin.checkpoint()
    try:
        with ckpt.naming_shards():
            fingerprint = {
                "tool": moepack.__version__,
                "format_version": fmt.FORMAT_VERSION,
                "target": target,
                "b12x_scales": b12x_scales,
                "pad_tile": pad_tile,
                "moe_only": moe_only,
                "source": src.record["files"],
            }
            plan = _plan(ckpt, layers, b12x_scales, moe_only, pad_tile)
            created = not out.exists()
            # Directories above -o that this conversion creates go again if it fails.
            made_parents = [p for p in out.absolute().parents if not p.exists()]
            try:
                with OutputLock(out):
                    try:
                        return _convert_locked(
                            ckpt,
                            src,
                            layers,
                            out,
                            fingerprint,
                            plan,
                            overwrite,
                            progress,
                            device,
                            t0,
                            exact_fidelity,
                            lambda todo: origin.download(todo, moe_only),
                        )
                    except BaseException:
                        prune_empty(out, False, (fmt.MOE_DIR, fmt.MODEL_DIR, PARTIAL))
                        raise
            except BaseException:
                prune_empty(out, created, ())  # out itself, once the lock file is gone
                for parent in made_parents:  # deepest first; only those left empty
                    with contextlib.suppress(OSError):
                        parent.rmdir()
                raise
    finally:
        origin.close()
        ckpt.close()


def _convert_locked(
    ckpt: Checkpoint,
    src: SourceRecord,
    layers: list[MoELayer],
    out: Path,
    fingerprint: dict[str, Any],
    plan: dict[str, int],
    overwrite: bool,
    progress: bool,
    device: str,
    t0: float,
    exact_fidelity: bool = False,
    download: Callable[[list[MoELayer]], None] | None = None,
) -> dict[str, Any]:
    """The job, with `out`'s lock held: claim the directory, keep what checks out, write the
    rest, then the manifest. `download` starts a hub source's download (`_layer_files`)."""
    moe_only, b12x_scales = fingerprint["moe_only"], fingerprint["b12x_scales"]
    state = _State(
        out,
        fingerprint,
        None if src.record["files"] is not None else lambda: fingerprint.update(source=src.files()),
    )
    existing = _existing_manifest(out)
    ours = set(plan) | state.recorded | _listed(existing) | ({fmt.MANIFEST} if existing else set())
    refuse_foreign(out, foreign_files(out, ours))
    same_job = (
        existing is not None
        and existing.get("complete") is True
        and _job_of(existing) == fingerprint
    )
    if existing is not None and not same_job and not overwrite:
        raise ConvertError(
            f"{out}: already holds a different artifact (pass --overwrite to replace it)",
            path=out,
        )
    if overwrite:
        state.discard()
    elif same_job:
        assert existing is not None
        state.seed(existing)
        if all(state.check(rel) for rel in _listed(existing)):
            state.kept = sorted(_listed(existing))
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
            return _summary(out, existing, time.perf_counter() - t0, state)
        log.warning("%s: some files of the finished artifact changed; rewriting them", out)
    if existing is not None:
        (out / fmt.MANIFEST).unlink()  # from here on the directory no longer claims to be complete
    # What moepack wrote earlier and this job does not write again goes (--overwrite, or a
    # different job); what it does write is replaced in place, atomically.
    _remove_files(out, (_listed(existing) | state.recorded) - set(plan) - {fmt.MANIFEST})
    prune_empty(out, False, (fmt.MOE_DIR, fmt.MODEL_DIR))  # e.g. model/ of a full artifact
    if set(state.done) - set(plan):
        state.done = {k: v for k, v in state.done.items() if k in plan}
    if not state.done:
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
    for stale in out.rglob("*" + TMP_SUFFIX):
        stale.unlink()
    remaining = sum(size for rel, size in plan.items() if not state.size_matches(rel))
    check_free_space(out, remaining, max(plan.values(), default=0))

    layer_records: list[LayerRecord] = []
    files: list[dict[str, Any]] = []
    geos: list[Geometry] = []
    try:
        for moe, rec in _layer_files(
            ckpt,
            layers,
            out,
            b12x_scales,
            state,
            progress,
            device,
            exact_fidelity,
            fingerprint["pad_tile"],
            download,
        ):
            geos.append(Geometry(**rec["geometry"]))
            files.append(rec["file"])
            layer_records.append(
                LayerRecord(
                    layer=moe.layer,
                    source_prefix=moe.prefix,
                    file=rec["file"]["path"],
                    fidelity=Fidelity.from_json(rec["fidelity"]),
                    gate_up_requantized_experts=rec["gate_up_requantized_experts"],
                )
            )
        if any(g != geos[0] for g in geos):
            raise ConvertError(f"{src.root}: MoE layers differ in geometry; one artifact needs one")
        if not moe_only:
            files += _pass_through(ckpt, layers, out, state)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: {_kept_note(layers, state, out)}") from None
    except DiskSpaceError as exc:
        raise DiskSpaceError(
            f"{exc.message}; {_kept_note(layers, state, out)} after freeing space",
            path=exc.path,
            expected=exc.expected,
            found=exc.found,
        ) from None
    manifest = Manifest(
        tool=ToolInfo("moepack", moepack.__version__, torch.__version__, safetensors.__version__),
        source=SourceInfo.from_json(src.settle()),
        target=fingerprint["target"],
        model=_model_record(ckpt, layers, geos[0]),
        b12x_scale_mode=b12x_scales,
        kernel_abi=KernelAbi(
            flashinfer=fmt.FLASHINFER_RANGE,
            pad_tile=fingerprint["pad_tile"],
            flashinfer_copy_free=copy_free_releases(geos[0].intermediate_padded),
            sf_block=fmt.SF_BLOCK,
            sf_layout=fmt.SF_LAYOUT,
            w13_order=("up", "gate") if geos[0].gated else ("up",),
            alignment=fmt.ALIGNMENT,
            prefill_min_tokens=fmt.PREFILL_MIN_TOKENS,
        ),
        layers=tuple(layer_records),
        files=tuple(FileRecord.from_json(f) for f in sorted(files, key=lambda f: f["path"])),
    ).to_json()
    errors = manifest_errors(manifest)
    if errors:  # a writer bug; never leave a manifest that load and verify would refuse
        raise ConvertError(f"{out}: the manifest to be written is invalid: {'; '.join(errors)}")
    write_json(out, fmt.MANIFEST, manifest)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return _summary(out, manifest, time.perf_counter() - t0, state)


def _summary(out: Path, manifest: dict[str, Any], seconds: float, state: _State) -> dict[str, Any]:
    fid = [layer["fidelity"] for layer in manifest["layers"]]
    layer_files = {layer["file"] for layer in manifest["layers"]}
    return {
        "artifact": str(out),
        "source": {k: v for k, v in manifest["source"].items() if k != "files"},
        "target": manifest["target"],
        "b12x_scale_mode": manifest["b12x_scale_mode"],
        "moe_layers": len(manifest["layers"]),
        "files": len(manifest["files"]),
        "bytes": sum(f["size"] for f in manifest["files"]),
        "seconds": round(seconds, 3),
        "b12x_max_rel_err": max(f["b12x_max_rel_err"] for f in fid),
        "b12x_mean_rel_err": sum(f["b12x_mean_rel_err"] for f in fid) / len(fid),
        "gate_up_requantized_experts": sum(
            layer["gate_up_requantized_experts"] for layer in manifest["layers"]
        ),
        # Files of an earlier run kept after their size and sha256 were checked, and files
        # written by this run (kept files are never trusted unchecked).
        "kept_files": sorted(state.kept),
        "kept_layers": len(layer_files & set(state.kept)),
        "written_files": sorted(state.written),
    }


__all__ = ["ConvertError", "CheckpointError", "convert_checkpoint"]
