"""Group-wise quantisation and the int4 layout."""
import json

import numpy as np
import pytest
from conftest import qconvert

from formats.int4.layout import dequant_rows, pack, unpack
from qconvert.quant.groupwise import QuantSpec, dequantize, group_values, quantize


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    """Every width packs into ceil(cols * bits / 8) bytes, C and numpy alike, and unpacks to the same codes."""
    rng = np.random.default_rng(bits)
    for cols in (64, 63, 13, 1, 896):
        q = rng.integers(0, 1 << bits, size=(5, cols), dtype=np.uint8)
        b = pack(q, bits)
        assert b.shape == (5, -(-cols * bits // 8))
        assert np.array_equal(b, pack(q, bits, use_c=False))
        assert np.array_equal(unpack(b, bits, cols), q) and np.array_equal(unpack(b, bits, cols, use_c=False), q)
    if bits == 4:
        assert b[0, 0] == q[0, 0] | (q[0, 1] << 4)  # low nibble first


def test_pack_golden_bytes():
    """The documented bit order (docs/int4-format.md): code k of 8 at bits k*b.., little-endian."""
    q = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 5]], np.uint8)
    # 3 bits: 0b000_111_110_101_100_011_010_001 = 0x1f5 8d1 -> bytes d1 58 1f; then code 5 alone: 05
    assert pack(q, 3).tolist() == [[0xD1, 0x58, 0x1F, 0x05]]
    assert pack(q[:, :8], 5).tolist() == [[0x41, 0x0C, 0x52, 0xCC, 0x01]]


@pytest.mark.parametrize("scale_bits", [16, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_rtn_error_within_half_a_step(sym, group, scale_bits):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 300)) * 0.05).astype(np.float32)  # 300: last group is partial
    g = quantize(w, 4, group, sym, "rtn", scale_bits=scale_bits)
    assert g.scale_bits == scale_bits
    err = np.abs(dequantize(g) - w)
    s, m = group_values(g.scales, g.offsets, g.steps)
    step = np.abs(s)[:, np.arange(300) // group]
    # half a step, plus the rounding of scale and offset (f16; or 8-bit codes: the offset moves by up to half
    # an offset step, and the grid's far end by 15 (symmetric: 8) half scale steps), and the clipped extreme
    # of a symmetric group
    slack = (0.5 if not sym else 1.0) * 1.01
    extra = 1e-4
    if scale_bits == 8:
        st = g.steps.view(np.float16).astype(np.float32)
        extra = extra + 0.5 * st[:, 1:2] + (8 if sym else 15) * 0.5 * st[:, :1]
    assert (err <= step * slack + extra).all(), float((err / step).max())
    assert np.array_equal(dequantize(g), dequant_rows(g.q, g.scales, g.offsets, 4, group, g.steps))
    ref = np.sqrt(np.square(dequantize(quantize(w, 4, group, sym, "rtn")) - w).mean())
    assert np.sqrt(np.square(dequantize(g) - w).mean()) < 1.05 * ref  # 8-bit scale codes cost < 5% error


def test_scale_codes_stored_compactly():
    """scale_bits 8: uint8 scale codes (int8 when symmetric), int8 offset codes, f16 row steps; bits per
    weight as QuantSpec counts them."""
    w = np.random.default_rng(4).standard_normal((8, 896)).astype(np.float32)
    g = quantize(w, 4, 32, False, "search", scale_bits=8)
    assert g.scales.dtype == np.uint8 and g.offsets.dtype == np.int8 and g.steps.shape == (8, 2)
    assert quantize(w, 4, 32, True, "search", scale_bits=8).scales.dtype == np.int8
    assert QuantSpec(4, 32, False, 8).bits_per_weight(8, 896) == pytest.approx(4 + 16 / 32 + 32 / 896)
    # integer zeros: 8-bit scale code + 4-bit packed zero per group
    assert QuantSpec(4, 32, False, 8, zero_int=True).bits_per_weight(8, 896) == pytest.approx(4 + 12 / 32 + 32 / 896)
    assert QuantSpec(3, 64, False, 16).bits_per_weight(8, 896) == pytest.approx(3 + 32 / 64)
    assert QuantSpec(3, 64, False, 16, zero_int=True).bits_per_weight(8, 896) == pytest.approx(3 + 16 / 64 + 8 * 6 / 896)


@pytest.mark.parametrize("bits,scale_bits", [(4, 8), (3, 8), (5, 16), (8, 8)])
def test_integer_zeros_are_the_export_grid(bits, scale_bits):
    """zero_int: uint8 zeros in 1 .. 2^b - 1, every scale an exact f16 (8-bit codes on 3-significant-bit row
    steps), values exactly s * (q - z); the error stays within 15% of float offsets' (the grid must hold 0: on
    such data a brute-force search over scales and zeros does no better than 1.11x)."""
    w = (np.random.default_rng(5).standard_normal((16, 896)) * 0.02).astype(np.float32)
    g = quantize(w, bits, 32, False, "search", scale_bits=scale_bits, zero_int=True)
    assert g.offsets.dtype == np.uint8 and g.offsets.min() >= 1 and g.offsets.max() <= (1 << bits) - 1
    s, m = group_values(g.scales, g.offsets, g.steps)
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)
    idx = np.arange(896) // 32
    assert np.array_equal(dequantize(g), (g.q.astype(np.float32) - g.offsets[:, idx]) * s[:, idx])
    f = quantize(w, bits, 32, False, "search", scale_bits=scale_bits, zero_int=False)
    err = {k: np.sqrt(np.square(dequantize(x) - w).mean()) for k, x in (("int", g), ("float", f))}
    assert err["int"] < 1.15 * err["float"], err  # measured 1.00-1.14x; rounding the float fit's zero: 1.16x


def test_search_beats_rtn():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((256, 1024)) * 0.02).astype(np.float32)
    e = {m: float(np.square(dequantize(quantize(w, 4, 128, False, m)) - w).mean()) for m in ("rtn", "search")}
    assert e["search"] < 0.95 * e["rtn"], e


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(bits):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    g = quantize(w, bits, 64, False, "search")
    assert g.q.max() <= (1 << bits) - 1
    rel = np.sqrt(np.square(dequantize(g) - w).mean()) / w.std()
    assert rel < {2: 0.5, 3: 0.25, 8: 0.01}[bits], rel


def test_int4_folder_end_to_end(tiny, tmp_path, sample_tokens):
    """quantize -> inspect / verify / gguf-to-hf read it; the numpy decoder and transformers agree on it."""
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    from qconvert.testing.peers import hf_logits, kl_stats
    out = tmp_path / "int4"
    import re
    r = qconvert("quantize", str(tiny("moe")), str(out), "--group-size", "64", "--mix", "uniform", "--scale-bits",
                 "16", "--quiet")
    bpw = float(re.search(r"([0-9.]+) bits per weight", r.stdout).group(1))
    assert 4.5 <= bpw < 4.52, r.stdout  # 4 bits + 2 x f16 per 64; the 32-wide expert rows cost a little more
    assert "head lm_head.weight at 8 bits" in r.stdout
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta["quant_method"] == "qconvert-int4" and meta["group_size"] == 64 and meta["scheme"] == "asym"
    d = json.loads(qconvert("inspect", str(out), "--json").stdout)
    assert d["format"] == "int4" and d["types"]["int4 g64 asym"] > 0 and d["types"]["int8 g64 asym"] == 1
    rep = tmp_path / "r.json"
    qconvert("verify", str(tiny("moe")), str(out), "--ctx", "32", "--json", str(rep), check=False)
    assert json.loads(rep.read_text())["kind"] == "quantised"
    qconvert("gguf-to-hf", str(out), str(tmp_path / "hf"), "--dtype", "f32")
    ids = sample_tokens[:48]
    with open_model(str(out)) as src:
        ours = make_decoder(src, "numpy").logits(ids)
    s = kl_stats(hf_logits(tmp_path / "hf", ids), ours)
    assert s["mean_kl"] < 1e-6, s


def test_quantize_gguf_equals_hf_to_gguf(tiny, tmp_path):
    qconvert("quantize", str(tiny("h256")), str(tmp_path / "a.gguf"), "--format", "gguf", "--type", "q4_k_m", "--quiet")
    qconvert("hf-to-gguf", str(tiny("h256")), str(tmp_path / "b.gguf"), "--outtype", "q4_k_m")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_unknown_int4_version_is_refused(tiny, tmp_path):
    import struct
    out = tmp_path / "int4"
    qconvert("quantize", str(tiny("tied")), str(out), "--method", "rtn", "--quiet")
    f = out / "model.int4.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(b'"version":"2"', b'"version":"9"')
    f.write_bytes(bytes(data[:8]) + header + bytes(data[8 + n:]))
    r = qconvert("inspect", str(out), check=False)
    assert r.returncode == 1 and "version 9 is not supported" in r.stderr
