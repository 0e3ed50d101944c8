"""Dual chunk attention (Qwen2.5-1M): numpy decoder vs plain attention and vs a brute-force reference.

The reference below is a float64 forward pass of the tiny model written from the DCA formulas (as vLLM's
DualChunkRotaryEmbedding and dual-chunk flash attention compute them): for every (query i, key j) pair it looks
up the two rotary positions in an explicit table, rotates q and k by those angles and applies vLLM's length
scale to both; it shares no code with the decoder.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import qconvert
from safetensors.numpy import load_file

from formats.open import open_model
from qconvert.decoder import make_decoder
from qconvert.testing.peers import kl_stats

DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}  # chunk_len 24
# what a 1M config.json carries besides the sizes (realistic values, non-defaults for the HF-only fields)
ONE_M = {"max_position_embeddings": 1010000, "rope_theta": 10000000.0, "rms_norm_eps": 1e-05,
         "sliding_window": 131072, "max_window_layers": 1, "use_sliding_window": False,
         "initializer_range": 0.02, "use_cache": True}


def _with_dca(src, dst, dca=DCA, **extra):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dual_chunk_attention_config"] = dca
    cfg.update(extra)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def dca_model(tiny, tmp_path_factory):
    return _with_dca(tiny("tied"), tmp_path_factory.mktemp("dca") / "tied-dca")


def _ids(n):
    return [int(i) for i in np.random.default_rng(7).integers(0, 150_000, n)]


def pair_positions(i: int, j: int, chunk_size: int, local_size: int) -> tuple[int, int]:
    """(query position, key position) for query i attending key j <= i."""
    L = chunk_size - local_size
    ci, cj = i // L, j // L
    if ci == cj:                                   # intra: positions inside the chunk
        return i % L, j % L
    if ci == cj + 1:                               # successive: the query shifted one chunk, capped
        return min(i % L + L, chunk_size), j % L
    return min(2 * L - 1, chunk_size), j % L      # inter: the capped table's last entry (vLLM's q_inter)


def length_scale(n: int, original: int | None) -> float:
    """vLLM's factor on keys and queries of a call ending at sequence length n."""
    return max(1.0, 0.1 * math.log(n / original) + 1.0) if original else 1.0


def brute_force_logits(folder, ids, dca=DCA, calls=None, pairs=pair_positions):
    """float64 logits of the tiny Qwen2 checkpoint with DCA, every attention score from an explicit rotation.
    ``calls``: the lengths of the forward calls (prefill, then decode steps); default one prefill."""
    cfg = json.loads((folder / "config.json").read_text())
    W = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, theta = h // nh, cfg["rms_norm_eps"], cfg.get("rope_theta", 1e6)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    T = len(ids)
    ends = np.cumsum(calls or [T])
    scale = [length_scale(int(ends[np.searchsorted(ends, p, side="right")]),
                          dca.get("original_max_position_embeddings")) for p in range(T)]

    def rot(v, p):  # rotate-half rotary embedding of one vector at position p
        a = p * inv
        c, s = np.concatenate([np.cos(a)] * 2), np.concatenate([np.sin(a)] * 2)
        return v * c + np.concatenate([-v[hd // 2:], v[:hd // 2]]) * s

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = W["model.embed_tokens.weight"][ids]
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        a = norm(x, W[p + "input_layernorm.weight"])
        q = (a @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]).reshape(T, nh, hd)
        k = (a @ W[p + "self_attn.k_proj.weight"].T + W[p + "self_attn.k_proj.bias"]).reshape(T, nkv, hd)
        v = (a @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]).reshape(T, nkv, hd)
        out = np.zeros((T, nh, hd))
        for head in range(nh):
            kv = head // (nh // nkv)
            for i in range(T):
                s = np.empty(i + 1)
                for j in range(i + 1):
                    qp, kp = pairs(i, j, dca["chunk_size"], dca["local_size"])
                    s[j] = (rot(q[i, head] * scale[i], qp) @ rot(k[j, kv] * scale[j], kp)) / np.sqrt(hd)
                e = np.exp(s - s.max())
                out[i, head] = (e / e.sum()) @ v[: i + 1, kv]
        x = x + out.reshape(T, h) @ W[p + "self_attn.o_proj.weight"].T
        m = norm(x, W[p + "post_attention_layernorm.weight"])
        g = m @ W[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (m @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    x = norm(x, W["model.norm.weight"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def test_pair_positions_follow_the_formulas():
    # chunk_len 24: intra keeps distances, the next chunk is exact up to chunk_size then capped, older
    # chunks sit at chunk_size
    assert pair_positions(30, 26, 32, 8) == (6, 2)
    assert pair_positions(30, 10, 32, 8) == (30, 10)      # 24 + 6: exact distance 20
    assert pair_positions(40, 10, 32, 8) == (32, 10)      # 24 + 16 = 40 capped at 32
    assert pair_positions(50, 10, 32, 8) == (32, 10)      # two chunks back: inter
    assert pair_positions(20, 1, 16, 10) == (11, 1)       # chunk_len 6, local_size >= chunk_len: 2*6-1
    assert length_scale(32, 32) == 1.0 and abs(length_scale(100, 32) - 1.11394) < 1e-5


def test_equals_plain_attention_within_chunk_size(tiny, dca_model):
    """A sequence of chunk_size tokens (past chunk_len, so the successive-chunk path runs) gives the logits of
    plain attention, with and without streaming."""
    ids = _ids(DCA["chunk_size"])
    d = 0.0
    for stream in (False, True):  # logit_chunks as verify uses it (the head's blocking changes the rounding)
        plain, dca = (np.concatenate(list(make_decoder(open_model(str(m)), "numpy", stream=stream)
                                          .logit_chunks(ids, chunk=7 if stream else 128)))
                      for m in (tiny("tied"), dca_model))
        d = max(d, float(np.abs(plain - dca).max()))
    print(f"DCA within chunk_size vs plain: max |dlogit| {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("dca,n", [(DCA, 100),                                       # 5 chunks, length scale 1.114
                                   ({"chunk_size": 32, "local_size": 8}, 80),        # no length scaling
                                   ({"chunk_size": 16, "local_size": 10,             # inter position 11, not 16
                                     "original_max_position_embeddings": 16}, 40)],
                         ids=["scaled", "unscaled", "wide-local"])
def test_equals_brute_force_past_three_chunks(tiny, tmp_path, dca, n):
    model = _with_dca(tiny("tied"), tmp_path / "m", dca)
    ids = _ids(n)
    ours = make_decoder(open_model(str(model)), "numpy").logits(ids)
    ref = brute_force_logits(model, ids, dca)
    s = kl_stats(ref, ours)
    print(f"DCA {dca} vs brute force, {n} tokens: mean KL {s['mean_kl']:.2e}, max |dlogit| {s['max_abs_dlogit']:.2e}")
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s
    plain = make_decoder(open_model(str(tiny("tied"))), "numpy").logits(ids)
    assert kl_stats(ref, plain)["mean_kl"] > 100 * max(s["mean_kl"], 1e-9)  # the test can tell DCA from plain


def test_kv_cache_decoding_equals_prefill(tiny, tmp_path):
    """Without length scaling in play (original_max_position_embeddings >= the sequence), prefill then token by
    token gives the full prefill's logits across chunk boundaries."""
    model = _with_dca(tiny("tied"), tmp_path / "m", {**DCA, "original_max_position_embeddings": 256})
    ids = _ids(80)
    dec = make_decoder(open_model(str(model)), "numpy")
    full = dec.logits(ids)
    cache = dec.new_cache(len(ids))
    inc = np.concatenate([dec.forward(np.array(ids[:10]), cache)] + [dec.forward(np.array([t]), cache) for t in ids[10:]])
    print(f"KV-cache decoding vs prefill: max |dlogit| {np.abs(inc - full).max():.2e}")
    assert np.abs(inc - full).max() <= 1e-4


def test_kv_cache_decoding_follows_vllm_length_scale(dca_model):
    """With length scaling, each key keeps the factor of the call that wrote it (vLLM's schedule): prefill of
    30, then one token at a time, against the brute force with the same schedule."""
    ids = _ids(60)
    dec = make_decoder(open_model(str(dca_model)), "numpy")
    cache = dec.new_cache(len(ids))
    inc = np.concatenate([dec.forward(np.array(ids[:30]), cache)] + [dec.forward(np.array([t]), cache) for t in ids[30:]])
    ref = brute_force_logits(dca_model, ids, calls=[30] + [1] * 30)
    s = kl_stats(ref, inc)
    print(f"KV-cache decoding vs brute force (vLLM length scale): mean KL {s['mean_kl']:.2e}, "
          f"max |dlogit| {s['max_abs_dlogit']:.2e}")
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s


def test_torch_backend_refuses_past_chunk_size(dca_model):
    from formats.errors import QConvertError
    dec = make_decoder(open_model(str(dca_model)), "torch")
    ids = _ids(DCA["chunk_size"])
    ref = make_decoder(open_model(str(dca_model)), "numpy").logits(ids)
    assert np.abs(dec.logits(ids) - ref).max() <= 1e-3
    with pytest.raises(QConvertError, match="dual chunk attention is implemented in the numpy backend; use --backend numpy"):
        dec.logits(_ids(DCA["chunk_size"] + 1))


def test_config_survives_gguf_and_int4(tiny, tmp_path):
    src = _with_dca(tiny("tied"), tmp_path / "src", DCA, **ONE_M)
    qconvert("hf-to-gguf", str(src), str(tmp_path / "m.gguf"), "--outtype", "f16")
    qconvert("gguf-to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "back"))
    want = json.loads((src / "config.json").read_text())
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    diff = {k: (v, back.get(k)) for k, v in want.items() if k not in ("torch_dtype", "dtype") and back.get(k) != v}
    assert not diff, diff
    qconvert("quantize", str(src), str(tmp_path / "q"), "--quiet")
    q = json.loads((tmp_path / "q" / "config.json").read_text())
    assert q["dual_chunk_attention_config"] == DCA and q["sliding_window"] == 131072 and q["max_window_layers"] == 1
    r = qconvert("inspect", str(tmp_path / "m.gguf"))
    assert "dual chunk attention" in r.stdout and "llama.cpp ignores" in r.stdout
    j = json.loads(qconvert("inspect", str(tmp_path / "m.gguf"), "--json").stdout)
    assert j["config"]["dual_chunk_attention_config"] == DCA


def test_gguf_keys():
    from formats.model.config import ModelConfig
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, dual_chunk_attention_config=DCA,
                      sliding_window=131072, max_window_layers=1)
    kv = cfg.to_gguf_kv()
    assert kv["qwen2.dual_chunk_attention.chunk_size"] == 32 and kv["qwen2.dual_chunk_attention.local_size"] == 8
    assert kv["qwen2.dual_chunk_attention.original_context_length"] == 32
    assert kv["qwen2.hf.sliding_window"] == 131072 and kv["qwen2.hf.max_window_layers"] == 1
    assert kv["qwen2.hf.use_sliding_window"] is False and "qwen2.attention.sliding_window" not in kv
    back = ModelConfig.from_gguf_kv({"general.architecture": "qwen2", **kv}, 64, False)
    assert back.dual_chunk_attention_config == DCA and (back.sliding_window, back.max_window_layers) == (131072, 1)


@pytest.mark.parametrize("dca,msg", [
    ({"chunk_size": 8, "local_size": 8, "original_max_position_embeddings": 8}, "must be smaller than chunk_size"),
    ({"chunk_size": 32, "local_size": -1}, "positive integers"),
    ({"chunk_size": "32", "local_size": 8}, "positive integers"),
    ({"local_size": 8}, "positive integers")])
def test_invalid_dca_is_one_clear_error(tiny, tmp_path, dca, msg):
    bad = _with_dca(tiny("tied"), tmp_path / "bad", dca)
    r = qconvert("inspect", str(bad), check=False)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_use_sliding_window_is_refused(tiny, tmp_path):
    bad = _with_dca(tiny("tied"), tmp_path / "swa", DCA, use_sliding_window=True)
    r = qconvert("hf-to-gguf", str(bad), str(tmp_path / "x.gguf"), check=False)
    assert r.returncode != 0 and "use_sliding_window" in r.stderr and "Traceback" not in r.stderr, r.stderr
