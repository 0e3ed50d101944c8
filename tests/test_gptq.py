"""GPTQ: output-space error on correlated inputs, and end to end on a tiny model."""
import json

import numpy as np
import pytest
from conftest import qconvert

from qconvert.quant.gptq import gptq_matrix
from qconvert.quant.groupwise import QuantSpec, dequantize, quantize


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    cols = 256
    mix = rng.standard_normal((cols, cols)).astype(np.float32) * 0.15 + np.eye(cols, dtype=np.float32)
    X = rng.standard_normal((2048, cols)).astype(np.float32) @ mix
    X[:, :6] *= 15  # a few outlier channels, as real activations have
    W = (rng.standard_normal((192, cols)) * 0.03).astype(np.float32)
    return X, W


def _out_err(X, W, Q):
    return float(np.sqrt(np.square((Q - W) @ X.T).mean()))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group,act_order,scale_bits", [(32, False, 16), (128, False, 16), (128, True, 16),
                                                        (32, False, 8), (64, True, 8)])
def test_gptq_beats_search_in_output_space(sym, group, act_order, scale_bits):
    X, W = _problem()
    H = X.T.astype(np.float64) @ X
    g = gptq_matrix(W, H, QuantSpec(4, group, sym, scale_bits), act_order=act_order)
    assert g.q.shape == W.shape and g.q.max() <= 15 and g.scales.shape == (192, 256 // group)
    assert g.scale_bits == scale_bits
    e_search = _out_err(X, W, dequantize(quantize(W, 4, group, sym, "search", scale_bits=scale_bits)))
    e_gptq = _out_err(X, W, dequantize(g))
    print(f"sym={sym} g{group} act_order={act_order}: output RMS error gptq {e_gptq:.4f} search {e_search:.4f}")
    assert e_gptq < 0.7 * e_search


@pytest.mark.parametrize("zint", [False, True])
def test_gptq_identity_hessian_is_plain_rounding(zint):
    """With H = I there is nothing to compensate: GPTQ reduces to rounding on the fitted grid."""
    _, W = _problem(1)
    g = gptq_matrix(W, np.eye(W.shape[1]), QuantSpec(4, 64, False, 16, zint), method="rtn", damp=0.0)
    r = quantize(W, 4, 64, False, "rtn", zero_int=zint)
    assert np.array_equal(g.scales, r.scales) and np.array_equal(g.offsets, r.offsets)
    assert np.mean(g.q == r.q) > 0.999  # ties may round the other way in float32 vs C


@pytest.mark.heavy
def test_gptq_on_tiny_model_beats_search(tiny, tmp_path):
    """quantize --method gptq on a tiny model: its KL on held-out text is below search's."""
    from qconvert.corpus import EVAL_MODULES, stdlib_text
    src = tiny("h256")
    held_out = tmp_path / "eval.txt"  # stdlib code, like the calibration text but other modules
    held_out.write_text(stdlib_text(EVAL_MODULES[:2]))
    kl = {}
    for method in ("search", "gptq"):
        out = tmp_path / method
        r = qconvert("quantize", str(src), str(out), "--group-size", "64", "--mix", "uniform", "--method", method,
                     "--calib-samples", "16", "--calib-ctx", "128", "--report", str(tmp_path / f"{method}.png"),
                     "--quiet")
        assert (tmp_path / f"{method}.png").stat().st_size > 5000
        if method == "gptq":
            assert "calibration tokens" in r.stdout
        rep = tmp_path / f"{method}.json"
        # random tiny weights are far more fragile than a trained model's: compare KLs, not the default bounds
        qconvert("verify", str(src), str(out), "--ctx", "256", "--text", str(held_out), "--json", str(rep), "--max-kld", "5", "--min-top1", "0")
        kl[method] = json.loads(rep.read_text())["mean_kl"]
    print(f"tiny h256 int4 g64 mean KL: search {kl['search']:.5f}, gptq {kl['gptq']:.5f}")
    assert kl["gptq"] < 0.97 * kl["search"]  # measured 0.92x; GPTQ without its error feedback lands at ~1x


@pytest.mark.parametrize("sym,scale_bits", [(False, 16), (True, 16), (False, 8), (True, 8)])
def test_c_sweep_equals_numpy_reference(sym, scale_bits):
    """The C column sweep (rows on two threads) computes what the numpy reference sweep computes."""
    from concurrent.futures import ThreadPoolExecutor
    X, W = _problem(2)
    H = X.T.astype(np.float64) @ X
    spec = QuantSpec(4, 64, sym, scale_bits)
    with ThreadPoolExecutor(2) as pool:
        c = gptq_matrix(W, H, spec, pool=pool)
    r = gptq_matrix(W, H, spec, use_c=False)
    assert np.mean(c.q == r.q) > 0.999 and np.mean(c.scales == r.scales) > 0.999
    assert np.abs(dequantize(c) - dequantize(r)).max() <= 0.05 * np.abs(W).max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
                                   "IQ4_XS"])
def test_gptq_on_ggml_blocks(qtype):
    """GPTQ onto GGML blocks: the bytes decode (in the gguf package too) to exactly the values the sweep
    chose, and the output-space error is well below the imatrix-weighted encoder's (llama-quantize --imatrix)."""
    import gguf

    from formats.ggml import codec
    from qconvert.quant.gptq_ggml import gptq_ggml_matrix

    X, W = _problem(2)
    W = np.concatenate([W, W[:, :256] * 0.5], axis=1)  # 512 columns: two K-quant super-blocks
    X = np.concatenate([X, X * 0.3 + np.roll(X, 7, axis=1) * 0.2], axis=1)
    H = X.T.astype(np.float64) @ X
    raw, dq = gptq_ggml_matrix(W, H, qtype)
    assert raw.shape == (W.shape[0], W.shape[1] // gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
                         * gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    back = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(W.shape)
    assert np.array_equal(back, dq) and np.array_equal(codec.to_f32(raw, qtype).reshape(W.shape), dq)
    imp = (np.diag(H) / len(X)).astype(np.float32)
    rtn = codec.to_f32(codec.from_f32(W, qtype, imatrix=imp), qtype).reshape(W.shape)
    e_gptq, e_rtn = _out_err(X, W, dq), _out_err(X, W, rtn)
    print(f"{qtype}: output RMS error gptq {e_gptq:.4f}, imatrix-weighted encoder {e_rtn:.4f}")
    assert e_gptq < 0.75 * e_rtn


@pytest.mark.parametrize("qtype", ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"])
def test_gptq_on_lattice_grids(qtype):
    """GPTQ onto the i-quant grids (8 columns per grid code, formats/ggml/lattice.py): the rewritten blocks decode,
    in the gguf package and in our C decoder, to exactly the values the sweep chose, and the output-space error
    is below the imatrix-weighted encoder's (llama-quantize --imatrix) on the same statistics."""
    import gguf

    from formats.ggml import codec
    from qconvert.quant.gptq_ggml import gptq_ggml_matrix

    X, W = _problem(3)
    W = np.concatenate([W, W[:, :256] * 0.5], axis=1)
    X = np.concatenate([X, X * 0.3 + np.roll(X, 7, axis=1) * 0.2], axis=1)
    H = X.T.astype(np.float64) @ X
    imp = (np.diag(H) / len(X)).astype(np.float32)
    raw, dq = gptq_ggml_matrix(W, H, qtype, imp)
    size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    assert raw.shape == (W.shape[0], 2 * size)
    back = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(W.shape)
    assert np.array_equal(back, dq) and np.array_equal(codec.to_f32(raw, qtype).reshape(W.shape), dq)
    rtn = codec.to_f32(codec.from_f32(W, qtype, imatrix=imp), qtype).reshape(W.shape)
    e_gptq, e_rtn = _out_err(X, W, dq), _out_err(X, W, rtn)
    print(f"{qtype}: output RMS error gptq {e_gptq:.4f}, imatrix-weighted encoder {e_rtn:.4f}")
    assert e_gptq < 0.85 * e_rtn


@pytest.mark.heavy
@pytest.mark.parametrize("mixture", ["q4_0_mix", "iq2_xxs", "iq2_m"])
def test_gguf_gptq_cli_runs_in_llama_cpp(tiny, tmp_path, sample_tokens, mixture):
    """quantize --format gguf --method gptq writes an ordinary GGUF of the mixture's types: llama.cpp's logits
    on it match our decoder's on the same file, and (q4_0_mix) its KL to the f32 model is below llama-quantize-style
    encoding of the same mixture with the same statistics. At 2 bits a random tiny model is chaotic (KL ~2 either
    way), so the i-quant mixtures' quality is judged on the real model (scripts/bench_gguf_quality.py)."""
    from formats.gguf.header import read_header
    from formats.model.config import ModelConfig
    from qconvert.quant.mixtures import mixture_types
    from qconvert.testing.peers import llama_logits

    src = tiny("h256")
    kl = {}
    extra = []
    if mixture.startswith("iq"):
        qconvert("imatrix", str(src), "-o", str(tmp_path / "imatrix.gguf"), "--quiet")
        extra = ["--imatrix", str(tmp_path / "imatrix.gguf")]
    for method in ("search", "gptq"):
        out = tmp_path / f"{method}.gguf"
        qconvert("quantize", str(src), str(out), "--format", "gguf", "--type", mixture, "--method", method,
                 "--calib-samples", "16", "--calib-ctx", "128", "--quiet", *extra)
        qconvert("verify", str(src), str(out), "--text", str(_eval_text(tmp_path)), "--ctx", "256", "--json",
                 str(tmp_path / f"{method}.json"), "--max-kld", "50", "--min-top1", "0")
        kl[method] = json.loads((tmp_path / f"{method}.json").read_text())["mean_kl"]
    cfg = ModelConfig.from_hf_dict(json.loads((src / "config.json").read_text()))
    assert {t.name: t.type for t in read_header(tmp_path / "gptq.gguf")[1]} == mixture_types(cfg, mixture, bool(extra))
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    with open_model(str(tmp_path / "gptq.gguf")) as s:
        ours = make_decoder(s).logits(sample_tokens[:64])
    theirs = llama_logits(tmp_path / "gptq.gguf", sample_tokens[:64])
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()
    print(f"{mixture} KL gptq {kl['gptq']:.4f} search {kl['search']:.4f}")
    if not extra:
        assert kl["gptq"] < kl["search"]


def _eval_text(tmp_path):
    from qconvert.corpus import EVAL_MODULES, stdlib_text
    p = tmp_path / "eval.txt"
    if not p.exists():
        p.write_text(stdlib_text(EVAL_MODULES[:2]))
    return p


def test_propagation_cross_term_solves_the_asymmetric_problem():
    """Hessian.propagation: GPTQ-free check of the algebra. With quantised-model inputs X and the unquantised
    model's X_ref, W + W D H^-1 is the least-squares fit of X_ref W^T from X (undamped), so it reproduces the
    reference outputs better than W itself."""
    torch = pytest.importorskip("torch")
    from qconvert.quant.gptq import inverse_hessian_factor
    from qconvert.quant.hessian import Hessian
    X_ref, W = _problem(2)
    rng = np.random.default_rng(3)  # the quantised model's inputs: a linear distortion of the reference, plus noise
    A = np.eye(X_ref.shape[1], dtype=np.float32) + rng.standard_normal((X_ref.shape[1],) * 2).astype(np.float32) * 0.02
    X = X_ref @ A + rng.standard_normal(X_ref.shape).astype(np.float32) * 0.05
    h = Hessian(X.shape[1], cross=True)
    for a, b in zip(np.array_split(X, 4), np.array_split(X_ref, 4)):
        h.add(torch.from_numpy(a), torch.from_numpy(b))
    U = inverse_hessian_factor(h.H, 1e-6)
    Wt = W + h.propagation(W, U)
    lsq = np.linalg.lstsq(X.astype(np.float64), X_ref.astype(np.float64) @ W.T.astype(np.float64), rcond=None)[0].T
    assert np.abs(Wt - lsq).max() < 0.02 * np.abs(Wt - W).max()  # the change itself is ~W-sized (float32 H: ~1%)
    e_plain = np.sqrt(np.mean(np.square(X @ W.T - X_ref @ W.T)))
    e_prop = np.sqrt(np.mean(np.square(X @ Wt.T - X_ref @ W.T)))
    print(f"output RMS error against the reference: W {e_plain:.4f}, W + W D H^-1 {e_prop:.4f}")
    assert e_prop < 0.5 * e_plain


@pytest.mark.heavy
def test_gptq_propagation_on_tiny_model(tiny, tmp_path):
    """--propagate 0.5 (the unquantised model alongside): KL on held-out text below plain GPTQ's."""
    src = tiny("h256")
    kl = {}
    for prop in ("0", "0.5"):
        out = tmp_path / f"p{prop}"
        qconvert("quantize", str(src), str(out), "--group-size", "64", "--mix", "uniform", "--method", "gptq",
                 "--calib-samples", "64", "--calib-ctx", "128", "--propagate", prop, "--quiet")
        rep = tmp_path / f"p{prop}.json"
        qconvert("verify", str(src), str(out), "--ctx", "256", "--text", str(_eval_text(tmp_path)), "--json", str(rep),
                 "--max-kld", "5", "--min-top1", "0")
        kl[prop] = json.loads(rep.read_text())["mean_kl"]
    print(f"tiny h256 int4 g64 gptq mean KL: plain {kl['0']:.5f}, --propagate 0.5 {kl['0.5']:.5f}")
    assert kl["0.5"] < kl["0"]


def test_staged_pass_in_bfloat16_records_the_float32_hessians(tiny):
    """The dense-layer pass with --calib-dtype bfloat16: Hessians and layer outputs within bfloat16's rounding of
    the float32 pass's (and not bit-equal: the bfloat16 products really ran)."""
    pytest.importorskip("torch")
    from formats.open import open_model
    from qconvert.decoder.numpy_backend import NumpyDecoder
    from qconvert.decoder.rope import cos_sin
    from qconvert.quant.hessian import dense_layer_staged

    rng = np.random.default_rng(0)
    H, out = {}, {}
    with open_model(str(tiny("h256"))) as src:
        windows = [rng.integers(0, src.config.vocab_size, 64) for _ in range(4)]
        for dt in ("float32", "bfloat16"):
            dec = NumpyDecoder(src, stream=True)
            cos, sin = cos_sin(dec.inv_freq, dec.rope_scale, np.arange(64))
            xs = [dec.m["model.embed_tokens.weight"].rows_f32(w) for w in windows]
            keys = [k for k in dec.m if k.startswith("model.layers.0.") and dec.m[k].rows > 1]
            got: dict = {}
            out[dt], _ = dense_layer_staged(dec, 0, xs, cos, sin, keys, lambda k, h: got.__setitem__(k, h.H.copy()),
                                            dtype=dt)
            H[dt] = got
    assert len(H["float32"]) == 4 and H["float32"].keys() == H["bfloat16"].keys()
    for k, h32 in H["float32"].items():
        rel = np.linalg.norm(H["bfloat16"][k] - h32) / np.linalg.norm(h32)
        print(f"{k}: bfloat16 Hessian relative difference {rel:.2e}")
        assert 0 < rel < 0.01
    a, b = np.concatenate(out["float32"]), np.concatenate(out["bfloat16"])
    assert 0 < np.abs(a - b).max() < 0.02 * np.abs(a).max()


def test_wide_hessian_upper_triangle_equals_full_product():
    """Hessians of 2048+ columns accumulate only the upper triangle by column blocks and mirror it when read:
    the result equals X^T X (float64 reference), symmetric."""
    torch = pytest.importorskip("torch")
    from qconvert.quant.hessian import Hessian
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 2600)).astype(np.float32)
    h = Hessian(2600)
    for part in np.array_split(X, 3):
        h.add(torch.from_numpy(part))
    ref = X.T.astype(np.float64) @ X
    got = h.H
    assert h.n == 300 and np.array_equal(got, got.T)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_propagate_on_moe_is_one_error_line(tiny, tmp_path):
    """--propagate needs the dense staged pass: on an MoE model it is refused with one line, no output left."""
    out = tmp_path / "moe-int4"
    r = qconvert("quantize", str(tiny("moe")), str(out), "--method", "gptq", "--calib-samples", "2", "--calib-ctx",
                 "32", "--propagate", "0.5", "--quiet", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--propagate" in r.stderr
    assert not out.exists()
