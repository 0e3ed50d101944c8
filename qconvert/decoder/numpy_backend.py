"""The reference decoder in plain numpy, float32 on the CPU.

One function per block of the model, written to be read next to transformers' ``modeling_qwen2.py``:
RMSNorm, rotary embedding (rotate-half), grouped-query attention with q/k/v biases, SwiGLU MLP or the
Qwen2-MoE block (softmax top-k routing, shared expert gated by a sigmoid), tied or separate head.
``forward`` takes the next tokens and a KV cache, so prefill and incremental decoding are one code path.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from formats.model.config import ModelConfig
from formats.model.source import Source
from qconvert.decoder.dca import DualChunk
from qconvert.decoder.matvec import Matrix, silu_mul, softmax_causal
from qconvert.decoder.model import LayerNames, lm_head_name, load_f32
from qconvert.decoder.rope import cos_sin, inv_freq_and_scale
from qconvert.decoder.step import LayerStep

ATTN_BLOCK = 128


class KVCache:
    """Keys and values of every layer: [layers][kv_heads, max_len, head_dim], filled up to ``length``."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        shape = (cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * w."""
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * w


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Apply rotary embedding to x [T, heads, hd] with cos/sin [T, hd] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax, in place on ``x`` (a temporary of the caller)."""
    x -= x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


HEAD_TOKENS = 128  # logits are produced this many positions at a time: [128, vocab] float32 is 78 MB


class NumpyDecoder:
    """Qwen2 / Qwen2-MoE forward pass in float32 over the weights of a Source, as stored.

    ``self.w`` holds 1-D tensors as float32 arrays; ``self.m`` holds matrices (see matvec.Matrix: each
    stays in its stored bytes, memory-mapped; every product is float32), called as ``self.m[name](x)``.
    ``stream``: each layer's pages are dropped from the process after the layer ran (and the head's
    block by block), so a forward pass holds one layer of weights whatever the model's size; the page
    cache still keeps them while memory allows. Without it the weights stay mapped in as they are touched.
    ``c_step``: one-token steps of dense layers run as one C call each (step.py; same maths, float32 rounding);
    False runs every step through the numpy blocks below.
    ``activations``: "float" (the default: float32 products) or "q8": the products of decoding steps (up to
    products.DECODE_ROWS tokens, logits included) run on llama.cpp's 8-bit activation blocks where the storage
    type has such a kernel, as llama.cpp's vec_dot computes them (products.matmul's ``q8``; `qconvert generate
    --activations q8`); a longer prompt's products run on bfloat16 copies where the CPU has AMX.
    """

    def __init__(self, src: Source, stream: bool = False):
        self.stream = stream
        self.cfg = cfg = src.config
        T = src.tensors
        self.w = {n: load_f32(src, n) for n, t in T.items() if len(t.shape) == 1}
        self.layers = [LayerNames(i) for i in range(cfg.num_hidden_layers)]
        fused = {}  # q/k/v and gate/up stacked: one product each
        for n in self.layers:
            fused[n.q] = Matrix(T[n.q], T[n.k], T[n.v])
            if not cfg.is_moe:
                fused[n.gate] = Matrix(T[n.gate], T[n.up])
        stacked = {n.k for n in self.layers} | {n.v for n in self.layers} | {n.up for n in self.layers}
        self.m = {n: fused.get(n) or Matrix(t) for n, t in T.items() if len(t.shape) == 2 and n not in stacked}
        self.head = self.m[lm_head_name(cfg)]
        self.inv_freq, self.rope_scale = inv_freq_and_scale(cfg)
        self.dca = DualChunk.of(cfg)
        self.layer_mats = [[m for k, m in self.m.items() if k.startswith(f"model.layers.{i}.")]
                           for i in range(cfg.num_hidden_layers)]
        self.steps = [LayerStep.of(self, i) for i in range(cfg.num_hidden_layers)]
        self.c_step = True
        self._activations = "float"

    @property
    def activations(self) -> str:
        return self._activations

    @activations.setter
    def activations(self, kind: str) -> None:
        if kind not in ("float", "q8"):
            raise ValueError(f"activations must be 'float' or 'q8', not {kind!r}")
        self._activations = kind
        for m in self.m.values():
            m.q8 = kind == "q8"

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache for up to ``max_len`` positions."""
        return KVCache(self.cfg, max_len)

    # ---------------------------------------------------------------- blocks
    def attention(self, x: np.ndarray, n: LayerNames, cache: KVCache, layer: int,
                  cos: np.ndarray, sin: np.ndarray, keep: slice = slice(None), dca_q: list | None = None) -> np.ndarray:
        """Self-attention of x [T, hidden]; the cache gets all T keys/values, outputs only for rows ``keep``.
        ``dca_q``: dual chunk attention's three query rotations (dca.py); cos/sin then rotate the keys."""
        cfg, w, m, T = self.cfg, self.w, self.m, x.shape[0]
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = m[n.q].split(m[n.q](x))                                 # stacked q/k/v projection
        q = (q + w[n.q_b]).reshape(T, nh, hd)[keep]
        k = (k + w[n.k_b]).reshape(T, nkv, hd)
        v = (v + w[n.v_b]).reshape(T, nkv, hd)
        qs = [rotate(q, c[keep], s[keep]) for c, s in dca_q] if dca_q else [rotate(q, cos[keep], sin[keep])]
        k = rotate(k, cos, sin)
        start = cache.length
        end = start + T
        cache.k[layer][:, start:end] = k.transpose(1, 0, 2)
        cache.v[layer][:, start:end] = v.transpose(1, 0, 2)
        start += range(T)[keep].start  # absolute position of the first kept query
        T = q.shape[0]
        g = cfg.n_kv_groups
        # queries grouped by the kv head they share: [nkv, g, T, hd], pre-scaled by 1/sqrt(hd)
        qgs = [q.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3) * np.float32(1 / np.sqrt(hd)) for q in qs]
        out = np.empty((T, nkv, g, hd), np.float32)
        for b0 in range(0, T, ATTN_BLOCK):  # query blocks: keys past the block's last position are never read
            b1 = min(T, b0 + ATTN_BLOCK)
            b, S = b1 - b0, start + b1
            K, V = cache.k[layer][:, :S], cache.v[layer][:, :S]           # [nkv, S, hd]
            def score(kind: int) -> np.ndarray:                           # one GEMM per kv head
                qb = np.ascontiguousarray(qgs[kind][:, :, b0:b1]).reshape(nkv, g * b, hd)
                return (qb @ K.transpose(0, 2, 1)).reshape(nkv, g, b, S)
            scores = self.dca.select_scores(score, start + b0, b, S) if dca_q else score(0)
            # causal: query i of the block (absolute position start + b0 + i) sees keys <= its position
            pv = softmax_causal(scores, b, start + b0).reshape(nkv, g * b, S) @ V   # [nkv, g*b, hd]
            out[b0:b1] = pv.reshape(nkv, g, b, hd).transpose(2, 0, 1, 3)
        return m[n.o](out.reshape(T, nh * hd))

    def mlp(self, x: np.ndarray, gate: str, up: str, down: str) -> np.ndarray:
        m = self.m
        if up not in m:  # gate and up stacked into one product
            g, u = m[gate].split(m[gate](x))
        else:
            g, u = m[gate](x), m[up](x)
        return m[down](silu_mul(g, u))

    def moe(self, x: np.ndarray, n: LayerNames) -> np.ndarray:
        cfg, m = self.cfg, self.m
        probs = softmax(m[n.router](x))                                  # [T, E]
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]
        weights = np.take_along_axis(probs, top, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            ye = self.mlp(x[rows], n.expert(e, "gate_proj"), n.expert(e, "up_proj"), n.expert(e, "down_proj"))
            out[rows] += ye * weights[rows, slot][:, None]
        shared = self.mlp(x, n.sh_gate, n.sh_up, n.sh_down)
        gate = np.float32(1) / (np.float32(1) + np.exp(-m[n.sh_router](x)))
        return out + gate * shared

    # ---------------------------------------------------------------- model
    def layer(self, i: int, x: np.ndarray, cache: KVCache, cos: np.ndarray, sin: np.ndarray,
              keep: slice = slice(None), dca_q: list | None = None) -> np.ndarray:
        """Decoder layer ``i`` on hidden states x [T, hidden] (positions cache.length..+T, whose
        cos/sin are given); returns the new hidden states of rows ``keep``. The cache is not advanced."""
        cfg, w, n = self.cfg, self.w, self.layers[i]
        x = x[keep] + self.attention(rms_norm(x, w[n.ln1], cfg.rms_norm_eps), n, cache, i, cos, sin, keep, dca_q)
        h = rms_norm(x, w[n.ln2], cfg.rms_norm_eps)
        return x + (self.moe(h, n) if cfg.is_moe else self.mlp(h, n.gate, n.up, n.down))

    def hidden(self, tokens: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Final normed hidden states [T, hidden] of ``tokens`` following what the cache holds (only the last
        row with ``last_only``); the cache grows by T. ``project`` turns them into logits."""
        cfg, w = self.cfg, self.w
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if cache.length + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length + T} needed")
        pos = np.arange(cache.length, cache.length + T)
        dca_q = None
        if self.dca and self.dca.active(cache.length + T):  # otherwise exactly plain attention
            cos, sin, dca_q = self.dca.tables(self.inv_freq, self.rope_scale, pos, cache.length + T)
        else:
            cos, sin = cos_sin(self.inv_freq, self.rope_scale, pos)
        emb = self.m["model.embed_tokens.weight"]
        x = emb.rows_f32(tokens)
        if self.stream:
            emb.release()
        last = len(self.layers) - 1
        one = T == 1 and dca_q is None and self.c_step
        scratch = next((s.scratch(cache.max_len) for s in self.steps if s), None) if one else None
        for i in range(len(self.layers)):
            # with last_only, the last layer needs every position's keys/values but only the last query
            keep = slice(T - 1, T) if last_only and i == last else slice(None)
            if one and self.steps[i]:
                x = np.ascontiguousarray(x, dtype=np.float32)
                self.steps[i](x[0], cache.k[i], cache.v[i], cache.length, cos[0], sin[0], scratch,
                              self.activations == "q8")
            else:
                x = self.layer(i, x, cache, cos, sin, keep, dca_q)
            if self.stream:
                for m in self.layer_mats[i]:
                    m.release()
        cache.length += T
        return rms_norm(x[-1:] if last_only else x, w["model.norm.weight"], cfg.rms_norm_eps)

    def project(self, h: np.ndarray) -> np.ndarray:
        """Logits [T, vocab] of final hidden states (streaming: the head's pages are dropped after use)."""
        y = self.head(h)
        if self.stream:
            self.head.release()
        return y

    def forward(self, tokens: np.ndarray, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """Logits [T, vocab] of ``tokens`` following what the cache holds (only the last row with
        ``last_only``, as generation needs); the cache grows by T."""
        return self.project(self.hidden(tokens, cache, last_only))

    def logit_chunks(self, tokens: list[int] | np.ndarray, chunk: int = HEAD_TOKENS) -> Iterator[np.ndarray]:
        """Full-sequence logits from an empty cache, ``chunk`` positions at a time ([≤chunk, vocab] each), so
        a long sequence never holds [T, vocab] at once."""
        h = self.hidden(np.asarray(tokens), self.new_cache(len(tokens)))
        for t0 in range(0, h.shape[0], chunk):
            yield self.project(h[t0:t0 + chunk])

    def logits(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """Full-sequence logits [T, vocab] from an empty cache."""
        return np.concatenate(list(self.logit_chunks(tokens)))
