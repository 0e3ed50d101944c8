"""The reference decoders (numpy, torch-CPU) against transformers, incremental decoding, CUDA skip."""
import numpy as np
import pytest
from conftest import VARIANTS

from formats.open import open_model
from qconvert.decoder import make_decoder
from qconvert.testing.peers import hf_logits, kl_stats


@pytest.fixture(scope="module")
def reference(tiny, sample_tokens):
    cache = {}

    def get(variant, dtype="f32"):
        if (variant, dtype) not in cache:
            cache[variant, dtype] = hf_logits(tiny(variant, dtype), sample_tokens)
        return cache[variant, dtype]
    return get


def _decoder(path, backend, **kw):
    with open_model(str(path)) as src:
        return make_decoder(src, backend, **kw)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_matches_transformers(tiny, sample_tokens, reference, variant, backend):
    s = kl_stats(reference(variant), _decoder(tiny(variant), backend).logits(sample_tokens))
    print(f"{backend} {variant}: {s}")
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s


@pytest.mark.parametrize("variant", ["h256", "moe"])
def test_numpy_decoder_on_bf16_weights(tiny, sample_tokens, reference, variant):
    """16-bit checkpoints stay 16-bit (memory-mapped, as stored); the maths is still float32 (transformers upcasts
    the same weights)."""
    dec = _decoder(tiny(variant, "bf16"), "numpy")
    assert dec.m["model.layers.0.self_attn.q_proj.weight"].stype == "BF16"
    ids = sample_tokens[:64]
    ref = reference(variant, "bf16")[:64]
    cache = dec.new_cache(len(ids))
    inc = np.concatenate([dec.forward(np.array(ids[:4]), cache)] + [dec.forward(np.array([t]), cache) for t in ids[4:]])
    s = kl_stats(ref, inc)
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("variant", ["untied_yarn", "moe"])
def test_kv_cache_equals_full_sequence(tiny, sample_tokens, variant, backend):
    dec = _decoder(tiny(variant), backend)
    ids = sample_tokens[:48]
    full = dec.logits(ids)
    cache = dec.new_cache(len(ids))
    parts = [dec.forward(np.array(ids[:20]), cache)] + [dec.forward(np.array([t]), cache) for t in ids[20:]]
    parts.append(np.zeros((0, full.shape[1]), np.float32))
    inc = np.concatenate(parts)
    assert np.abs(inc - full).max() <= 1e-3
    assert (inc.argmax(-1) == full.argmax(-1)).all()
    with pytest.raises(ValueError, match="KV cache holds"):
        dec.forward(np.array([1]), cache)


def test_cuda_path_skips_cleanly_or_matches(tiny, sample_tokens, reference):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        from formats.errors import QConvertError
        with pytest.raises(QConvertError, match="no CUDA device"):
            _decoder(tiny("tied"), "torch", device="cuda")
        pytest.skip("no CUDA device")
    s = kl_stats(reference("moe"), _decoder(tiny("moe"), "torch", device="cuda", dtype="bfloat16").logits(sample_tokens))
    assert s["mean_kl"] <= 1e-3, s


@pytest.mark.real
def test_numpy_decoder_reads_q4_k_m_gguf(real_gguf, real_hf):
    """The real 0.5B straight from its Q4_K_M GGUF vs transformers on the dequantised HF weights."""
    from conftest import SAMPLE
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(real_hf))(SAMPLE * 2)["input_ids"][:300]
    s = kl_stats(hf_logits(real_hf, ids), _decoder(real_gguf, "numpy").logits(ids))
    print(f"real Q4_K_M GGUF numpy decoder vs transformers: {s}")
    assert s["mean_kl"] <= 1e-4 and s["top1"] >= 0.99, s


def test_fused_softmax_and_silu_kernels_match_float64():
    """The C prefill kernels (causal softmax with a fast exp, silu(g) * u) against float64 formulas."""
    from qconvert.decoder import matvec
    rng = np.random.default_rng(3)
    b, S, pos0 = 40, 100, 60
    x = (rng.standard_normal((3, b, S)) * 8).astype(np.float32)
    ref = x.astype(np.float64)
    ref[..., np.arange(S)[None, :] > (pos0 + np.arange(b))[:, None]] = -np.inf
    ref = np.exp(ref - ref.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    got = matvec.softmax_causal(x.copy(), b, pos0)
    assert np.abs(got - ref).max() <= 1e-6 and np.all(got[..., 0, pos0 + 1:] == 0)
    gu = (rng.standard_normal((70, 2 * 333)) * 6).astype(np.float32)
    g, u = gu[:, :333], gu[:, 333:]
    want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    got = matvec.silu_mul(g, u)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
    assert matvec._LIB is not None  # the build ships the kernels; the numpy fallback is for other platforms
