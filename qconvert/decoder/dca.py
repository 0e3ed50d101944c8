"""Dual chunk attention (DCA), as Qwen2.5-7B/14B-Instruct-1M use it past their training window.

The sequence is cut into chunks of ``chunk_len = chunk_size - local_size`` positions. Every key is rotated at
its position inside its chunk (``j mod chunk_len``); a query is rotated one of three ways depending on the
chunk of the key it scores (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models";
Qwen2.5-1M technical report; vLLM's ``DualChunkRotaryEmbedding`` and dual-chunk flash attention backend):

- intra-chunk (same chunk): the query's position in its chunk, ``i mod chunk_len``: plain relative distances;
- successive-chunk (the chunk just before): ``min(i mod chunk_len + chunk_len, chunk_size)``: distances stay
  exact for the first ``local_size`` queries of a chunk and are capped beyond;
- inter-chunk (any earlier chunk): ``chunk_size``, so every distance lies in [local_size + 1, chunk_size].

The three partial attentions are merged by their log-sum-exp, which is one softmax over the union of the
per-pair scores: that is what ``select_scores`` builds. No extra softmax scaling is applied in the dense path.
(vLLM's MInference-style sparse attention for the longest inputs is an approximation on top; not modelled.)
When the sequence fits in ``chunk_size`` the result equals plain attention (the distances are unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats.config import ModelConfig
from qconvert.decoder.rope import cos_sin


@dataclass(frozen=True)
class DualChunk:
    """A model's DCA sizes; ``chunk_len`` derived."""

    chunk_size: int
    local_size: int

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    @classmethod
    def of(cls, cfg: ModelConfig) -> "DualChunk | None":
        """The config's DCA, or None for plain attention."""
        d = cfg.dual_chunk_attention_config
        return cls(int(d["chunk_size"]), int(d["local_size"])) if d else None

    def query_positions(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(intra, successive, inter) rotary positions of queries at absolute positions ``pos``."""
        p = pos % self.chunk_len
        return p, np.minimum(p + self.chunk_len, self.chunk_size), np.full_like(p, self.chunk_size)

    def key_positions(self, pos: np.ndarray) -> np.ndarray:
        """Rotary positions of keys at absolute positions ``pos``."""
        return pos % self.chunk_len

    def tables(self, inv_freq: np.ndarray, scale: float, pos: np.ndarray):
        """(key cos, key sin, [(cos, sin) of the intra / successive / inter queries]) for positions ``pos``."""
        kc, ks = cos_sin(inv_freq, scale, self.key_positions(pos))
        return kc, ks, [cos_sin(inv_freq, scale, qp) for qp in self.query_positions(pos)]

    def select_scores(self, scores: list[np.ndarray], q0: int) -> np.ndarray:
        """One score tensor [..., b, S] from the intra / successive / inter ones, for queries at absolute positions
        q0..q0+b-1 and keys 0..S-1 (causality is applied later)."""
        intra = scores[0]
        b, S = intra.shape[-2:]
        rel = (np.arange(q0, q0 + b) // self.chunk_len)[:, None] - (np.arange(S) // self.chunk_len)[None, :]
        if not rel.any():
            return intra
        out = np.where(rel == 0, intra, scores[1])
        return np.where(rel >= 2, scores[2], out)
