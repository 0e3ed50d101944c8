"""Dual chunk attention (Qwen2.5-1M): numpy decoder vs plain attention and vs a brute-force reference.

The reference below is a float64 forward pass of the tiny model written from the DCA paper's formulas: for
every (query i, key j) pair it looks up the two rotary positions in an explicit table and rotates q and k by
those angles; it shares no code with the decoder.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import qconvert
from formats.detect import open_model
from qconvert.decoder import make_decoder
from qconvert.peers import kl_stats

DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}  # chunk_len 24


def _with_dca(src, dst, dca=DCA):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dual_chunk_attention_config"] = dca
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def dca_model(tiny, tmp_path_factory):
    return _with_dca(tiny("tied"), tmp_path_factory.mktemp("dca") / "tied-dca")


def _ids(n):
    return [int(i) for i in np.random.default_rng(7).integers(0, 150_000, n)]


def pair_positions(i: int, j: int, chunk_size: int, local_size: int) -> tuple[int, int]:
    """(query position, key position) for query i attending key j <= i, from the DCA formulas."""
    L = chunk_size - local_size
    ci, cj = i // L, j // L
    if ci == cj:
        return i % L, j % L
    if ci == cj + 1:
        return min(i % L + L, chunk_size), j % L
    return chunk_size, j % L


def brute_force_logits(folder, ids, dca=DCA):
    """float64 logits of the tiny Qwen2 checkpoint with DCA, every attention score from an explicit rotation."""
    cfg = json.loads((folder / "config.json").read_text())
    W = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, theta = h // nh, cfg["rms_norm_eps"], cfg.get("rope_theta", 1e6)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)

    def rot(v, p):  # rotate-half rotary embedding of one vector at position p
        a = p * inv
        c, s = np.concatenate([np.cos(a)] * 2), np.concatenate([np.sin(a)] * 2)
        return v * c + np.concatenate([-v[hd // 2:], v[:hd // 2]]) * s

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    T = len(ids)
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
                    qp, kp = pair_positions(i, j, dca["chunk_size"], dca["local_size"])
                    s[j] = rot(q[i, head], qp) @ rot(k[j, kv], kp) / np.sqrt(hd)
                e = np.exp(s - s.max())
                out[i, head] = (e / e.sum()) @ v[: i + 1, kv]
        x = x + out.reshape(T, h) @ W[p + "self_attn.o_proj.weight"].T
        m = norm(x, W[p + "post_attention_layernorm.weight"])
        g = m @ W[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (m @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    x = norm(x, W["model.norm.weight"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def test_pair_positions_follow_the_paper():
    # chunk_len 24: intra keeps distances, the next chunk is exact for local_size queries then capped, older
    # chunks sit at chunk_size
    assert pair_positions(30, 26, 32, 8) == (6, 2)
    assert pair_positions(30, 10, 32, 8) == (30, 10)      # 24 + 6: exact distance 20
    assert pair_positions(40, 10, 32, 8) == (32, 10)      # 24 + 16 = 40 capped at 32
    assert pair_positions(50, 10, 32, 8) == (32, 10)      # two chunks back: inter


def test_equals_plain_attention_within_chunk_size(tiny, dca_model):
    """A sequence of chunk_size tokens (past chunk_len, so the successive-chunk path runs) gives the logits of
    plain attention."""
    ids = _ids(DCA["chunk_size"])
    plain = make_decoder(open_model(str(tiny("tied"))), "numpy").logits(ids)
    dca = make_decoder(open_model(str(dca_model)), "numpy").logits(ids)
    assert np.abs(plain - dca).max() <= 1e-5


def test_equals_brute_force_past_three_chunks(tiny, dca_model):
    ids = _ids(100)  # chunks of 24: five chunks, every query kind
    ours = make_decoder(open_model(str(dca_model)), "numpy").logits(ids)
    ref = brute_force_logits(dca_model, ids)
    s = kl_stats(ref, ours)
    print(f"DCA vs brute force: mean KL {s['mean_kl']:.2e}, max |dlogit| {s['max_abs_dlogit']:.2e}")
    assert s["mean_kl"] <= 1e-6 and s["top1"] == 1.0, s
    plain = make_decoder(open_model(str(tiny("tied"))), "numpy").logits(ids)
    assert kl_stats(ref, plain)["mean_kl"] > 100 * max(s["mean_kl"], 1e-9)  # the test can tell DCA from plain


def test_kv_cache_decoding_equals_prefill(dca_model):
    ids = _ids(80)
    dec = make_decoder(open_model(str(dca_model)), "numpy")
    full = dec.logits(ids)
    cache = dec.new_cache(len(ids))
    inc = np.concatenate([dec.forward(np.array(ids[:10]), cache)] + [dec.forward(np.array([t]), cache) for t in ids[10:]])
    assert np.abs(inc - full).max() <= 1e-4


def test_torch_backend_refuses_past_chunk_size(dca_model):
    from formats.errors import QConvertError
    dec = make_decoder(open_model(str(dca_model)), "torch")
    ids = _ids(DCA["chunk_size"])
    ref = make_decoder(open_model(str(dca_model)), "numpy").logits(ids)
    assert np.abs(dec.logits(ids) - ref).max() <= 1e-3
    with pytest.raises(QConvertError, match="dual chunk attention"):
        dec.logits(_ids(DCA["chunk_size"] + 1))


def test_config_survives_gguf_and_int4(dca_model, tmp_path):
    qconvert("hf-to-gguf", str(dca_model), str(tmp_path / "m.gguf"), "--outtype", "f16")
    qconvert("gguf-to-hf", str(tmp_path / "m.gguf"), str(tmp_path / "back"))
    want = json.loads((dca_model / "config.json").read_text())
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("dual_chunk_attention_config", "sliding_window", "max_window_layers"):
        assert back[key] == want[key], key
    qconvert("quantize", str(dca_model), str(tmp_path / "q"), "--quiet")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dual_chunk_attention_config"] == DCA
    r = qconvert("inspect", str(tmp_path / "m.gguf"))
    assert "dual chunk attention" in r.stdout and "llama.cpp ignores" in r.stdout


def test_invalid_dca_is_one_clear_error(tiny, tmp_path):
    bad = _with_dca(tiny("tied"), tmp_path / "bad", {"chunk_size": 8, "local_size": 8,
                                                     "original_max_position_embeddings": 8})
    r = qconvert("inspect", str(bad), check=False)
    assert r.returncode != 0 and "local_size smaller than chunk_size" in r.stderr and "Traceback" not in r.stderr
