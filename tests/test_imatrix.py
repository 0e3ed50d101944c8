"""Importance matrices: the weighted encoders against ggml's own, the file formats, the computation against
transformers, and whole files against llama-quantize --imatrix."""
import ctypes
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import qconvert

from formats.errors import QConvertError
from formats.ggml import codec
from formats.gguf.header import read_header
from formats.gguf.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from qconvert.quant.mixtures import MIXTURES
from qconvert.testing.peers import llama_quantize

WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(next(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def _hostile_rows(rows: int = 48, cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(1e-4, 30, (rows, 1)).astype(np.float32)
    x[0], x[1], x[2, 7], x[5, ::2] = 0, 0.25, 4000.0, 0
    x[3], x[4] = np.abs(x[3]), -np.abs(x[4]) - 1
    x[6] = rng.standard_normal(cols) * 1e-7
    x[7, :32] = 0  # one all-zero block in an otherwise normal row
    return x


@pytest.mark.parametrize("qtype", WEIGHTED)
def test_weighted_encoders_bit_identical_to_ggml(qtype):
    """With an importance matrix (including zero weights) our encoders write exactly ggml_quantize_chunk's bytes
    (the code path of llama-quantize --imatrix); IQ4 types also without one."""
    lib = _ggml()
    q = gguf.GGMLQuantizationType[qtype]
    lib.ggml_quantize_init(int(q))
    x = _hostile_rows()
    rng = np.random.default_rng(11)
    im = (rng.gamma(0.5, 1.0, x.shape[1]) * 3).astype(np.float32)
    im[5], im[100:132] = 0, 0
    block, size = gguf.constants.GGML_QUANT_SIZES[q]
    for w in (im, None) if qtype.startswith("IQ4") else (im,):
        ref = np.zeros(x.size // block * size, np.uint8)
        lib.ggml_quantize_chunk(int(q), x.ctypes.data, ref.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if w is None else w.ctypes.data)
        ours = codec.from_f32(x, qtype, imatrix=w)
        bad = np.flatnonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(1))
        assert bad.size == 0, f"{qtype}: {bad.size} blocks differ, first {bad[:5]}"
        if w is not None:
            weighted = ours
    dq = codec.to_f32(weighted, qtype)
    assert np.array_equal(dq, gguf.quants.dequantize(weighted, q).reshape(-1))  # our decoder = the gguf package's
    # the weights matter: the weighted error is lower than that of the unweighted fit
    plain = codec.to_f32(codec.from_f32(x, qtype), qtype).reshape(x.shape)
    err = lambda y: float((((y.reshape(x.shape) - x) ** 2) * im).sum())  # noqa: E731
    assert err(dq) < err(plain)


def test_imatrix_files_round_trip_and_legacy(tmp_path):
    """Our GGUF imatrix reads back exactly; the legacy .dat layout gives the same weights; bad files are one
    clear error."""
    rng = np.random.default_rng(0)
    im = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), np.float32) * 10, np.array([300])),
                  "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((4, 32), np.float32), np.array([5, 0, 7, 1]))},
                 ["calib.txt"], 6, 512)
    write_imatrix(im, tmp_path / "a.gguf")
    back = read_imatrix(tmp_path / "a.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 6, 512)
    for k, e in im.entries.items():
        assert np.array_equal(back.entries[k].sums, e.sums) and np.array_equal(back.entries[k].counts, e.counts)
    w = back.weights("blk.0.ffn_down_exps.weight", 32, 4)
    assert np.array_equal(w[1], np.ones(32, np.float32)) and np.allclose(w[2], im.entries[
        "blk.0.ffn_down_exps.weight"].sums[2] / 7)
    with pytest.raises(QConvertError, match="another model"):
        back.weights("blk.0.attn_q.weight", 128)
    with pytest.raises(QConvertError, match="exists"):
        write_imatrix(im, tmp_path / "a.gguf")
    # legacy: values stored as (sums / tokens) * ncall
    vals = (im.entries["blk.0.attn_q.weight"].sums[0] / 300 * 3).astype(np.float32)
    name = b"blk.0.attn_q.weight"
    dat = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 3, 64) + vals.tobytes() + \
        struct.pack("<ii", 6, 9) + b"calib.txt"
    (tmp_path / "b.dat").write_bytes(dat)
    leg = read_imatrix(tmp_path / "b.dat")
    assert leg.legacy and leg.datasets == ["calib.txt"] and leg.chunk_count == 6
    assert np.allclose(leg.weights("blk.0.attn_q.weight", 64), back.weights("blk.0.attn_q.weight", 64), rtol=1e-6)
    (tmp_path / "c.dat").write_bytes(dat[:40])
    with pytest.raises(QConvertError, match="ends inside"):
        read_imatrix(tmp_path / "c.dat")
    (tmp_path / "d.dat").write_bytes(dat.replace(vals[:1].tobytes(), np.float32([np.nan]).tobytes()))
    with pytest.raises(QConvertError, match="non-finite"):
        read_imatrix(tmp_path / "d.dat")


@pytest.fixture(scope="module")
def h256_f16_and_imatrix(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("im")
    f16, im = d / "f16.gguf", d / "im.gguf"
    qconvert("hf-to-gguf", str(tiny("h256")), str(f16), "--outtype", "f16")
    out = qconvert("imatrix", str(f16), "-o", str(im), "--ctx", "64", "--chunks", "6", "--quiet")
    assert "6 x 64 tokens" in out.stdout
    return f16, im


def test_imatrix_matches_transformers_activations(tiny, h256_f16_and_imatrix):
    """Our imatrix of the HF checkpoint equals the mean squared inputs of transformers' Linear layers."""
    import torch
    from transformers import AutoModelForCausalLM

    from formats.model.names import hf_to_gguf
    from formats.open import open_model
    from qconvert.corpus import CALIB_MODULES, stdlib_text, windows
    from qconvert.quant.imatrix import compute_imatrix
    from qconvert.text import encode

    path = tiny("h256")
    with open_model(str(path)) as s:
        ws = windows(encode(s.tokenizer, stdlib_text(CALIB_MODULES)), 3, 64)
        ours = compute_imatrix(s, ws)
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    sums: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: sums.__setitem__(
        name, sums.get(name, 0) + (a[0].reshape(-1, a[0].shape[-1]).double() ** 2).sum(0).numpy()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        for w in ws:
            model(torch.tensor(w)[None])
    for h in hooks:
        h.remove()
    assert len(sums) == 14 and set(ours.entries) == {hf_to_gguf(k + ".weight")[0] for k in sums}
    for name, ref in sums.items():
        e = ours.entries[hf_to_gguf(name + ".weight")[0]]
        assert e.counts.tolist() == [3 * 64]
        cos = float(e.sums[0] @ ref / np.linalg.norm(e.sums[0]) / np.linalg.norm(ref))
        assert cos > 0.99999, (name, cos)
        assert np.allclose(e.sums[0], ref, rtol=2e-3, atol=1e-6 * ref.max()), name


def test_imatrix_moe_counts_per_expert(tiny, tmp_path):
    """MoE: one row per expert, counting only the tokens routed to it (top-k per token); shared expert and
    router see every token."""
    from formats.open import open_model
    from qconvert.quant.imatrix import compute_imatrix

    with open_model(str(tiny("moe"))) as s:
        cfg = s.config
        ws = [np.arange(100, 164), np.arange(300, 364)]
        im = compute_imatrix(s, ws)
    e = im.entries["blk.0.ffn_gate_exps.weight"]
    assert e.sums.shape == (cfg.num_experts, cfg.hidden_size)
    assert e.counts.sum() == 128 * cfg.num_experts_per_tok and (e.counts < 128).all()
    assert np.array_equal(e.counts, im.entries["blk.0.ffn_up_exps.weight"].counts)
    assert im.entries["blk.0.ffn_down_exps.weight"].sums.shape == (cfg.num_experts, cfg.moe_intermediate_size)
    for k in ("ffn_gate_inp", "ffn_gate_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp", "attn_q"):
        assert im.entries[f"blk.0.{k}.weight"].counts.tolist() == [128], k


@pytest.mark.parametrize("mix", ["q4_0_mix", "q5_1_mix", "q4_k_m", "q3_k_m", "q2_k", "q6_k", "iq4_xs",
                                 pytest.param("iq4_nl", marks=pytest.mark.heavy)])
def test_gguf_with_imatrix_equals_llama_quantize(h256_f16_and_imatrix, tmp_path, mix):
    """From the same F16 GGUF and imatrix file, every tensor of our file has llama-quantize --imatrix's type
    and bytes (llama_model_quantize given the weights our reader loaded)."""
    f16, imf = h256_f16_and_imatrix
    im = read_imatrix(imf)
    ours, theirs = tmp_path / "o.gguf", tmp_path / "t.gguf"
    out = qconvert("hf-to-gguf", str(f16), str(ours), "--outtype", mix, "--imatrix", str(imf), "--quiet")
    assert f"imatrix: {len(im.entries)} entries" in out.stdout
    llama_quantize(f16, theirs, MIXTURES[mix][1], imatrix={k: e.weights() for k, e in im.entries.items()})
    a, b = read_header(ours)[1], read_header(theirs)[1]
    assert {t.name: t.type for t in a} == {t.name: t.type for t in b}
    ra, rb = ours.read_bytes(), theirs.read_bytes()
    B = {t.name: t for t in b}
    differ = [t.name for t in a if ra[t.offset:t.offset + t.nbytes] != rb[B[t.name].offset:B[t.name].offset
                                                                          + B[t.name].nbytes]]
    # a tensor without an imatrix entry (the embedding) in Q2_K / Q3_K gets our own unweighted search, whose
    # error is below ggml's reference (test_kquants.py); everything else is byte-identical
    for name in differ:
        t = next(t for t in a if t.name == name)
        assert t.type in ("Q2_K", "Q3_K") and name not in im.entries, name
        x = np.frombuffer(f16.read_bytes(), np.uint8)
        t16 = next(u for u in read_header(f16)[1] if u.name == name)
        x = x[t16.offset:t16.offset + t16.nbytes].view(np.float16).astype(np.float32)
        err = [float(((codec.to_f32(np.frombuffer(r[u.offset:u.offset + u.nbytes], np.uint8), u.type) - x) ** 2).sum())
               for r, u in ((ra, t), (rb, B[name]))]
        assert err[0] <= err[1], (name, err)
    kv = read_header(ours)[0]
    assert kv["quantize.imatrix.entries_count"] == len(im.entries)
