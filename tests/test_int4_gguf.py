"""int4 folders -> GGUF by repacking the codes into Q4_0 / Q4_1 / Q8_0 blocks (formats/int4/to_gguf.py)."""
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import qconvert

from formats.errors import QConvertError
from formats.ggml import codec
from formats.ggml.dtypes import row_nbytes
from formats.gguf.header import read_header
from formats.int4.layout import dequant_rows, pack
from formats.int4.to_gguf import exact_reason, repack
from qconvert.quant.groupwise import quantize

MAPPED = re.compile(r"int4 -> GGUF: (\d+) of (\d+) quantised tensors mapped exactly")


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# (bits, sym, group size, row length, GGML type); 96 with g64 and 160 with g128 have a short last group
# of 32 columns: it still covers whole 32-blocks, so it maps exactly.
CASES = [(4, True, 32, 256, "Q4_0"), (4, True, 64, 96, "Q4_0"), (4, True, 128, 160, "Q4_0"),
         (4, False, 64, 256, "Q4_1"), (4, False, 128, 96, "Q4_1"), (4, False, 32, 64, "Q4_1"),
         (4, True, 64, 256, "Q4_1"), (4, True, 64, 256, "Q8_0"), (8, True, 32, 256, "Q8_0"),
         (8, True, 128, 160, "Q8_0"), (3, True, 64, 256, "Q4_0"), (3, False, 32, 256, "Q4_1"),
         (2, True, 32, 64, "Q4_0"), (5, True, 64, 256, "Q8_0"), (3, True, 32, 96, "Q8_0"),
         (5, False, 32, 256, "Q5_1"), (5, False, 128, 160, "Q5_1"), (5, True, 64, 256, "Q5_0"),
         (5, True, 32, 96, "Q5_1"), (4, False, 64, 256, "Q5_1"), (4, True, 32, 64, "Q5_0"), (3, False, 32, 64, "Q5_1")]


@pytest.mark.parametrize("bits,sym,group,cols,t", CASES)
def test_repack_equals_int4_dequant(bits, sym, group, cols, t):
    rng = np.random.default_rng(bits * 1000 + cols)
    w = (rng.standard_normal((24, cols)) * 0.05).astype(np.float32)
    g = quantize(w, bits, group, sym, "rtn")
    raw = repack(pack(g.q, bits), g.scales, g.offsets, bits, group, cols, t)
    assert raw.dtype == np.uint8 and raw.shape == (24, row_nbytes(t, cols))
    ref = dequant_rows(g.q, g.scales, g.offsets, bits, group)
    for use_c in (True, False):  # our C codec and the gguf package's numpy codec
        got = codec.to_f32(raw, t, use_c=use_c).reshape(24, cols)
        if sym and t in ("Q4_1", "Q5_1"):
            # d*q + m with m = -8d is the same number as s*(q-8), but gives +0.0 where s*(q-8) gives -0.0
            # (negative s, q = 8): equal values, zeros may differ in sign.
            assert np.array_equal(got, ref)
        else:
            assert np.array_equal(_bits(got), _bits(ref)), (use_c, int((_bits(got) != _bits(ref)).sum()))


def test_repack_block_layout():
    """Q4_0: byte j of a block holds value j (low nibble) and j + 16 (high nibble), after the f16 scale."""
    q = (np.arange(64, dtype=np.uint8) % 16).reshape(1, 64)
    s = np.array([[0x3C00, 0x4000]], np.uint16)  # f16 1.0 and 2.0
    raw = repack(pack(q, 4), s, None, 4, 32, 64, "Q4_0").reshape(2, 18)
    assert raw[:, :2].copy().view(np.uint16).tolist() == [[0x3C00], [0x4000]]
    assert raw[0, 2:].tolist() == [j | (j << 4) for j in range(16)]  # value j+16 has code j as well
    o = np.array([[0xBC00, 0x0000]], np.uint16)  # Q4_1: d then m (f16 -1.0, 0.0)
    raw1 = repack(pack(q, 4), s, o, 4, 32, 64, "Q4_1").reshape(2, 20)
    assert raw1[0, 2:4].copy().view(np.uint16)[0] == 0xBC00 and np.array_equal(raw1[:, 4:], raw[:, 2:])
    q8 = np.arange(32, dtype=np.uint8).reshape(1, 32) * 8
    raw8 = repack(q8, s[:, :1], None, 8, 32, 32, "Q8_0")
    assert raw8[0, 2:].view(np.int8).tolist() == [int(v) - 128 for v in q8[0]]


@pytest.mark.parametrize("args,why", [
    ((4, False, 64, 256, "Q4_0"), "asymmetric codes have an offset Q4_0 cannot hold"),
    ((8, False, 64, 256, "Q8_0"), "asymmetric codes have an offset Q8_0 cannot hold"),
    ((5, True, 64, 256, "Q4_0"), "5-bit codes do not fit Q4_0's 4 bits"),
    ((4, True, 64, 80, "Q4_0"), "row length 80 is not a multiple of 32"),
    ((4, True, 64, 256, "Q4_K"), "codes map onto Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 only, not Q4_K"),
    ((6, False, 32, 256, "Q5_1"), "6-bit codes do not fit Q5_1's 5 bits"),
    ((5, False, 32, 256, "Q5_0"), "asymmetric codes have an offset Q5_0 cannot hold"),
])
def test_inexact_is_refused(args, why):
    assert exact_reason(*args) == why
    bits, sym, group, cols, t = args
    q = np.zeros((2, (cols + 1) // 2 if bits == 4 else cols), np.uint8)
    s = np.zeros((2, -(-cols // group)), np.uint16)
    with pytest.raises(QConvertError, match=re.escape(why)):
        repack(q, s, None if sym else s, bits, group, cols, t)


def test_wrong_shapes_are_refused():
    with pytest.raises(QConvertError, match="the int4 file is corrupt"):
        repack(np.zeros((2, 32), np.uint8), np.zeros((2, 1), np.uint16), None, 4, 64, 32, "Q4_0")


def test_sym_q4_1_offset_overflow_is_refused():
    q = np.zeros((1, 16), np.uint8)
    s = np.array([[np.float16(10000.0).view(np.uint16)]], np.uint16)  # -8 x 10000 overflows f16
    with pytest.raises(QConvertError, match="overflows f16"):
        repack(q, s, None, 4, 32, 32, "Q4_1")


# ---- the command line on tiny models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_dir(tiny, tmp_path_factory):
    """int4_dir(variant, *quantize flags) -> int4 folder (cached per module). Unless the flags name a --mix,
    every matrix gets the same spec with f16 scales (--mix uniform --scale-bits 16): the exactly mappable case."""
    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("int4")

    def get(variant, *flags: str) -> Path:
        key = (str(variant), flags)
        if key not in made:
            out = root / f"{Path(str(variant)).name}{''.join(flags).replace('-', '_')}"
            src = variant if isinstance(variant, Path) else tiny(variant)
            extra = () if "--mix" in flags else ("--mix", "uniform", "--scale-bits", "16")
            qconvert("quantize", str(src), str(out), *flags, *extra, "--quiet")
            made[key] = out
        return made[key]
    return get


def _to_gguf(d: Path, out: Path, *args: str) -> tuple[str, int, int]:
    r = qconvert("hf-to-gguf", str(d), str(out), *args)
    m = MAPPED.search(r.stdout)
    assert m, r.stdout
    return r.stdout, int(m.group(1)), int(m.group(2))


def _compare(d: Path, gguf: Path) -> dict[str, tuple[str, bool, float]]:
    """canonical name -> (GGUF type, bit-identical to the int4 dequantisation, relative RMS difference)."""
    from formats.gguf.read import open_gguf
    from formats.open import open_model

    out = {}
    with open_model(str(d)) as a, open_gguf(gguf) as b:
        for n, t in a.tensors.items():
            x, y = t.numpy(), b.tensors[n].numpy()
            rel = float(np.sqrt(np.square(x - y).mean() / max(np.square(x).mean(), 1e-30)))
            out[n] = (b.tensors[n].stype, bool(np.array_equal(_bits(x), _bits(y))), rel)
    return out


HEAD = {"tied": "model.embed_tokens.weight", "untied_yarn": "lm_head.weight", "moe": "lm_head.weight"}


@pytest.mark.parametrize("variant,sym", [("tied", True), ("untied_yarn", False), ("moe", True), ("moe", False)])
def test_auto_maps_bit_for_bit(int4_dir, tmp_path, variant, sym):
    """quantize g64 -> hf-to-gguf: every matrix is bit-identical to the int4 one, except an asymmetric
    8-bit head, which Q8_0 cannot hold: requantised (and reported)."""
    d = int4_dir(variant, "--bits", "4", "--group-size", "64", *(["--sym"] if sym else []))
    out = tmp_path / "m.gguf"
    stdout, mapped, total = _to_gguf(d, out)
    cmp = _compare(d, out)
    head = HEAD[variant]
    head_gguf = "token_embd.weight" if variant == "tied" else "output.weight"
    for n, (t, same, rel) in cmp.items():
        if n == head:
            assert t == "Q8_0"
            if sym:
                assert same, n
            else:  # requantised from the 8-bit asymmetric values
                assert not same and rel < 0.01, (n, rel)
        else:
            assert same, (n, t, rel)  # 1-D tensors (F32) and mapped matrices alike
            assert t in ("F32", "Q4_0" if sym else "Q4_1"), (n, t)
    assert total == sum(1 for ti in read_header(out)[1] if ti.type != "F32")  # stacked experts count once
    assert mapped == total - (0 if sym else 1), stdout
    if sym:
        assert "none requantised" in stdout
    else:
        assert f"requantised 1: {head_gguf} -> Q8_0 (8-bit asym: asymmetric codes have an offset Q8_0 cannot hold)" \
            in stdout, stdout


# Mean KL of llama.cpp on the mapped GGUF vs our numpy decoder on the int4 folder (128 tokens), measured:
# untied_yarn sym g64 (Q4_0 + Q8_0 head) 1.13e-3, top-1 97.7%; tied asym g64 4-bit head (all Q4_1) 1.51e-4,
# top-1 99.2%. The weights are bit-identical (test above), and llama.cpp on an F32 GGUF of the same
# dequantised weights agrees to KL < 1e-6 (max |dlogit| ~1e-5; checked below as the control): what remains
# is llama.cpp rounding the activations to Q8_0 / Q8_1 blocks for its quantised dot products, amplified by
# the tiny models' peaky logits (std ~5). Bounds are ~3x the measurements.
@pytest.mark.parametrize("variant,flags,bound", [
    ("untied_yarn", ("--sym",), 3.5e-3),
    ("tied", ("--head-bits", "4"), 5e-4),
])
def test_llama_cpp_agrees_with_int4_decoder(int4_dir, tmp_path, sample_tokens, variant, flags, bound):
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    from qconvert.testing.peers import kl_stats, llama_logits

    d = int4_dir(variant, "--group-size", "64", *flags)
    out = tmp_path / "m.gguf"
    stdout, mapped, total = _to_gguf(d, out)
    assert mapped == total and "none requantised" in stdout, stdout
    with open_model(str(d)) as src:
        ours = make_decoder(src, "numpy", "cpu", "float32").logits(sample_tokens)
    s = kl_stats(ours, llama_logits(out, sample_tokens))
    print(f"{variant} {flags}: {s}")
    assert s["mean_kl"] <= bound, s
    assert s["top1"] >= 0.95, s
    qconvert("hf-to-gguf", str(d), str(tmp_path / "f32.gguf"), "--outtype", "f32")
    control = kl_stats(ours, llama_logits(tmp_path / "f32.gguf", sample_tokens))
    assert control["mean_kl"] < 1e-6, control


def test_row_not_in_blocks_is_requantised(int4_dir, tmp_path, monkeypatch):
    """intermediate 80: down_proj rows of 80 (g64: a short last group of 16) cannot be Q4 blocks -> F16."""
    from qconvert.testing import tiny as tiny_mod

    v = dict(tiny_mod.VARIANTS["tied"], intermediate_size=80)
    monkeypatch.setitem(tiny_mod.VARIANTS, "ff80", v)
    hf = tiny_mod.make_tiny(tmp_path / "ff80", "ff80")
    d = int4_dir(hf, "--group-size", "64", "--sym")
    out = tmp_path / "m.gguf"
    stdout, mapped, total = _to_gguf(d, out)
    assert (mapped, total) == (13, 15), stdout
    assert ("requantised 2: blk.0.ffn_down.weight, blk.1.ffn_down.weight -> F16 "
            "(4-bit sym: row length 80 is not a multiple of 32)") in stdout, stdout
    for n, (t, same, rel) in _compare(d, out).items():
        if n.endswith("down_proj.weight"):
            assert t == "F16" and rel < 1e-3, (n, t, rel)
        else:
            assert same, n


def test_other_bit_widths(int4_dir, tmp_path):
    """3-bit symmetric codes are a subset of Q4_0's grid (code q + 4): mapped exactly; 5-bit asymmetric codes
    are Q5_1's grid: mapped exactly too (the 8-bit asymmetric head has no exact type: requantised to Q8_0)."""
    d3 = int4_dir("tied", "--bits", "3", "--group-size", "32", "--sym", "--head-bits", "3")
    stdout, mapped, total = _to_gguf(d3, tmp_path / "b3.gguf")
    assert mapped == total == 15 and "Q4_0 x15" in stdout, stdout
    assert all(same for _, same, _ in _compare(d3, tmp_path / "b3.gguf").values())

    d5 = int4_dir("tied", "--bits", "5", "--group-size", "32", "--scale-bits", "16")
    stdout, mapped, total = _to_gguf(d5, tmp_path / "b5.gguf")
    assert (mapped, total) == (14, 15) and "Q5_1 x14" in stdout, stdout
    assert "requantised 1: token_embd.weight -> Q8_0 (8-bit asym: asymmetric codes have an offset Q8_0 cannot " \
        "hold)" in stdout, stdout
    cmp = _compare(d5, tmp_path / "b5.gguf")
    assert all(same for n, (t, same, _) in cmp.items() if t == "Q5_1") and sum(t == "Q5_1" for t, _, _ in cmp.values()) == 14


def test_explicit_outtypes(int4_dir, tmp_path):
    """--outtype q8_0 maps 4-bit symmetric codes exactly (int8 q - 8); q4_0 of asymmetric codes requantises;
    a float outtype dequantises (and says so)."""
    sym = int4_dir("tied", "--bits", "4", "--group-size", "64", "--sym")
    stdout, mapped, total = _to_gguf(sym, tmp_path / "q8.gguf", "--outtype", "q8_0")
    assert mapped == total == 15 and "Q8_0 x15" in stdout, stdout
    assert all(same for _, same, _ in _compare(sym, tmp_path / "q8.gguf").values())

    asym = int4_dir("tied", "--bits", "4", "--group-size", "64")
    stdout, mapped, total = _to_gguf(asym, tmp_path / "q40.gguf", "--outtype", "q4_0")
    assert (mapped, total) == (0, 15) and "asymmetric codes have an offset Q4_0 cannot hold" in stdout, stdout

    r = qconvert("hf-to-gguf", str(sym), str(tmp_path / "f16.gguf"), "--outtype", "f16")
    assert "no tensor mapped exactly; every matrix dequantised and re-encoded as f16" in r.stdout, r.stdout


def test_default_mix_maps_with_rounded_scales(int4_dir, tmp_path, sample_tokens):
    """The default int4 (--mix roles, 8-bit scale codes): 4-bit matrices still map onto Q4_1 with their codes
    kept (scales rounded to f16, and said so), 5-bit ones onto Q5_1; 8-bit asymmetric k/v are requantised. llama.cpp on the
    result stays close to our decoder on the int4 folder."""
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    from qconvert.testing.peers import kl_stats, llama_logits

    d = int4_dir("untied_yarn", "--mix", "roles")
    out = tmp_path / "m.gguf"
    stdout, mapped, total = _to_gguf(d, out)
    assert mapped > 0 and f"{mapped} of them with their 8-bit scale codes or integer-zero offsets rounded to f16 (codes kept)" in stdout, stdout
    assert "Q5_1 x" in stdout and "(8-bit asym: asymmetric codes have an offset Q8_0 cannot hold)" in stdout, stdout
    cmp = _compare(d, out)
    assert sum(t == "Q5_1" for t, _, _ in cmp.values()) >= 8  # the 5-bit feed-forward matrices map onto Q5_1
    q41 = [rel for t, same, rel in cmp.values() if t in ("Q4_1", "Q5_1")]
    assert q41 and max(q41) < 2e-3, max(q41)  # f16 rounding of the scales only
    with open_model(str(d)) as src:
        ours = make_decoder(src, "numpy", "cpu", "float32").logits(sample_tokens)
    s = kl_stats(ours, llama_logits(out, sample_tokens))
    print(f"default mix -> auto GGUF: {s}")
    assert s["mean_kl"] <= 0.01 and s["top1"] >= 0.9, s


def test_gguf_roles_type_follows_the_int4_plan(tiny, tmp_path):
    """quantize --format gguf --type roles: the int4 --mix roles plan's bits on GGML types (k/v 8-bit -> Q8_0,
    q/o 5-bit -> Q5_1, feed-forward 4/5-bit -> Q4_1/Q5_1, the tied head 8-bit -> Q8_0), and closer to the model
    than every matrix in Q4_1. (An untied embedding gets the plan's 3 bits: Q3_K, or Q4_0 on short rows.)"""
    import json

    from formats.gguf.header import read_header
    src = tiny("tied")
    kl = {}
    for t in ("roles", "q4_1"):
        out = tmp_path / f"{t}.gguf"
        qconvert("quantize", str(src), str(out), "--format", "gguf", "--type", t, "--quiet")
        qconvert("verify", str(src), str(out), "--ctx", "128", "--json", str(tmp_path / f"{t}.json"),
                 "--max-kld", "5", "--min-top1", "0")
        kl[t] = json.loads((tmp_path / f"{t}.json").read_text())["mean_kl"]
    types = {x.name: x.type for x in read_header(tmp_path / "roles.gguf")[1]}
    assert types["blk.0.attn_k.weight"] == types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_output.weight"] == "Q5_1"
    assert {types[f"blk.{i}.ffn_{p}.weight"] for i in (0, 1) for p in ("gate", "up", "down")} <= {"Q4_1", "Q5_1"}
    assert types["token_embd.weight"] == "Q8_0"
    assert kl["roles"] < kl["q4_1"]
