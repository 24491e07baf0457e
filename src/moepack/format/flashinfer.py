"""What each FlashInfer release in range does with an artifact's padded intermediate size.

The artifact pads the intermediate size `n` to `n_p` once, offline. Whether FlashInfer's b12x
path then uses the stored tensors as they are, or copies every weight and scale of the layer
into a larger padded copy on its first call (and keeps it), depends on the release. Read in the
source of each release (`fused_moe/cute_dsl/blackwell_sm12x/moe_dispatch.py`, `b12x_moe.py`) and
checked by executing that code on CPU for every release in `RELEASES`
(tests/test_contracts.py::test_b12x_runtime_copies, run under each release by
.ci/flashinfer-matrix):

- 0.7.2, 0.7.2.post1 (identical b12x modules): `launch_sm120_moe` pads the static backend's
  weights to `_STATIC_RETAINED_GROUP_N` = 256 unless `n % 256 == 0` (`_pad_intermediate_to_tile`,
  cached in `_PADDED_WEIGHT_CACHE` for as long as the weights live); the wrapper pads to
  `_LEVEL_TILE_N` = 128 before that.
- 0.7.4: `_prepare_weight_views` pads only to 128 (odd 128-slices are zero-filled by TMA:
  `_static_retained_groups` rounds up), except that a single 128-slice (`n <= 128`,
  `static_needs_256_extent`) gets 256-padded copies for the static family.

Torch-free: the converter records the choice, the validator checks it, the loader warns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .specs import Geometry, round_up, swizzled_shape

PAD_TILES = (128, 256)
"""Intermediate-size tiles `moepack convert --pad-tile` offers."""

DEFAULT_PAD_TILE = 256
"""What the engines' current pins need: vLLM 0.33.0 pins FlashInfer 0.7.2.post1 and SGLang 0.5.23
pins 0.7.2, both of which copy unless `n % 256 == 0`. 256 is copy-free on every release in
`RELEASES`; 128 only from 0.7.4 on (Nemotron 3 Super: n = 2688 = 21 x 128 stays 2688 instead of
2816, 4.8% less MoE memory)."""


@dataclass(frozen=True)
class Release:
    """One FlashInfer release's b12x padding rule: the stored `n_p` is used without a copy iff
    `n_p % tile == 0 and n_p >= min_extent`; otherwise the layer is copied, padded to
    `round_up(max(n_p, min_extent), copy_tile)`."""

    version: str
    tile: int
    min_extent: int
    copy_tile: int
    where: str  # the source that says so

    def copy_free(self, n_p: int) -> bool:
        return n_p % self.tile == 0 and n_p >= self.min_extent

    def copied_intermediate(self, n_p: int) -> int:
        """The intermediate size of the run-time copy (`n_p` itself when there is none)."""
        if self.copy_free(n_p):
            return n_p
        return round_up(max(n_p, self.min_extent), self.copy_tile)


_072 = (
    "moe_dispatch.launch_sm120_moe: static backend and n % _STATIC_RETAINED_GROUP_N (256) != 0 "
    "-> _pad_intermediate_to_tile(..., 256)"
)
RELEASES = (
    Release("0.7.2", tile=256, min_extent=256, copy_tile=256, where=_072),
    Release("0.7.2.post1", tile=256, min_extent=256, copy_tile=256, where=_072),
    Release(
        "0.7.4",
        tile=128,
        min_extent=256,
        copy_tile=256,
        where=(
            "moe_dispatch._prepare_weight_views: pads to _LEVEL_TILE_N (128); "
            "static_needs_256_extent(n <= 128) -> _pad_intermediate_to_tile(..., 256)"
        ),
    ),
)
"""Every FlashInfer release moepack declares it supports and tests (.ci/flashinfer-matrix)."""


def release(version: str) -> Release | None:
    """The rule of a release moepack has checked, None for any other version."""
    for r in RELEASES:
        if r.version == version:
            return r
    return None


def copy_free_releases(n_p: int) -> tuple[str, ...]:
    """The checked releases whose b12x path uses an `n_p`-padded artifact without a copy."""
    return tuple(r.version for r in RELEASES if r.copy_free(n_p))


def runtime_copy_bytes(geometry: Geometry, rel: Release) -> int:
    """Bytes of the padded copy `rel` makes of one layer (FP4 weights and block scales; 0 when
    the layer is used as stored)."""
    n_c = rel.copied_intermediate(geometry.intermediate_padded)
    if n_c == geometry.intermediate_padded:
        return 0
    e, h = geometry.num_experts, geometry.hidden
    rows = n_c * (2 if geometry.gated else 1)
    sf13_r, sf13_c = swizzled_shape(rows, h)
    sf2_r, sf2_c = swizzled_shape(h, n_c)
    return e * (rows * h // 2 + h * n_c // 2 + sf13_r * sf13_c + sf2_r * sf2_c)


__all__ = [
    "DEFAULT_PAD_TILE",
    "PAD_TILES",
    "RELEASES",
    "Release",
    "copy_free_releases",
    "release",
    "runtime_copy_bytes",
]
