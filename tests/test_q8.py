"""qconvert/decoder/_dot_q8.c: decoding products on llama.cpp's 8-bit activations.

The activation codes follow llama.cpp's rules (an independent numpy copy of them below), every product equals
the float64 product of the decoded weights and the decoded activations to float32 rounding, and the result does
not depend on the instruction set or the thread count. A decoder with ``activations = "q8"`` stays within
llama.cpp's own activation rounding of the float32 decoder, and on the real model within it of llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ

from formats import threads
from formats.ggml import codec
from formats.model.stored import PackedMatrix
from formats.open import open_model
from qconvert.decoder import make_decoder, products
from qconvert.decoder.native import LIB, set_isa
from qconvert.testing.peers import kl_stats

pytestmark = pytest.mark.skipif(LIB is None, reason="needs the compiled decoder kernels")

Q8_0_TYPES = ["Q8_0", "Q4_0", "Q5_0", "IQ4_NL"]          # llama.cpp's vec_dot_type Q8_0
Q8_K_TYPES = ["Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_XXS"]  # vec_dot_type Q8_K
NEEDS_IMATRIX = {"IQ2_XXS", "IQ3_XXS"}


@pytest.fixture(autouse=True)
def _defaults():
    yield
    threads.set_count(None)
    set_isa(-1)


def q8_0_rule(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's quantize_row_q8_0 (x86): d = amax / 127 stored as f16, codes round-half-even(x * 127 / amax)."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(b * inv[:, None]).astype(np.int8).reshape(-1), d


def q8_k_rule(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's quantize_row_q8_K_ref: m the first value of largest magnitude, codes min(127, nearest(-127 / m
    * x)), d = 1 / (-127 / m), sums of 16 codes."""
    b = x.reshape(-1, 256).astype(np.float32)
    m = b[np.arange(len(b)), np.abs(b).argmax(1)]
    iscale = (np.float32(-127) / m).astype(np.float32)
    q = np.minimum(127, np.rint(b * iscale[:, None])).astype(np.int8)
    d = (np.float32(1) / iscale).astype(np.float32)
    return q.reshape(-1), d, q.reshape(-1, 16).astype(np.int32).sum(1).astype(np.int16)


def act_codes(t: str, x: np.ndarray):
    cols = x.size
    q, d, bs = np.empty(cols, np.int8), np.empty(cols // 32, np.float32), np.empty(cols // 16, np.int16)
    blk = LIB.qc_q8_quantize(int(GQ[t]), x.ctypes.data, cols, q.ctypes.data, d.ctypes.data, bs.ctypes.data)
    return blk, q, d[: cols // blk], bs


def test_activation_codes_follow_llama_cpp():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1024) * 2).astype(np.float32)
    x[:32] = np.arange(32) - 15.5  # amax 15.5 ... and exact halves after scaling: ties go to even
    x[32:64] = np.float32(127) / 2 * np.sign(rng.standard_normal(32)) * (np.arange(32) % 3)
    x[256:512] = 0  # an all-zero Q8_K block: d = 0, codes 0
    blk, q, d, _ = act_codes("Q4_0", x)
    rq, rd = q8_0_rule(x)
    assert blk == 32 and np.array_equal(q, rq) and np.array_equal(d, rd)
    blk, q, d, bs = act_codes("Q4_K", x)
    with np.errstate(divide="ignore", invalid="ignore"):
        rq, rd, rbs = q8_k_rule(x)
    live = np.repeat(d != 0, 256)
    assert blk == 256 and d[1] == 0 and not q[256:512].any()
    assert np.array_equal(q[live], rq[live]) and np.array_equal(d[d != 0], rd[d != 0])
    assert np.array_equal(bs[np.repeat(d != 0, 16)], rbs[np.repeat(d != 0, 16)])
    assert np.abs(q.astype(int)).max() == 127


@pytest.fixture(scope="module")
def matrices():
    rng = np.random.default_rng(0)
    rows, cols = 48, 1024
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    imatrix = (rng.random(cols) + 0.1).astype(np.float32)
    return {t: PackedMatrix.ggml(t, codec.from_f32(w, t, imatrix=imatrix if t in NEEDS_IMATRIX else None), cols)
            for t in Q8_0_TYPES + Q8_K_TYPES}


@pytest.mark.parametrize("t", Q8_0_TYPES + Q8_K_TYPES)
def test_product_is_exact_on_the_rounded_activations(matrices, t):
    m = matrices[t]
    x = (np.random.default_rng(1).standard_normal(m.cols) * 3).astype(np.float32)
    assert products.q8_supported(m)
    blk, q, d, _ = act_codes(t, x)
    xq = (q.reshape(-1, blk).astype(np.float64) * d[:, None].astype(np.float64)).reshape(-1)
    ref = products.dequant(m).astype(np.float64) @ xq
    outs = []
    for level in (0, 1, 2):  # portable C, AVX2, AVX-512 VNNI (a level the CPU lacks runs the best it has)
        set_isa(level)
        for n in (1, 2, 3):
            threads.set_count(n)
            outs.append(products.matmul(m, x, q8=True))
    assert np.abs(outs[0] - ref).max() <= 1e-5 * np.abs(ref).max(), t
    assert all(np.array_equal(outs[0], o) for o in outs[1:]), t
    flt = products.matmul(m, x)
    assert np.abs(flt - ref).max() > 1e-3 * np.abs(ref).max()  # the rounding of x is real: not the float product


@pytest.mark.parametrize("t", Q8_0_TYPES + Q8_K_TYPES)
def test_product_is_llama_cpps_bit_for_bit(t):
    """Each row equals llama.cpp's own vec_dot on its own activation rounding (ggml-cpu through ctypes,
    qconvert.testing.ggml_cpu): same integer lanes, same fused float32 steps, same final sum. An odd number
    of 32-blocks (1120 columns) takes IQ4_NL's last-block tail; a few tokens at once (up to
    products.DECODE_ROWS) give each token's one-token result."""
    pytest.importorskip("llama_cpp")
    from qconvert.testing.ggml_cpu import vec_dot_rows

    rng = np.random.default_rng(5)
    rows, cols = 24, 1120 if t in Q8_0_TYPES else 1280
    w = (rng.standard_normal((rows, cols)) * rng.random((rows, 1))).astype(np.float32)
    imatrix = (rng.random(cols) + 0.1).astype(np.float32) if t in NEEDS_IMATRIX else None
    raw = np.frombuffer(bytes(codec.from_f32(w, t, imatrix=imatrix)), np.uint8).reshape(rows, -1)
    m = PackedMatrix.ggml(t, raw, cols)
    X = (rng.standard_normal((8, cols)) * 10.0 ** rng.integers(-1, 2, (8, 1))).astype(np.float32)
    ref = np.stack([vec_dot_rows(int(GQ[t]), raw, x) for x in X])
    for level in (0, 1, 2):
        set_isa(level)
        for x, r in zip(X[:3], ref):  # one token, as decoding runs it
            ours = products.matmul(m, x, q8=True)
            assert np.array_equal(ours, r), (t, level, np.abs(ours - r).max())
        for n in (1, 3):  # 8 and 7 tokens at once: tokens sharing each weight block, and the rest one by one
            threads.set_count(n)
            for k in (8, 7):
                ours = products.matmul(m, X[:k], q8=True)
                assert np.array_equal(ours, ref[:k]), (t, level, n, k, np.abs(ours - ref[:k]).max())


def test_types_without_a_kernel_keep_float_products():
    m = PackedMatrix.ggml("Q4_1", codec.from_f32(np.ones((4, 64), np.float32), "Q4_1"), 64)
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    assert not products.q8_supported(m)
    assert np.array_equal(products.matmul(m, x, q8=True), products.matmul(m, x))


def incremental(dec, ids, prefill: int) -> np.ndarray:
    cache = dec.new_cache(len(ids))
    parts = [dec.forward(np.asarray(ids[:prefill]), cache)]
    parts += [dec.forward(np.asarray([t]), cache) for t in ids[prefill:]]
    return np.concatenate(parts)


def test_q8_product_rounding_is_llama_cpps(tiny, tmp_path, sample_tokens):
    """A Q4_0 file: llama.cpp's logits of a first token (no attention mixing yet) are ours on 8-bit activations
    to float32 rounding, and clearly not our float32 products'."""
    from conftest import qconvert
    from qconvert.testing.peers import llama_logits

    out = tmp_path / "q4_0.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(out), "--outtype", "q4_0")
    ids = sample_tokens[:1]
    ref = llama_logits(out, ids)
    with open_model(str(out)) as src:
        dec = make_decoder(src)
        flt = dec.forward(np.asarray(ids), dec.new_cache(1))
        dec.activations = "q8"
        fast = dec.forward(np.asarray(ids), dec.new_cache(1))
    scale = np.abs(ref).max()
    assert np.abs(fast - ref).max() <= 1e-5 * scale
    assert np.abs(flt - ref).max() >= 1e-3 * scale


def test_generate_decodes_on_q8_on_request(tiny, tmp_path):
    from conftest import qconvert

    out = tmp_path / "m.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(out), "--outtype", "q4_k_m")
    args = ["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "6", "--ignore-eos"]
    assert "float32 products" in qconvert(*args).stdout
    assert "q8 activations" in qconvert(*args, "--activations", "q8").stdout


@pytest.mark.real
def test_real_model_q8_decoding_stays_near_llama_cpp(real_gguf):
    """Token by token on 8-bit activations against llama.cpp on the same file: within the bound the float32
    decoder is held to against llama.cpp (mean KL ≤ 2e-3, docs/benchmarks.md "Decoding speed")."""
    from qconvert.corpus import EVAL_MODULES, stdlib_text
    from qconvert.testing.peers import llama_logits, llama_tokenize

    ids = llama_tokenize(real_gguf, stdlib_text(EVAL_MODULES))[:64]
    ref = llama_logits(real_gguf, ids)
    with open_model(str(real_gguf)) as src:
        dec = make_decoder(src)
        dec.activations = "q8"
        ours = incremental(dec, ids, 1)
    s = kl_stats(ref, ours)
    assert s["mean_kl"] <= 2e-3 and s["top1"] >= 0.95, s


def bf16_rule(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, nearest with ties to even (numpy copy of qc_f32_to_bf16)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)


def widen(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def test_bfloat16_rounding_is_nearest_even():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5e-39, 3.4e38, np.inf, -np.inf,
                  np.nan], np.float32)
    x = np.concatenate([x, np.random.default_rng(2).standard_normal(1000).astype(np.float32)])
    b = np.empty(x.size, np.uint16)
    LIB.qc_f32_to_bf16(x.ctypes.data, b.ctypes.data, x.size)
    assert np.array_equal(b, bf16_rule(x))
    assert widen(b[1:3]).tolist() == [1.0, 1 + 2 ** -6]  # ties to even: down, then up
    y = np.empty(x.size, np.float32)
    LIB.qc_bf16_to_f32(b.ctypes.data, x.size, 1, x.size, y.ctypes.data, x.size)
    assert np.array_equal(y, widen(b), equal_nan=True) and np.isnan(y[8])


@pytest.mark.parametrize("t", ["Q4_K", "Q8_0", "IQ2_XXS", "F16"])
def test_prompt_products_in_the_q8_mode_are_bfloat16(matrices, t):
    """More rows than DECODE_ROWS: where the CPU has AMX, bfloat16 copies of x and of W multiplied by torch
    (float32 sums), the result rounded to bfloat16; elsewhere the float32 product."""
    if t not in matrices:
        rng = np.random.default_rng(4)
        matrices[t] = PackedMatrix.ggml(t, codec.from_f32(rng.standard_normal((48, 1024)).astype(np.float32), t), 1024)
    m = matrices[t]
    x = (np.random.default_rng(6).standard_normal((products.DECODE_ROWS + 5, m.cols)) * 3).astype(np.float32)
    w = products.dequant(m)
    ours, flt = products.matmul(m, x, q8=True), products.matmul(m, x)
    if not products._amx_bf16():
        assert np.array_equal(ours, flt)
        pytest.skip("no AMX: prompts keep float32 products")
    ref = widen(bf16_rule(x)).astype(np.float64) @ widen(bf16_rule(w)).astype(np.float64).T
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 2 ** -8 * scale  # the result's bfloat16 rounding and the sum order
    assert np.abs(flt - ref).max() > 1e-5 * scale  # the copies are rounded: not the float32 product
    assert np.array_equal(widen(bf16_rule(ours)), ours)  # every value a bfloat16
