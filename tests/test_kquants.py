"""K-quant encoders and llama-quantize's mixtures, against llama.cpp's own quantiser."""
import numpy as np
import pytest

from conftest import qconvert
from formats import kernels
from formats.gguf_file import read_header
from qconvert.peers import kl_stats, llama_logits, llama_quantize


def _tensors(path):
    raw = path.read_bytes()
    return {t.name: (t, raw[t.offset:t.offset + t.nbytes]) for t in read_header(path)[1]}


@pytest.fixture(scope="module")
def f16_h256(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("kq") / "f16.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(p), "--outtype", "f16")
    return p


@pytest.mark.parametrize("qtype,ftype,max_ratio", [("Q4_K", "Q4_K_S", 1.03), ("Q5_K", "Q5_K_S", 1.03),
                                                   ("Q6_K", "Q6_K", 1.0)])
def test_k_quant_error_matches_llama_quantize(f16_h256, tmp_path, qtype, ftype, max_ratio):
    """Squared error of our encoder vs llama-quantize's (pure, no imatrix) on the same F16 tensors."""
    theirs = _tensors(llama_quantize(f16_h256, tmp_path / "t.gguf", ftype, pure=True))
    ours_err = theirs_err = 0.0
    n = identical = 0
    for name, (ti, data) in _tensors(f16_h256).items():
        if ti.type != "F16" or theirs[name][0].type != qtype:
            continue
        x = np.frombuffer(data, np.float16).astype(np.float32)
        ours = kernels.from_f32(x, qtype)
        ref = np.frombuffer(theirs[name][1], np.uint8)
        assert np.array_equal(kernels.to_f32(ours, qtype), kernels.to_f32(ours, qtype, use_c=False))
        ours_err += float(((kernels.to_f32(ours, qtype) - x) ** 2).sum())
        theirs_err += float(((kernels.to_f32(ref, qtype) - x) ** 2).sum())
        n += 1
        identical += ours.tobytes() == ref.tobytes()
    assert n == 16
    print(f"{qtype}: squared error ours / llama-quantize = {ours_err / theirs_err:.4f}, identical tensors {identical}/{n}")
    assert ours_err <= max_ratio * theirs_err


@pytest.mark.parametrize("variant", ["h256", "moe"])
def test_mixture_types_equal_llama_quantize(tiny, tmp_path, variant):
    f16 = tmp_path / "f16.gguf"
    qconvert("hf-to-gguf", str(tiny(variant)), str(f16), "--outtype", "f16")
    for mix in ("q4_k_m", "q4_k_s", "q5_k_m", "q6_k"):
        ours, theirs = tmp_path / f"o-{mix}.gguf", tmp_path / f"t-{mix}.gguf"
        qconvert("hf-to-gguf", str(f16), str(ours), "--outtype", mix)
        llama_quantize(f16, theirs, mix.upper())
        a = {t.name: t.type for t in read_header(ours)[1]}
        b = {t.name: t.type for t in read_header(theirs)[1]}
        assert a == b, (mix, {k: (a[k], b[k]) for k in a if a[k] != b[k]})
        assert abs(ours.stat().st_size - theirs.stat().st_size) <= 0.01 * theirs.stat().st_size


def test_q4_k_m_quality_in_line_with_llama_quantize(tiny, f16_h256, tmp_path, sample_tokens):
    ours, theirs = tmp_path / "o.gguf", tmp_path / "t.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(ours), "--outtype", "q4_k_m")
    llama_quantize(f16_h256, theirs, "Q4_K_M")
    ref = llama_logits(f16_h256, sample_tokens)
    a, b = kl_stats(ref, llama_logits(ours, sample_tokens)), kl_stats(ref, llama_logits(theirs, sample_tokens))
    print(f"q4_k_m KL ours {a['mean_kl']:.5f} llama-quantize {b['mean_kl']:.5f}")
    assert a["mean_kl"] <= 1.1 * b["mean_kl"], (a, b)
