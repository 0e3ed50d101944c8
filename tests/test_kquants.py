"""K-quant encoders and llama-quantize's mixtures, against llama.cpp's own quantiser."""
import gguf
import numpy as np
import pytest
from conftest import qconvert

from formats.ggml import codec
from formats.gguf.header import read_header
from formats.model.config import ModelConfig
from qconvert.quant.mixtures import MIXTURES, mixture_types
from qconvert.testing import proxy
from qconvert.testing import tiny as tiny_mod
from qconvert.testing.peers import kl_stats, llama_logits, llama_quantize, llama_quantize_types


def _tensors(path):
    raw = path.read_bytes()
    return {t.name: (t, raw[t.offset:t.offset + t.nbytes]) for t in read_header(path)[1]}


@pytest.fixture(scope="module")
def f16_h256(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("kq") / "f16.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(p), "--outtype", "f16")
    return p


@pytest.mark.parametrize("qtype,ftype,max_ratio", [pytest.param("Q4_K", "Q4_K_S", 1.0, marks=pytest.mark.heavy), ("Q5_K", "Q5_K_S", 1.0),
                                                   ("Q6_K", "Q6_K", 1.0), pytest.param("Q2_K", "Q2_K", 1.0, marks=pytest.mark.heavy),
                                                   ("Q3_K", "Q3_K_S", 1.0)])
def test_k_quant_error_matches_llama_quantize(f16_h256, tmp_path, qtype, ftype, max_ratio):
    """Squared error of our encoder vs llama-quantize's (pure, no imatrix) on the same F16 tensors."""
    theirs = _tensors(llama_quantize(f16_h256, tmp_path / "t.gguf", ftype, pure=True))
    ours_err = theirs_err = 0.0
    n = identical = 0
    for name, (ti, data) in _tensors(f16_h256).items():
        if ti.type != "F16" or theirs[name][0].type != qtype:
            continue
        x = np.frombuffer(data, np.float16).astype(np.float32)
        ours = codec.from_f32(x, qtype)
        ref = np.frombuffer(theirs[name][1], np.uint8)
        assert np.array_equal(codec.to_f32(ours, qtype), codec.to_f32(ours, qtype, use_c=False))
        ours_err += float(((codec.to_f32(ours, qtype) - x) ** 2).sum())
        theirs_err += float(((codec.to_f32(ref, qtype) - x) ** 2).sum())
        n += 1
        identical += ours.tobytes() == ref.tobytes()
    assert n == 16
    print(f"{qtype}: squared error ours / llama-quantize = {ours_err / theirs_err:.4f}, identical tensors {identical}/{n}")
    assert ours_err <= max_ratio * theirs_err
    if qtype in EXACT:
        assert identical == n


EXACT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # Q2_K / Q3_K: our own, lower-error search


@pytest.mark.parametrize("qtype", EXACT)
def test_encoders_bit_identical_to_ggml_reference(qtype):
    """Our encoders against ggml's own C reference quantisers (quantize_row_*_ref in llama-cpp-python's
    libggml-base), on hostile blocks: zeros, constants, outliers, one sign, tiny and huge magnitudes."""
    import ctypes
    from pathlib import Path

    import llama_cpp

    lib = ctypes.CDLL(str(next(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((96, 256)).astype(np.float32) * rng.uniform(1e-4, 30, (96, 1)).astype(np.float32)
    x[0], x[1], x[2, 7], x[5, ::2] = 0, 0.25, 4000.0, 0
    x[3], x[4] = np.abs(x[3]), -np.abs(x[4]) - 1
    x[6] = rng.standard_normal(256) * 1e-7
    x = x.reshape(-1)
    block, size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    ref = np.zeros(x.size // block * size, np.uint8)
    getattr(lib, f"quantize_row_{qtype.lower().replace('_k', '_K')}_ref")(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(ref.ctypes.data), ctypes.c_int64(x.size))
    ours = codec.from_f32(x, qtype)
    bad = np.flatnonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(1))
    assert bad.size == 0, f"{qtype}: {bad.size} of {x.size // block} blocks differ, first {bad[:5]}"


def test_k_quant_bytes_decode_the_same_in_gguf_package():
    """Every K-quant we write decodes identically with the gguf package and with our C dequant,
    including all-zero, constant, one-outlier and same-sign blocks."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32) * rng.uniform(1e-3, 3, (64, 1)).astype(np.float32)
    x[0] = 0
    x[1] = 0.25
    x[2, 7] = 40.0
    x[3] = np.abs(x[3])
    x[4] = -np.abs(x[4]) - 1
    x[5, ::2] = 0
    x = np.concatenate([x.reshape(-1), (rng.standard_normal(4096) * 1e-6).astype(np.float32)])
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        raw = codec.from_f32(x, qtype)
        ours = codec.to_f32(raw, qtype)
        theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)
        assert theirs.shape == x.shape and np.array_equal(ours, theirs), qtype
        rel = float(((ours - x) ** 2).sum() / (x ** 2).sum())
        assert rel < {"Q2_K": 0.15, "Q3_K": 0.05, "Q4_K": 0.012, "Q5_K": 0.003, "Q6_K": 0.001}[qtype], (qtype, rel)


_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "iq4_xs", "q4_0_mix")
_EXTRA_VARIANTS = {  # llama.cpp's special cases: an 80-layer dense Qwen2 ("70B") and an 8-expert MoE
    "l80": dict(tiny_mod.VARIANTS["untied_yarn"], num_hidden_layers=80, rope_scaling=None),
    "moe8": dict(tiny_mod.VARIANTS["moe"], num_experts=8),
}


@pytest.mark.parametrize("variant,mixes", [pytest.param("h256", _MIXES, marks=pytest.mark.heavy), pytest.param("moe", _MIXES, marks=pytest.mark.heavy), ("untied_yarn", ("q2_k",)),
                                           ("l80", ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s")),
                                           ("moe8", ("q2_k", "q3_k_l", "q4_k_m"))])
def test_mixture_types_equal_llama_quantize(tiny, tmp_path, monkeypatch, variant, mixes):
    """Per-tensor types equal llama-quantize's (no imatrix) and file sizes are within 1%."""
    if variant in _EXTRA_VARIANTS:
        monkeypatch.setitem(tiny_mod.VARIANTS, variant, _EXTRA_VARIANTS[variant])
    f16 = tmp_path / "f16.gguf"
    qconvert("hf-to-gguf", str(tiny(variant)), str(f16), "--outtype", "f16")
    for mix in mixes:
        ours, theirs = tmp_path / f"o-{mix}.gguf", tmp_path / f"t-{mix}.gguf"
        qconvert("hf-to-gguf", str(f16), str(ours), "--outtype", mix)
        llama_quantize(f16, theirs, MIXTURES[mix][1])
        a = {t.name: t.type for t in read_header(ours)[1]}
        b = {t.name: t.type for t in read_header(theirs)[1]}
        assert a == b, (mix, {k: (a[k], b[k]) for k in a if a[k] != b[k]})
        assert abs(ours.stat().st_size - theirs.stat().st_size) <= 0.01 * theirs.stat().st_size


@pytest.mark.parametrize("shape", list(proxy.SHAPES))
def test_mixture_types_equal_llama_quantize_at_full_size(shape, tmp_path):
    """Every real family member at its real depth and widths (header-only F16 GGUF, llama-quantize's dry run):
    80-layer 72B with 29568-wide ffn_down rows, 8 kv heads, 64 experts + shared expert, tied heads."""
    f16 = proxy.write_shape_gguf(tmp_path / "shape.gguf", proxy.proxy_config(shape, dtype="f16"))
    cfg = ModelConfig.from_hf_dict(proxy.proxy_config(shape))
    # some choices depend on whether an imatrix is given (a one-entry imatrix is enough to switch them)
    im = {"blk.0.attn_q.weight": np.ones(cfg.hidden_size, np.float32)}
    for mix in MIXTURES:
        for imatrix in (None, im) if mix in _IMATRIX_DEPENDENT else (None,):
            theirs = llama_quantize_types(f16, MIXTURES[mix][1], imatrix=imatrix)
            ours = mixture_types(cfg, mix, imatrix is not None)
            assert ours == theirs, (shape, mix, imatrix is not None, {k: (ours.get(k), theirs.get(k))
                                                                    for k in set(ours) | set(theirs)
                                                                    if ours.get(k) != theirs.get(k)})


_IMATRIX_DEPENDENT = ("iq4_nl", "iq4_xs", "q4_0_mix", "q5_0_mix")


@pytest.fixture(scope="module")
def f16_h256_logits(f16_h256, sample_tokens):
    """llama.cpp's logits of the F16 h256 file over the sample tokens (the KL reference)."""
    return llama_logits(f16_h256, sample_tokens)


@pytest.mark.parametrize("mix,max_ratio", [pytest.param("q4_k_m", 1.1, marks=pytest.mark.heavy), ("q3_k_m", 1.15), ("q2_k", 1.15)])
def test_k_mixture_quality_in_line_with_llama_quantize(tiny, f16_h256, f16_h256_logits, tmp_path, sample_tokens,
                                                       mix, max_ratio):
    """llama.cpp loads our mixture; its mean KL vs the F16 file is close to llama-quantize's own."""
    ours, theirs = tmp_path / "o.gguf", tmp_path / "t.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(ours), "--outtype", mix)
    llama_quantize(f16_h256, theirs, mix.upper())
    ref = f16_h256_logits
    a, b = kl_stats(ref, llama_logits(ours, sample_tokens)), kl_stats(ref, llama_logits(theirs, sample_tokens))
    print(f"{mix} KL ours {a['mean_kl']:.5f} llama-quantize {b['mean_kl']:.5f} ({a['mean_kl'] / b['mean_kl']:.3f}x)")
    assert a["mean_kl"] <= max_ratio * b["mean_kl"], (a, b)
