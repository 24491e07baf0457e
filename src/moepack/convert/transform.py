"""One MoE layer, ModelOpt per-expert tensors -> the artifact's kernel-ready tensors.

The FP4 payload is stored once (padded to `n_p`); block scales are swizzled once for CUTLASS
(and reused by b12x in shared mode); baked mode adds b12x scales with `weight_scale_2` folded in.
Every number the conversion changes is measured against the source and reported as fidelity.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from moepack.format import Geometry
from moepack.runtime import layout, nvfp4, scales
from moepack.runtime.dtypes import TORCH_DTYPES

from .checkpoint import Checkpoint, CheckpointError
from .moe_layers import MoELayer
from .writer import Blob

FIDELITY_CHUNK = 1
"""Experts per chunk when measuring error: bounds the float32 temporaries (~12 MB a chunk on
Nemotron Super; 4 experts a chunk on 8 workers raised peak RSS by 0.6 GB, 1 by 0.25 GB, at
the same speed)."""
FIDELITY_WORKERS = 8
READ_WORKERS = min(16, os.cpu_count() or 1)
"""Threads reading expert tensors into the layer buffers (positioned reads release the GIL)."""
GATHER_EXPERTS = 16
"""Experts per read task."""
FIDELITY_SAMPLE = 64
"""Experts of a layer whose baked-scale error is measured by default (exact: all of them)."""
_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
"""Value of every E4M3 byte (source scales are checked NaN-free before use)."""


@dataclass
class LayerResult:
    """A layer's file tensors, and `measure()` for its fidelity figures: separate so that the
    measurement can run while the tensors are being written. The payloads (`w13`, `w2`, most
    of the file) are `Blob`s streamed from the source shards as the file is written: one layer
    held in memory is its scales, not its payload."""

    tensors: list[tuple[str, torch.Tensor | Blob]]
    measure: Callable[[], dict[str, float | int]]
    gate_up_requantized_experts: int = 0


@dataclass
class _Proj:
    """One projection of all experts: where its payload is (streamed, never held whole) and its
    row-major scales padded to their stored shape (rows per half when gated), plus what the
    source said, for measuring changes."""

    payload: _Payload  # uint8 [E, rows, K_p/2], read on demand
    sf: torch.Tensor  # e4m3 [E, rows, K_p/16] as stored (after any requantization)
    src_sf: torch.Tensor  # e4m3, the source block scales (the same tensor unless requantized)
    src_ws2: torch.Tensor  # float32 [E, halves]: the source weight_scale_2 of each half
    ws2: torch.Tensor  # float32 [E]: the one weight_scale_2 the kernels get
    input_scale: torch.Tensor  # float32 [E]


B12X_HIDDEN_TILE = 128
"""The b12x W4A4 kernels' hidden tile (`_LEVEL_TILE_N`; FlashInfer 0.7.4
`_validate_w4a4_dimensions`: Q0/A staging and the FC2 epilogue need full hidden tiles)."""


def geometry_of(ckpt: Checkpoint, moe: MoELayer, pad_tile: int = layout.PAD_TILE) -> Geometry:
    """Layer geometry from expert 0's headers (every expert is checked against it while
    loading), the intermediate size padded to `pad_tile`."""
    up = ckpt.entry(moe.tensor(0, "up", "weight"))
    down = ckpt.entry(moe.tensor(0, "down", "weight"))
    if len(up.shape) != 2 or len(down.shape) != 2:
        raise CheckpointError(
            f"{moe.tensor(0, 'up', 'weight')}: expected 2-d expert weights, got "
            f"{list(up.shape)} and {list(down.shape)}",
            tensor=moe.tensor(0, "up", "weight"),
        )
    n, hidden = up.shape[0], up.shape[1] * 2
    if tuple(down.shape) != (hidden, n // 2):
        raise CheckpointError(
            f"{moe.tensor(0, 'down', 'weight')}: shape {tuple(down.shape)} does not pair with "
            f"up_proj {tuple(up.shape)} (expected [{hidden}, {n // 2}])",
            tensor=moe.tensor(0, "down", "weight"),
        )
    if hidden % 16 or n % 16:
        raise CheckpointError(
            f"{moe.prefix}: hidden {hidden} and intermediate {n} must be multiples of 16",
            tensor=moe.tensor(0, "up", "weight"),
        )
    if hidden % B12X_HIDDEN_TILE:
        raise CheckpointError(
            f"{moe.prefix}: MoE hidden size {hidden} is not a multiple of {B12X_HIDDEN_TILE}: the "
            "b12x W4A4 kernels need full 128-wide hidden tiles (FlashInfer 0.7.4's "
            "B12xMoEWrapper refuses it: 'hidden-dimension tails are not supported'), so no "
            "SM12x decode path could serve this artifact",
            tensor=moe.tensor(0, "up", "weight"),
        )
    return Geometry(moe.num_experts, hidden, n, layout.padded_intermediate(n, pad_tile), moe.gated)


def _read_scalars(ckpt: Checkpoint, names: list[str]) -> torch.Tensor:
    """One float32 per name: each a one-element float tensor, finite and positive. The raw bytes
    are read with one small positioned read each and converted per dtype in one go."""
    out = torch.empty(len(names), dtype=torch.float32)
    groups: dict[str, tuple[list[int], list[bytes]]] = {}
    for i, name in enumerate(names):
        fd, entry = ckpt.locate(name)
        dtype = TORCH_DTYPES[entry.dtype]
        if math.prod(entry.shape) != 1 or not dtype.is_floating_point:
            raise CheckpointError(
                f"{name}: expected one float scalar, got {dtype}{list(entry.shape)}",
                tensor=name,
            )
        raw = os.pread(fd, entry.nbytes, entry.start)
        if len(raw) != entry.nbytes:
            raise ckpt.short_read(name)
        idx, parts = groups.setdefault(entry.dtype, ([], []))
        idx.append(i)
        parts.append(raw)
    for st_dtype, (idx, parts) in groups.items():
        raw_all = bytearray(b"".join(parts))
        values = torch.frombuffer(raw_all, dtype=TORCH_DTYPES[st_dtype]).to(torch.float32)
        out[torch.tensor(idx)] = values
    bad = ~(torch.isfinite(out) & (out > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise CheckpointError(
            f"{names[i]}: scale {float(out[i])} is not finite and positive", tensor=names[i]
        )
    return out


def _read_full(fd: int, dst: memoryview | np.ndarray, offset: int) -> bool:
    """Fill `dst` from `fd` at `offset` (looping over short reads); False if the file ends."""
    view = memoryview(dst.data).cast("B") if isinstance(dst, np.ndarray) else dst
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


def _located(ckpt: Checkpoint, name: str) -> tuple[int, int]:
    """`(fd, start)` of a tensor whose byte range lies inside its shard (checked up front, so a
    streamed payload cannot run short unless the shard changes under the conversion)."""
    fd, entry = ckpt.locate(name)
    if entry.start + entry.nbytes > os.fstat(fd).st_size:
        raise ckpt.short_read(name)
    return fd, entry.start


def _check_block_scales(bits: np.ndarray, name: str) -> None:
    """E4M3 block scales must be NaN-free (0x7F/0xFF) and not negative (0x81..0xFF)."""
    if bool(((bits & 0x7F) == 0x7F).any()):
        raise CheckpointError(f"{name}: block scales contain NaN", tensor=name)
    if bool((bits > 0x80).any()):
        raise CheckpointError(f"{name}: block scales are negative", tensor=name)


def _gather(
    ckpt: Checkpoint,
    names: list[list[str]],
    dest: torch.Tensor,
    rows: int,
    cols: int,
    rows_p: int,
    scales_check: bool,
) -> None:
    """Read `names[e][h]` (a `[rows, cols]` byte matrix) into `dest[e, h*rows_p : h*rows_p+rows,
    :cols]` straight from the shards, experts spread over a thread pool.

    Rows that are stored whole (`cols` is the padded width) are one positioned read into the
    destination; otherwise each expert is read into a per-task scratch buffer and copied into its
    padded rows (numpy releases the GIL for the copy). Padding is zeroed, nothing else written
    twice. `scales_check` validates E4M3 block scales as they arrive (still in cache).
    """
    e_count, _, cols_p = dest.shape
    halves = len(names[0])
    if rows_p > rows:
        dest.view(e_count, halves, rows_p, cols_p)[:, :, rows:].zero_()
    if cols_p > cols:
        dest[:, :, cols:].zero_()
    plan: list[tuple[int, int, int, int, str]] = []
    for e in range(e_count):
        for h, name in enumerate(names[e]):
            fd, entry = ckpt.locate(name)
            plan.append((fd, entry.start, e, h, name))
    arr = dest.numpy()
    flat = memoryview(arr.reshape(-1).data)
    nbytes = rows * cols

    def task(items: list[tuple[int, int, int, int, str]]) -> None:
        scratch = np.empty((rows, cols), dtype=np.uint8) if cols != cols_p else None
        for fd, start, e, h, name in items:
            r0 = h * rows_p
            if scratch is None:
                off = (e * halves * rows_p + r0) * cols_p
                ok = _read_full(fd, flat[off : off + nbytes], start)
                block = arr[e, r0 : r0 + rows]
            else:
                ok = _read_full(fd, scratch, start)
                arr[e, r0 : r0 + rows, :cols] = scratch
                block = scratch
            if not ok:
                raise ckpt.short_read(name)
            if scales_check:
                _check_block_scales(block, name)

    step = GATHER_EXPERTS * halves
    tasks = [plan[i : i + step] for i in range(0, len(plan), step)]
    with ThreadPoolExecutor(max_workers=min(READ_WORKERS, len(tasks))) as pool:
        for fut in [pool.submit(task, t) for t in tasks]:
            fut.result()


PAYLOAD_EXPERTS = 4
"""Experts per piece of a streamed payload (about 6 MB on Nemotron Super)."""
PAYLOAD_AHEAD = 16
"""Pieces read ahead of the writer: about 100 MB in flight."""
PAYLOAD_READERS = 4
"""Threads reading a streamed payload: the writer hands ~2 GB/s to the page cache, 16 threads
read it from there at 11.6 GB/s (H200 host), 4 are plenty and leave cores to the conversion
of the next layer and to the hashes."""


@dataclass
class _Payload:
    """One projection's FP4 payload as the layer file stores it, `[E, halves * rows_p, cols_p]`
    uint8 (each half's rows padded to `rows_p`, each row to `cols_p` bytes, padding zero), kept
    where it is in the source shards: its bytes are the source's, unchanged, so the layer file
    gets them streamed from the shards (`blob`) instead of a copy of the whole projection in
    memory, and the fidelity measurement reads the experts it needs (`read`).
    """

    ckpt: Checkpoint
    names: list[list[str]]
    where: list[list[tuple[int, int]]]  # [e][h] -> (fd, start)
    rows: int
    cols: int
    rows_p: int
    cols_p: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.names), len(self.names[0]) * self.rows_p, self.cols_p)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def _fill(self, experts: list[int], out: np.ndarray) -> None:
        """`out[i]` = expert `experts[i]` as stored: source rows straight into the padded block
        (one positioned read per half when rows need no padding), padding zeroed."""
        rows, cols, rows_p, cols_p = self.rows, self.cols, self.rows_p, self.cols_p
        halves = len(self.names[0])
        blocks = out.reshape(len(experts), halves, rows_p, cols_p)
        if rows_p > rows:
            blocks[:, :, rows:] = 0
        scratch = np.empty((rows, cols), dtype=np.uint8) if cols != cols_p else None
        for i, e in enumerate(experts):
            for h, (fd, start) in enumerate(self.where[e]):
                if scratch is None:
                    ok = _read_full(fd, blocks[i, h, :rows], start)
                else:
                    ok = _read_full(fd, scratch, start)
                    blocks[i, h, :rows, :cols] = scratch
                    blocks[i, h, :rows, cols:] = 0
                if not ok:
                    raise self.ckpt.short_read(self.names[e][h])

    def read(self, experts: list[int]) -> torch.Tensor:
        """The stored bytes of `experts`, `[len(experts), halves * rows_p, cols_p]` uint8."""
        out = np.empty((len(experts), *self.shape[1:]), dtype=np.uint8)
        self._fill(experts, out)
        return torch.from_numpy(out)

    def blob(self) -> Blob:
        """The projection as a writer `Blob`: pieces of `PAYLOAD_EXPERTS` experts in file
        order, read ahead on `PAYLOAD_READERS` threads (positioned reads and numpy copies drop the GIL);
        each piece is a fresh buffer, so a hasher fed the same pieces may keep them."""
        e_count = len(self.names)
        groups = [
            list(range(lo, min(lo + PAYLOAD_EXPERTS, e_count)))
            for lo in range(0, e_count, PAYLOAD_EXPERTS)
        ]

        def piece(experts: list[int]) -> memoryview:
            out = np.empty((len(experts), *self.shape[1:]), dtype=np.uint8)
            self._fill(experts, out)
            return memoryview(out.reshape(-1).data)

        def chunks() -> Iterator[memoryview]:
            with ThreadPoolExecutor(max_workers=min(PAYLOAD_READERS, len(groups))) as pool:
                ahead: deque[Future[memoryview]] = deque()
                try:
                    for g in groups:
                        ahead.append(pool.submit(piece, g))
                        if len(ahead) > PAYLOAD_AHEAD:
                            yield ahead.popleft().result()
                    while ahead:
                        yield ahead.popleft().result()
                finally:  # stopped early (a failed write): nothing more is read
                    for fut in ahead:
                        fut.cancel()

        return Blob("U8", self.shape, self.nbytes, chunks)


def _check_entry(ckpt: Checkpoint, name: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """Refuse an expert tensor whose header dtype or shape is not what the geometry needs, before
    a byte of it is read (scales into the layer buffer, payload streamed to the file)."""
    entry = ckpt.locate(name)[1]
    found = TORCH_DTYPES[entry.dtype]  # locate refuses dtypes torch has no type for
    if found != dtype or tuple(entry.shape) != shape:
        raise CheckpointError(
            f"{name}: expected {str(dtype).removeprefix('torch.')} {list(shape)}, got "
            f"{str(found).removeprefix('torch.')} {list(entry.shape)}",
            tensor=name,
        )


def _load_proj(
    ckpt: Checkpoint,
    moe: MoELayer,
    roles: tuple[str, ...],
    shape: tuple[int, int, int, int, int],
    device: torch.device,
) -> _Proj:
    """Gather the scales of `roles` (stacked as halves in that order) of every expert into
    padded tensors, and locate their payload (streamed to the file later, see `_Payload`).

    `shape` is `(experts, rows, padded rows per half, K, padded K)`. Every expert tensor's dtype
    and shape are checked against the header, and its byte range against the shard's size,
    before a byte is read; scale bytes then go straight into the stacked, padded layer buffer
    (no per-tensor allocation).
    """
    e_count, rows, rows_p, k, k_p = shape
    halves = len(roles)
    w_names = [[moe.tensor(e, r, "weight") for r in roles] for e in range(e_count)]
    s_names = [[moe.tensor(e, r, "weight_scale") for r in roles] for e in range(e_count)]
    for e in range(e_count):
        for h in range(halves):
            _check_entry(ckpt, w_names[e][h], torch.uint8, (rows, k // 2))
            _check_entry(ckpt, s_names[e][h], torch.float8_e4m3fn, (rows, k // 16))
    where = [[_located(ckpt, name) for name in per_expert] for per_expert in w_names]
    payload = _Payload(ckpt, w_names, where, rows, k // 2, rows_p, k_p // 2)
    sf = torch.empty((e_count, rows_p * halves, k_p // 16), dtype=torch.uint8)
    _gather(ckpt, s_names, sf, rows, k // 16, rows_p, scales_check=True)
    ws2 = _read_scalars(
        ckpt, [moe.tensor(e, r, "weight_scale_2") for e in range(e_count) for r in roles]
    ).view(e_count, halves)
    xs_names = [moe.tensor(e, r, "input_scale") for e in range(e_count) for r in roles]
    xs = _read_scalars(ckpt, xs_names).view(e_count, halves)
    if halves > 1:
        differ = (xs != xs[:, :1]).any(1)
        if bool(differ.any()):
            e = int(differ.nonzero()[0, 0])
            h = int((xs[e] != xs[e, 0]).nonzero()[0, 0])
            raise CheckpointError(
                f"{moe.tensor(e, roles[h], 'input_scale')}: differs from "
                f"{moe.tensor(e, roles[0], 'input_scale')} (gate and up share the FC1 input)",
                tensor=moe.tensor(e, roles[h], "input_scale"),
            )
    sf = sf.view(torch.float8_e4m3fn)
    if device.type != "cpu":
        sf, ws2 = sf.to(device), ws2.to(device)
    x_scale = xs[:, 0].contiguous().to(device)
    return _Proj(payload, sf, sf, ws2, ws2[:, 0].contiguous(), x_scale)


def _unify_gate_up(proj: _Proj, rows_p: int) -> torch.Tensor:
    """One ws2 per expert for `[up; gate]`: max of the two, the other half's scales requantized.
    Returns the indices of the experts whose scales changed (the only ones with nonzero error)."""
    unified, f_up, f_gate = scales.unify_scale_2(proj.src_ws2[:, 0], proj.src_ws2[:, 1])
    proj.ws2 = unified
    touched = ((f_up != 1) | (f_gate != 1)).nonzero().reshape(-1).cpu()
    if not len(touched):
        return touched
    proj.sf = proj.src_sf.clone()
    for h, factor in enumerate((f_up, f_gate)):
        need = factor != 1
        if bool(need.any()):
            rows = slice(h * rows_p, (h + 1) * rows_p)
            part = proj.sf[need, rows].to(torch.float32) * factor[need].reshape(-1, 1, 1)
            proj.sf.view(torch.uint8)[need, rows] = nvfp4.e4m3_from_float(part).view(torch.uint8)
    return touched


_SQ_BYTE = (nvfp4.E2M1_VALUES**2)[torch.arange(256) & 7] + (nvfp4.E2M1_VALUES**2)[
    (torch.arange(256) >> 4) & 7
]
_SQ_PAIR = _SQ_BYTE[torch.arange(65536) & 0xFF] + _SQ_BYTE[torch.arange(65536) >> 8]
"""Sum of the squared E2M1 values of the four codes in any two bytes: one lookup per 2 bytes."""


def _scale_values(sf: torch.Tensor) -> torch.Tensor:
    return (
        _E4M3.to(sf.device).index_select(0, sf.view(torch.uint8).reshape(-1).int()).view(sf.shape)
    )


Variant = Callable[[slice | torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""Given the experts of a chunk, their `(block scales, ws2 or None)` (None: ws2 folded in)."""


def _rel_errors(
    proj: _Proj, variants: list[Variant], experts: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-expert relative Frobenius error, against the source, of weights dequantized with each
    variant's scales, for the experts indexed by `experts` (all when None), in that order.

    `sum((e2m1 * (got - ref))^2)` factors per block into `sum(e2m1^2) * (got - ref)^2`, so the
    error is exact without materializing dequantized weights; one pass over the payload serves
    every variant. Chunks of experts run on a thread pool: the table lookup is single-threaded
    inside torch, and the GIL is released while it runs. Each chunk reads its experts' payload
    from the source (the layer's payload is never held whole).
    """
    count = proj.payload.shape[0] if experts is None else len(experts)
    if count == 0:
        return [torch.zeros(0) for _ in variants]
    starts = range(0, count, FIDELITY_CHUNK)
    device = proj.src_sf.device
    on_cpu = device.type == "cpu"
    workers = min(FIDELITY_WORKERS, os.cpu_count() or 1) if on_cpu else 1

    def chunk(start: int) -> list[torch.Tensor]:
        sel: slice | torch.Tensor = slice(start, min(start + FIDELITY_CHUNK, count))
        if experts is not None:
            sel = experts[sel].to(device)
        return _chunk_errors(proj, variants, sel)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = list(pool.map(chunk, starts))
    return [torch.cat([c[i] for c in chunks]).cpu() for i in range(len(variants))]


def _pick(t: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    """`t[sel]` for a slice (a view) or an index tensor (float8 gathered as bytes)."""
    if isinstance(sel, slice):
        return t[sel]
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)[sel].view(t.dtype)
    return t[sel]


def _chunk_errors(
    proj: _Proj, variants: list[Variant], c: slice | torch.Tensor
) -> list[torch.Tensor]:
    ids = list(range(c.start, c.stop)) if isinstance(c, slice) else c.cpu().tolist()
    p = proj.payload.read(ids).to(proj.src_sf.device)
    pairs = p.reshape(-1).view(torch.int16).int() & 0xFFFF
    energy = _SQ_PAIR.to(p.device).index_select(0, pairs).view(*p.shape[:2], -1, 4).sum(-1)
    halves = proj.src_ws2.shape[1]
    ws2_rows = _pick(proj.src_ws2, c).repeat_interleave(p.shape[1] // halves, dim=1).unsqueeze(-1)
    ref = _scale_values(_pick(proj.src_sf, c)) * ws2_rows
    norm = (energy * ref.square()).sum((1, 2))
    out = []
    for variant in variants:
        sf, ws2 = variant(c)
        got = _scale_values(sf)
        if ws2 is not None:
            got = got * ws2.reshape(-1, 1, 1)
        err = (energy * (got - ref).square()).sum((1, 2))
        out.append(torch.where(norm > 0, err / norm, err).sqrt())
    return out


def fidelity_sample(num_experts: int, exact: bool) -> torch.Tensor:
    """Experts whose baked-scale error is measured: all when `exact` or when there are at most
    `FIDELITY_SAMPLE`, else `FIDELITY_SAMPLE` evenly spaced ones (first and last included)."""
    if exact or num_experts <= FIDELITY_SAMPLE:
        return torch.arange(num_experts)
    return torch.linspace(0, num_experts - 1, FIDELITY_SAMPLE).round().long().unique()


def _bake_tables(ws2: torch.Tensor) -> torch.Tensor:
    """Per expert, the baked byte of every E4M3 byte: `e4m3(value(byte) * ws2[e])`, `[E, 256]`
    uint8. Baking is elementwise, so a table lookup gives exactly the bits of
    `scales.bake_block_scales` at a fraction of its cost (and commutes with the swizzle)."""
    values = _E4M3.to(ws2.device).reshape(1, -1)
    return nvfp4.e4m3_from_float(values * ws2.to(torch.float32).reshape(-1, 1)).view(torch.uint8)


_NONZERO = (torch.arange(256) & 0x7F) != 0


def _baked(sf: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """b12x baked scales of `sf` (`[E, ...]` e4m3, any layout), their per-expert tables, and how
    many nonzero scales flushed to 0. Experts are looked up on a thread pool (numpy's take and
    bincount release the GIL)."""
    tables = _bake_tables(ws2).cpu()
    flushes = (_NONZERO & ((tables & 0x7F) == 0)).numpy()
    src = sf.view(torch.uint8).cpu()
    baked = torch.empty_like(src)
    src_np, out_np, tab_np = src.numpy(), baked.numpy(), tables.numpy()
    e_count = src.shape[0]

    def task(lo: int) -> int:
        flushed = 0
        for e in range(lo, min(lo + GATHER_EXPERTS, e_count)):
            flat = src_np[e].reshape(-1)
            np.take(tab_np[e], flat, out=out_np[e].reshape(-1))
            flushed += int(np.bincount(flat, minlength=256) @ flushes[e])
        return flushed

    with ThreadPoolExecutor(max_workers=READ_WORKERS) as pool:
        flushed = sum(pool.map(task, range(0, e_count, GATHER_EXPERTS)))
    return baked.view(torch.float8_e4m3fn).to(sf.device), tables.to(sf.device), flushed


def _baked_variant(
    proj: _Proj, tables: torch.Tensor
) -> Callable[[slice | torch.Tensor], tuple[torch.Tensor, None]]:
    """Row-major baked scales of the selected experts (for measuring), from the tables."""

    def pick(sel: slice | torch.Tensor) -> tuple[torch.Tensor, None]:
        sf = _pick(proj.sf, sel).view(torch.uint8)
        t = _pick(tables, sel)
        out = torch.gather(t, 1, sf.reshape(sf.shape[0], -1).long()).view(sf.shape)
        return out.view(torch.float8_e4m3fn), None

    return pick


def _fixed(
    sf: torch.Tensor, ws2: torch.Tensor | None
) -> Callable[[slice | torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """A variant whose scales are stored tensors `[E, ...]`, selected per chunk."""
    return lambda sel: (_pick(sf, sel), None if ws2 is None else _pick(ws2, sel))


def convert_layer(
    ckpt: Checkpoint,
    moe: MoELayer,
    geo: Geometry,
    mode: str,
    device: torch.device | str = "cpu",
    exact_fidelity: bool = False,
) -> LayerResult:
    """All tensors of one layer file, in `Geometry.tensor_specs` order, plus fidelity figures.

    The work runs on `device` (a GPU makes it a small fraction of the I/O); results come back
    on the CPU for writing. The payloads are not read here: they stream from the shards into
    the file when it is written (`_Payload`), while the source checkpoint stays open. Fidelity: requantization errors (and every error in shared mode)
    are exact, measured on the only experts they can be nonzero for; the baked-scale error of
    layers with more than `FIDELITY_SAMPLE` experts is measured on that many evenly spaced
    experts unless `exact_fidelity` (`b12x_err_experts` records how many).
    """
    device = torch.device(device)
    e, h, n, n_p = geo.num_experts, geo.hidden, geo.intermediate, geo.intermediate_padded
    fc1 = _load_proj(ckpt, moe, ("up", "gate") if geo.gated else ("up",), (e, n, n_p, h, h), device)
    fc2 = _load_proj(ckpt, moe, ("down",), (e, h, h, n, n_p), device)
    requantized = _unify_gate_up(fc1, n_p) if geo.gated else torch.zeros(0, dtype=torch.long)
    tensors: dict[str, torch.Tensor] = {
        "w13_sf": layout.swizzle(fc1.sf),
        "w2_sf": layout.swizzle(fc2.sf),
    }
    cut = scales.cutlass_scalars(fc1.input_scale, fc1.ws2, fc2.input_scale, fc2.ws2)
    b12x_13: Variant | None = None
    b12x_2: Variant | None = None
    if mode == "baked":
        tensors["b12x.w13_sf"], tables13, flushed13 = _baked(tensors["w13_sf"], fc1.ws2)
        tensors["b12x.w2_sf"], tables2, flushed2 = _baked(tensors["w2_sf"], fc2.ws2)
        b12x = scales.b12x_baked_scalars(fc1.input_scale, fc2.input_scale, geo.num_experts)
        flushed = flushed13 + flushed2
        b12x_13, b12x_2 = _baked_variant(fc1, tables13), _baked_variant(fc2, tables2)
    else:
        b12x = scales.b12x_shared_scalars(fc1.input_scale, fc1.ws2, fc2.input_scale, fc2.ws2)
        flushed = 0
    tensors |= {
        "cutlass.fc1_act_global": cut.fc1_act_global,
        "cutlass.fc1_alpha": cut.fc1_alpha,
        "cutlass.fc2_act_global": cut.fc2_act_global,
        "cutlass.fc2_alpha": cut.fc2_alpha,
        "b12x.w1_alpha": b12x.w1_alpha,
        "b12x.w2_alpha": b12x.w2_alpha,
        "b12x.fc2_input_scale": b12x.fc2_input_scale,
    }
    if b12x.input_global_scale is not None:
        tensors["b12x.input_global_scale"] = b12x.input_global_scale

    def measure() -> dict[str, float | int]:
        """Experts untouched by requantization keep their source scales and ws2 exactly, so
        their requantization error, and in shared mode their b12x error, is exactly 0."""
        (requant,) = _rel_errors(fc1, [_fixed(fc1.sf, fc1.ws2)], requantized)
        if b12x_13 is not None and b12x_2 is not None:  # baked
            sample = fidelity_sample(e, exact_fidelity)
            (err13,) = _rel_errors(fc1, [b12x_13], sample)
            (err2,) = _rel_errors(fc2, [b12x_2], sample)
            b12x_err = torch.cat([err13, err2])
        else:
            sample = torch.arange(e)
            b12x_err = torch.zeros(2 * e)
            b12x_err[requantized] = requant
        return {
            "b12x_max_rel_err": float(b12x_err.max()),
            "b12x_mean_rel_err": float(b12x_err.mean()),
            "b12x_flushed_scales": flushed,
            "requant_max_rel_err": float(requant.max()) if len(requant) else 0.0,
            "b12x_err_experts": len(sample),
        }

    payloads = {"w13": fc1.payload.blob(), "w2": fc2.payload.blob()}
    order = geo.tensor_specs(mode)
    return LayerResult(
        [(name, payloads[name] if name in payloads else tensors[name].cpu()) for name in order],
        measure,
        len(requantized),
    )
