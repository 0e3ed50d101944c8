"""Dual chunk attention (DCA), as Qwen2.5-7B/14B-Instruct-1M use it past their training window.

Semantics follow vLLM's ``DualChunkRotaryEmbedding`` (rotary_embedding/dual_chunk_rope.py) and its dense
dual-chunk flash attention path (attention/backends/dual_chunk_flash_attn.py), which implement An et al. 2024
("Training-Free Long-Context Scaling of Large Language Models") as the Qwen2.5-1M report uses it.

The sequence is cut into chunks of ``chunk_len = chunk_size - local_size`` positions. Every key is rotated at
its position inside its chunk (``j mod chunk_len``); a query is rotated one of three ways depending on the
chunk of the key it scores:

- intra-chunk (same chunk): ``i mod chunk_len``, so relative distances are the plain ones;
- successive-chunk (the chunk just before): ``min(i mod chunk_len + chunk_len, chunk_size)``: distances stay
  exact while they are at most ``chunk_size`` and are capped beyond;
- inter-chunk (any earlier chunk): the successive table's last entry, ``min(2 chunk_len - 1, chunk_size)``
  (= ``chunk_size`` whenever ``local_size < chunk_len``, as in every released config).

The three partial attentions are merged by their log-sum-exp, i.e. one softmax over the union of the per-pair
scores (``select_scores``). Length scaling: with ``original_max_position_embeddings`` (``orig``) set, vLLM
multiplies the keys written by a forward call, and that call's queries, by
``s(L) = max(1, 0.1 ln(L / orig) + 1)``, L being the sequence length after the call (YaRN's attention factor on
both sides, so scores grow by ``s(L)^2`` for a prefill). Keys keep the factor of the call that wrote them, so a
prefill of N tokens (every key and query at s(N)) differs from token-by-token decoding once L > orig;
``length_scale`` / ``tables`` reproduce that schedule. (vLLM's chunked prefill scales every piece of a prompt
with the whole prompt's length; our decoder only sees the length so far.)

Not modelled: vLLM's MInference-style sparse prefill (vertical/slash index selection with the unclamped
``*_critical`` query rotations), enabled only with a ``sparse_attention_config`` and above
``sparse_attention_threshold`` tokens; it approximates the dense attention computed here.
Within ``chunk_size`` tokens (and ``orig``, which the 1M configs set equal) the result is plain attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from formats.errors import QConvertError
from formats.model.config import ModelConfig
from qconvert.decoder.rope import cos_sin


@dataclass(frozen=True)
class DualChunk:
    """A model's DCA sizes; ``chunk_len`` derived. ``original``: 0 for no length scaling."""

    chunk_size: int
    local_size: int
    original: int = 0

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    @property
    def inter_position(self) -> int:
        """Rotary position of every query scoring keys two or more chunks back."""
        return min(2 * self.chunk_len - 1, self.chunk_size)

    @classmethod
    def of(cls, cfg: ModelConfig) -> "DualChunk | None":
        """The config's DCA, or None for plain attention."""
        d = cfg.dual_chunk_attention_config
        if not d:
            return None
        if cfg.rope_scaling:  # vLLM's DCA rope has no scaling either: it would silently drop it
            raise QConvertError("dual_chunk_attention_config together with rope_scaling is not supported "
                                "(dual chunk attention uses plain rope); remove one of them from config.json")
        return cls(int(d["chunk_size"]), int(d["local_size"]), int(d.get("original_max_position_embeddings") or 0))

    def length_scale(self, length: int) -> float:
        """Factor on the keys and queries of a forward call that ends at sequence length ``length``."""
        if self.original <= 0 or length <= self.original:
            return 1.0
        return max(1.0, 0.1 * math.log(length / self.original) + 1.0)

    def active(self, length: int) -> bool:
        """Whether a call ending at ``length`` differs from plain attention (otherwise every pair is intra-chunk
        and unscaled, and the plain rope tables give the same keys)."""
        return length > self.chunk_len or self.length_scale(length) != 1.0

    def query_positions(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(intra, successive, inter) rotary positions of queries at absolute positions ``pos``."""
        p = pos % self.chunk_len
        return p, np.minimum(p + self.chunk_len, self.chunk_size), np.full_like(p, self.inter_position)

    def key_positions(self, pos: np.ndarray) -> np.ndarray:
        """Rotary positions of keys at absolute positions ``pos``."""
        return pos % self.chunk_len

    def tables(self, inv_freq: np.ndarray, scale: float, pos: np.ndarray, length: int):
        """(key cos, key sin, [(cos, sin) of the intra / successive / inter queries]) for positions ``pos`` of a
        call ending at ``length``; the length scale is folded into both tables."""
        scale = scale * self.length_scale(length)
        kc, ks = cos_sin(inv_freq, scale, self.key_positions(pos))
        return kc, ks, [cos_sin(inv_freq, scale, qp) for qp in self.query_positions(pos)]

    def relation(self, q0: int, b: int, S: int) -> np.ndarray:
        """[b, S] chunk distance (query chunk - key chunk, clipped to 2) for queries q0..q0+b-1, keys 0..S-1."""
        rel = (np.arange(q0, q0 + b) // self.chunk_len)[:, None] - (np.arange(S) // self.chunk_len)[None, :]
        return np.clip(rel, 0, 2)

    def select_scores(self, score, q0: int, b: int, S: int) -> np.ndarray:
        """One score tensor [..., b, S] for queries at q0..q0+b-1 and keys 0..S-1 (causality applied later):
        ``score(kind)`` gives the scores of every pair with the query rotation of ``kind`` (0 intra, 1
        successive, 2 inter); only the kinds some pair needs are computed."""
        rel = self.relation(q0, b, S)
        out = score(0)
        for kind in (1, 2):
            if (rel == kind).any():
                out = np.where(rel == kind, score(kind), out)
        return np.ascontiguousarray(out, dtype=np.float32)
