"""llama.cpp runs our GGUFs with the logits transformers computes on the source checkpoint."""
import pytest
from conftest import VARIANTS, qconvert

from qconvert.testing.peers import hf_logits, kl_stats, llama_convert, llama_logits

BOUNDS = {"f32": 1e-5, "f16": 5e-5, "bf16": 1.5e-3}


@pytest.fixture(scope="module")
def reference(tiny, sample_tokens):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = hf_logits(tiny(variant), sample_tokens)
        return cache[variant]
    return get


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_cpp_matches_transformers(tiny, tmp_path, sample_tokens, reference, variant, outtype):
    out = tmp_path / f"{variant}-{outtype}.gguf"
    qconvert("hf-to-gguf", str(tiny(variant)), str(out), "--outtype", outtype)
    ref = reference(variant)
    assert ref.std() > 3.0  # peaky logits, so errors show
    s = kl_stats(ref, llama_logits(out, sample_tokens))
    print(f"{variant} {outtype}: {s}")
    assert s["mean_kl"] <= BOUNDS[outtype], s
    assert s["top1"] >= 0.95, s


@pytest.mark.parametrize("variant", ["tied", "untied_yarn", pytest.param("h256", marks=pytest.mark.heavy),
                                     pytest.param("moe", marks=pytest.mark.heavy)])
def test_q8_0_matches_llama_cpp_converter(tiny, tmp_path, sample_tokens, reference, variant):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    qconvert("hf-to-gguf", str(tiny(variant)), str(ours), "--outtype", "q8_0")
    llama_convert(tiny(variant), theirs, "q8_0")
    ref = reference(variant)
    a = kl_stats(ref, llama_logits(ours, sample_tokens))
    b = kl_stats(ref, llama_logits(theirs, sample_tokens))
    print(f"{variant} q8_0 ours: {a}\n{variant} q8_0 llama.cpp converter: {b}")
    assert a["mean_kl"] <= 1.5 * b["mean_kl"], (a, b)
    assert a["top1"] >= 0.95, a
    assert 0 < a["mean_kl"] < 0.05  # q8_0 is lossy, but not broken


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_block_quants_byte_identical_to_llama_quantize(tiny, tmp_path, qtype):
    """From the same F16 GGUF, our tensors equal llama-quantize's (llama_model_quantize, pure, no imatrix)."""
    from formats.gguf.header import read_header
    from qconvert.testing.peers import llama_quantize
    f16 = tmp_path / "f16.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(f16), "--outtype", "f16")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    qconvert("hf-to-gguf", str(f16), str(ours), "--outtype", qtype)
    llama_quantize(f16, theirs, qtype.upper(), pure=True)
    a = {t.name: t for t in read_header(ours)[1]}
    b = {t.name: t for t in read_header(theirs)[1]}
    same = [n for n in a if a[n].type == b[n].type == qtype.upper()]
    assert len(same) >= 15  # every 2-D weight incl. token_embd and output
    with open(ours, "rb") as fa, open(theirs, "rb") as fb:
        for n in same:
            fa.seek(a[n].offset)
            fb.seek(b[n].offset)
            assert fa.read(a[n].nbytes) == fb.read(b[n].nbytes), n
