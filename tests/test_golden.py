"""The golden artifacts under tests/data/golden/ (docs/FORMAT.md, section 10).

1. They still verify and load.
2. Today's converter reproduces them byte for byte from their committed sources, so any change
   to what the writer emits fails here until the goldens are regenerated on purpose
   (`python tests/data/golden/make_golden.py`) and FORMAT.md says what changed.
3. A reader written in this file from FORMAT.md alone (struct, json and arithmetic: no moepack,
   no safetensors, no torch float8) decodes them to the source checkpoint's values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flashinfer.cute_dsl.utils import convert_sf_to_mma_layout
from safetensors import safe_open

from moepack.runtime import load
from moepack.runtime.verify import verify_artifact

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
assert _spec and _spec.loader
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)
CASES = list(make_golden.CASES)
REGENERATE = "intended format change? run `python tests/data/golden/make_golden.py` and commit"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- 1. verifies and loads ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden_verifies_and_loads(case: str) -> None:
    art = make_golden.artifact_dir(case)
    report = verify_artifact(art)
    assert report.exit_code == 0, report.format_text()
    assert (
        report.bytes_hashed
        == sum((art / f).stat().st_size for f in _files(art))
        - (art / "manifest.json").stat().st_size
    )
    loaded = load(art, device="cpu")
    m = json.loads((art / "manifest.json").read_text())["model"]
    assert sorted(loaded.moe_layers) == m["moe_layers"]
    moe = loaded.moe_layers[m["moe_layers"][0]]
    x = torch.randn(3, m["moe_hidden_size"], generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0] * m["top_k"], [1] * m["top_k"], [-1] * m["top_k"]], dtype=torch.int32)
    y = moe(x.bfloat16(), ids, torch.ones(3, m["top_k"]))
    assert y.shape == (3, m["moe_hidden_size"]) and torch.isfinite(y.float()).all()
    assert y[:2].float().abs().sum() > 0 and not y[2].any()  # routed tokens move, unrouted not


# -- 2. today's converter reproduces them ------------------------------------------------------


def _comparable(manifest: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The manifest as JSON text with what legitimately varies blanked (tool versions, the local
    path the source was read from), and its fidelity figures apart (float rounding may vary)."""
    m = json.loads(json.dumps(manifest))
    m["tool"] = {k: (v if k == "name" else "*") for k, v in m["tool"].items()}
    m["source"]["path"] = "*"
    fidelity = []
    for layer in m["layers"]:
        fidelity.append(layer["fidelity"])
        layer["fidelity"] = {k: "*" for k in layer["fidelity"]}
    return json.dumps(m, indent=2), fidelity


@pytest.mark.parametrize("case", CASES)
def test_converter_reproduces_golden_byte_for_byte(case: str, tmp_path: Path) -> None:
    golden = make_golden.artifact_dir(case)
    fresh = make_golden.convert(case, tmp_path / "fresh")
    assert _files(fresh) == _files(golden), REGENERATE
    for rel in _files(golden):
        if rel != "manifest.json":
            assert (fresh / rel).read_bytes() == (golden / rel).read_bytes(), f"{rel}: {REGENERATE}"
    text_g, fid_g = _comparable(json.loads((golden / "manifest.json").read_text()))
    text_f, fid_f = _comparable(json.loads((fresh / "manifest.json").read_text()))
    assert text_f == text_g, REGENERATE
    for g, f in zip(fid_g, fid_f, strict=True):
        assert g.keys() == f.keys()
        for k in g:
            assert math.isclose(f[k], g[k], rel_tol=1e-5, abs_tol=1e-12), (k, f[k], g[k])


def test_golden_sources_are_what_the_script_writes(tmp_path: Path, monkeypatch) -> None:
    """The committed sources are the script's output today (synthetic generation unchanged)."""
    monkeypatch.setattr(make_golden, "HERE", tmp_path)
    for case in CASES:
        fresh = make_golden.write_source(case)
        committed = GOLDEN / case / "source"
        assert _files(fresh) == _files(committed)
        for rel in _files(committed):
            assert (fresh / rel).read_bytes() == (committed / rel).read_bytes(), rel
        shutil.rmtree(tmp_path / case)


# -- 3. an independent reader, from FORMAT.md only ---------------------------------------------

ALIGN = 4096


def e2m1(code: int) -> float:
    """FORMAT.md section 2: s e1 e0 m, bias 1, exponent field 0 subnormal."""
    s, e, m = code >> 3 & 1, code >> 1 & 3, code & 1
    mag = 0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -mag if s else mag


def e4m3(byte: int) -> float:
    """FORMAT.md section 2: s eeee mmm, bias 7, exponent field 0 subnormal, 0x7F/0xFF NaN."""
    s, e, m = byte >> 7, byte >> 3 & 15, byte & 7
    if e == 15 and m == 7:
        return math.nan
    mag = 2.0**-6 * m / 8 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8)
    return -mag if s else mag


_E4M3_POS = [(e4m3(b), b) for b in range(0x7F)]  # every non-negative finite value, ascending


def f32(x: float) -> float:
    """Round to float32 (the document's arithmetic is float32, rounded once)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def to_e4m3(x: float) -> int:
    """Round to nearest E4M3, ties to the even code, saturating at 448 (FORMAT.md section 2)."""
    assert x >= 0
    best = min(_E4M3_POS, key=lambda vb: (abs(vb[0] - x), vb[1] & 1))
    return best[1]


class LayerFile:
    """A moepack layer file read with nothing but FORMAT.md sections 3 and 4."""

    def __init__(self, path: Path) -> None:
        self.raw = path.read_bytes()
        (n,) = struct.unpack_from("<Q", self.raw)
        header = json.loads(self.raw[8 : 8 + n])
        self.data = 8 + n
        assert self.data % ALIGN == 0 and set(
            self.raw[8 + len(self.raw[8 : 8 + n].rstrip()) : self.data]
        ) <= {0x20}
        self.meta = header.pop("__metadata__")
        self.entries = header
        cursor, pads = 0, 0
        for name, t in header.items():  # header order is file order
            begin, end = t["data_offsets"]
            assert begin == cursor, name  # no gaps: fillers close them
            cursor = end
            if name.startswith("__pad__."):
                assert (
                    name == f"__pad__.{pads}" and t["dtype"] == "U8" and t["shape"] == [end - begin]
                )
                assert not any(self.raw[self.data + begin : self.data + end])
                pads += 1
            else:
                assert (self.data + begin) % ALIGN == 0, name
        assert self.data + cursor == len(self.raw)
        self.names = [k for k in header if not k.startswith("__pad__.")]

    def shape(self, name: str) -> list[int]:
        return self.entries[name]["shape"]

    def u8(self, name: str) -> bytes:
        begin, end = self.entries[name]["data_offsets"]
        return self.raw[self.data + begin : self.data + end]

    def floats(self, name: str) -> list[float]:
        assert self.entries[name]["dtype"] == "F32"
        b = self.u8(name)
        return list(struct.unpack(f"<{len(b) // 4}f", b))

    def scalar(self, name: str) -> float:
        assert self.shape(name) == []
        (v,) = self.floats(name)
        return v

    def codes(self, name: str) -> list[list[list[int]]]:
        """`[E, R, K]` E2M1 codes of a `[E, R, K/2]` U8 payload, low nibble = even column."""
        e, r, half = self.shape(name)
        b = self.u8(name)
        return [
            [
                [
                    c
                    for byte in b[(x * r + y) * half : (x * r + y + 1) * half]
                    for c in (byte & 15, byte >> 4)
                ]
                for y in range(r)
            ]
            for x in range(e)
        ]

    def scales(self, name: str) -> list[list[list[int]]]:
        """Row-major `[E, Rp, Cp]` E4M3 bytes of a swizzled tensor, by the inverse of FORMAT.md
        section 6: byte b -> tile (i, j), t = b % 512, r = 128 i + 32 ((t % 16) // 4) + t // 16,
        c = 4 j + t % 4."""
        assert self.entries[name]["dtype"] == "F8_E4M3"
        e, rp, cp = self.shape(name)
        raw = self.u8(name)
        out = [[[-1] * cp for _ in range(rp)] for _ in range(e)]
        for x in range(e):
            for b in range(rp * cp):
                i, j, t = b // (128 * cp), (b % (128 * cp)) // 512, b % 512
                r, c = 128 * i + 32 * ((t % 16) // 4) + t // 16, 4 * j + t % 4
                out[x][r][c] = raw[x * rp * cp + b]
        assert all(v >= 0 for m in out for row in m for v in row)  # a bijection
        return out


class Source:
    """The committed ModelOpt checkpoint, read with safetensors and torch's own float8."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.f = safe_open(str(root / "model.safetensors"), framework="pt")
        self.prefix = prefix

    def get(self, e: int, proj: str, what: str) -> torch.Tensor:
        return self.f.get_tensor(f"{self.prefix}.{e}.{proj}.{what}")

    def scalar(self, e: int, proj: str, what: str) -> float:
        return float(self.get(e, proj, what).float())

    def dequant(self, e: int, proj: str) -> torch.Tensor:
        packed = self.get(e, proj, "weight")
        codes = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).long()
        table = torch.tensor([e2m1(c) for c in range(16)])
        sf = self.get(e, proj, "weight_scale").float().repeat_interleave(16, -1)
        return table[codes] * sf * self.get(e, proj, "weight_scale_2").float()


def _cases() -> Iterator[tuple[str, dict[str, Any], LayerFile, Source]]:
    for case in CASES:
        art = make_golden.artifact_dir(case)
        m = json.loads((art / "manifest.json").read_text())
        for rec in m["layers"]:
            yield (
                case,
                m,
                LayerFile(art / rec["file"]),
                Source(make_golden.source_dir(case), rec["source_prefix"]),
            )


@pytest.mark.parametrize("case", CASES)
def test_independent_reader_decodes_golden_to_source_values(case: str) -> None:
    for _, m, f, src in (c for c in _cases() if c[0] == case):
        model, mode = m["model"], m["b12x_scale_mode"]
        E, H, n, n_p = (
            model[k]
            for k in (
                "num_experts",
                "moe_hidden_size",
                "intermediate_size",
                "intermediate_size_padded",
            )
        )
        gated = model["gated"]
        halves = ["up_proj", "gate_proj"] if gated else ["up_proj"]
        assert f.meta == {
            "format": "moepack",
            "format_version": str(m["format_version"]),  # the manifest's version (FORMAT.md 3)
            "layer": str(m["model"]["moe_layers"][0]),
        }
        expected_names = ["w13", "w2", "w13_sf", "w2_sf"] + (
            ["b12x.w13_sf", "b12x.w2_sf"] if mode == "baked" else []
        )
        expected_names += [
            "cutlass.fc1_act_global",
            "cutlass.fc1_alpha",
            "cutlass.fc2_act_global",
            "cutlass.fc2_alpha",
            "b12x.w1_alpha",
            "b12x.w2_alpha",
            "b12x.fc2_input_scale",
        ]
        expected_names += ["b12x.input_global_scale"] if mode == "shared" else []
        assert f.names == expected_names

        # Section 5: the ModelOpt scalars back from the stored ones.
        if mode == "shared":
            a13 = f.scalar("b12x.input_global_scale")
            ws2_13 = f.floats("b12x.w1_alpha")
        else:
            a13 = f.floats("b12x.w1_alpha")[0]
            assert f.floats("b12x.w1_alpha") == [a13] * E
            ws2_13 = [f32(al / a13) for al in f.floats("cutlass.fc1_alpha")]
        a2 = f.scalar("b12x.fc2_input_scale")
        ws2_2 = [f32(al / a2) for al in f.floats("cutlass.fc2_alpha")]
        # ... against the source: a = max over experts of input_scale, exactly; ws2 to an ulp.
        assert a13 == max(src.scalar(e, "up_proj", "input_scale") for e in range(E))
        assert a2 == max(src.scalar(e, "down_proj", "input_scale") for e in range(E))
        for e in range(E):
            for got, want in (
                (ws2_13[e], src.scalar(e, "up_proj", "weight_scale_2")),
                (ws2_2[e], src.scalar(e, "down_proj", "weight_scale_2")),
            ):
                assert math.isclose(got, want, rel_tol=2**-23), (e, got, want)
            if mode == "shared":
                assert ws2_13[e] == src.scalar(e, "up_proj", "weight_scale_2")  # exact
        # Section 4's formulas, float32 rounded once.
        assert f.scalar("cutlass.fc1_act_global") == f32(1 / a13)
        assert f.scalar("cutlass.fc2_act_global") == f32(1 / a2)
        exact13 = [src.scalar(e, "up_proj", "weight_scale_2") for e in range(E)]
        exact2 = [src.scalar(e, "down_proj", "weight_scale_2") for e in range(E)]
        assert f.floats("cutlass.fc1_alpha") == [f32(a13 * w) for w in exact13]
        assert f.floats("cutlass.fc2_alpha") == [f32(a2 * w) for w in exact2]
        want_w2_alpha = [a2] * E if mode == "baked" else [f32(w * a2) for w in exact2]
        assert f.floats("b12x.w2_alpha") == want_w2_alpha

        # Payloads and scales: decode, unpad, dequantize, compare with the source.
        w13, w2 = f.codes("w13"), f.codes("w2")
        sf13, sf2 = f.scales("w13_sf"), f.scales("w2_sf")
        assert f.shape("w13") == [E, len(halves) * n_p, H // 2] and f.shape("w2") == [
            E,
            H,
            n_p // 2,
        ]
        for e in range(E):
            for h, proj in enumerate(halves):
                want = src.dequant(e, proj)  # [n, H]
                rows = range(h * n_p, h * n_p + n)
                got = torch.tensor(
                    [
                        [
                            e2m1(w13[e][r][k]) * e4m3(sf13[e][r][k // 16]) * ws2_13[e]
                            for k in range(H)
                        ]
                        for r in rows
                    ]
                )
                torch.testing.assert_close(got.float(), want, rtol=2**-22, atol=0)
                assert not any(
                    w13[e][r][k] for r in range(h * n_p + n, (h + 1) * n_p) for k in range(H)
                )
                assert not any(
                    sf13[e][r][c]
                    for r in range(h * n_p + n, (h + 1) * n_p)
                    for c in range(len(sf13[e][0]))
                )
            want = src.dequant(e, "down_proj")  # [H, n]
            got = torch.tensor(
                [
                    [e2m1(w2[e][r][k]) * e4m3(sf2[e][r][k // 16]) * ws2_2[e] for k in range(n)]
                    for r in range(H)
                ]
            )
            torch.testing.assert_close(got.float(), want, rtol=2**-22, atol=0)
            assert not any(w2[e][r][k] for r in range(H) for k in range(n, n_p))
            assert not any(
                sf2[e][r][c]
                for r in range(len(sf2[e]))
                for c in range(len(sf2[e][0]))
                if r >= H or c >= n // 16
            )
            # Padding columns of the FC1 scales (pad4(H/16) > H/16 here) are zero too.
            assert not any(
                sf13[e][r][c] for r in range(len(sf13[e])) for c in range(H // 16, len(sf13[e][0]))
            )
        if mode == "baked":  # b12x scales: e4m3(f32(float(sf) * ws2)), same swizzle
            for name, plain, ws2 in (("b12x.w13_sf", sf13, exact13), ("b12x.w2_sf", sf2, exact2)):
                baked = f.scales(name)
                for e in range(E):
                    for r, row in enumerate(plain[e]):
                        assert [baked[e][r][c] for c in range(len(row))] == [
                            to_e4m3(f32(e4m3(b) * ws2[e])) for b in row
                        ], (name, e, r)


@pytest.mark.parametrize("case", CASES)
def test_mma_view_formula(case: str) -> None:
    """FORMAT.md section 6: `mma[i, j, m, k4, kt, e]` is scale (128 m + 32 j + i, 4 kt + k4) of
    expert e, and the view is FlashInfer's `convert_sf_to_mma_layout` of the same bytes."""
    for _, m, f, _src in (c for c in _cases() if c[0] == case):
        model = m["model"]
        rows13 = model["intermediate_size_padded"] * (2 if model["gated"] else 1)
        for name, rows, k in (
            ("w13_sf", rows13, model["moe_hidden_size"]),
            ("w2_sf", model["moe_hidden_size"], model["intermediate_size_padded"]),
        ):
            e, rp, cp = f.shape(name)
            flat = torch.frombuffer(bytearray(f.u8(name)), dtype=torch.uint8)
            mma = flat.view(e, rp // 128, cp // 4, 32, 4, 4).permute(3, 4, 1, 5, 2, 0)
            plain = f.scales(name)
            for i, j, mt, k4, kt, x in [
                (i, j, mt, k4, kt, x)
                for i in range(32)
                for j in range(4)
                for mt in range(rp // 128)
                for k4 in range(4)
                for kt in range(cp // 4)
                for x in range(e)
            ]:
                assert mma[i, j, mt, k4, kt, x] == plain[x][128 * mt + 32 * j + i][4 * kt + k4]
            theirs = convert_sf_to_mma_layout(
                flat.view(torch.float8_e4m3fn).view(e * rp, cp), m=rows, k=k, num_groups=e
            )
            assert theirs.shape == mma.shape and theirs.stride() == mma.stride()
            assert theirs.data_ptr() == mma.data_ptr()
