"""One-token decoding of a dense layer in one C call (_step.c ``qc_decode_layer``), for NumpyDecoder.

Decoding a token runs each layer's maths on one row; in numpy that is some forty small operations per layer,
whose Python overhead is comparable to the products themselves on a small model and does not shrink with
more threads. ``LayerStep`` hands the C step everything a layer needs once (sizes, weight pointers, the
stacked products' parts); a decoding step then costs one call per layer. The maths is NumpyDecoder.layer's
in float32, the products the same C kernels; logits agree to float32 rounding and do not depend on the thread
count (tests/test_step.py). ``LayerStep.of`` gives None where the step does not apply (MoE layers, column-
permuted int codes, a layer with vectors it does not know, no C library): the numpy path runs there.
"""
from __future__ import annotations

import numpy as np

from formats import threads
from qconvert.decoder import products
from qconvert.decoder.matvec import Matrix
from qconvert.decoder.native import LIB

PARTS, PART_WORDS = 3, 12  # _step.c QC_PARTS, QC_PART_WORDS


def _ptr(a: np.ndarray | None) -> int:
    return products._ptr(a) or 0  # a word of the description: 0 for an absent array


def part_words(p) -> list[int]:
    """One stacked tensor of a product, as _step.c's P_* words."""
    max_threads = products.decode_threads(p)
    if p.is_int:
        return [1, 0, p.bits, p.group, p.flags, p.rows, max_threads, _ptr(p.qweight), p.qweight.strides[0],
                _ptr(p.scales), _ptr(p.offsets), _ptr(p.steps)]
    return [0, int(products.GQ[p.ggml_type]), 0, 0, 0, p.rows, max_threads, _ptr(p.data), p.data.strides[0], 0, 0, 0]


def matrix_words(m: Matrix) -> list[int] | None:
    """A product's part count and parts (None: more parts than the C step takes, or permuted columns)."""
    if len(m.parts) > PARTS or any(p.col_perm is not None for p in m.parts):
        return None
    words = [len(m.parts)]
    for p in m.parts:
        words += part_words(p)
    return words + [0] * (PARTS - len(m.parts)) * PART_WORDS


class LayerStep:
    """A dense layer's description for qc_decode_layer; ``__call__`` runs one token through it."""

    def __init__(self, words: np.ndarray, keep: list, eps: float):
        self.words, self._keep, self.eps = words, keep, np.float32(eps)

    @classmethod
    def of(cls, dec, i: int) -> "LayerStep | None":
        """Layer ``i`` of NumpyDecoder ``dec``, or None where the numpy path must run."""
        cfg, n, w, m = dec.cfg, dec.layers[i], dec.w, dec.m
        if LIB is None or cfg.is_moe or n.up in m or n.k in m:  # MoE, or products not stacked as the step expects
            return None
        known = {n.ln1, n.ln2, n.q_b, n.k_b, n.v_b}
        if any(k.startswith(f"model.layers.{i}.") and k not in known for k in w):  # e.g. per-head q/k norms
            return None
        mats = [matrix_words(m[name]) for name in (n.q, n.o, n.gate, n.down)]
        if any(x is None for x in mats):
            return None
        ln1, ln2 = w[n.ln1], w[n.ln2]
        biases = [w.get(b) for b in (n.q_b, n.k_b, n.v_b)]
        keep = [ln1, ln2, *biases, *(m[name] for name in (n.q, n.o, n.gate, n.down))]
        head = [cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                cfg.intermediate_size, _ptr(ln1), _ptr(ln2), *(_ptr(b) for b in biases)]
        words = np.array(head + [x for mw in mats for x in mw], dtype=np.int64)
        return cls(words, keep, cfg.rms_norm_eps)

    def __call__(self, x: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
                 scratch: np.ndarray, q8: bool = False) -> None:
        """x [hidden] (float32, contiguous) in place: the layer's output for the token at ``pos``; its key and
        value go into k / v [kv_heads, max_len, head_dim] at ``pos``. cos / sin: [head_dim] tables of ``pos``.
        ``q8``: products on llama.cpp's 8-bit activations where the storage type has them (_dot_q8.c)."""
        rc = LIB.qc_decode_layer(self.words.ctypes.data, x.ctypes.data, k.ctypes.data, v.ctypes.data, k.shape[1],
                                 pos, cos.ctypes.data, sin.ctypes.data, self.eps, threads.count(), int(q8),
                                 scratch.ctypes.data)
        if rc == -2:
            raise MemoryError("no memory for a decoding step's 8-bit activations")
        if rc:
            raise ValueError("the C kernels cannot multiply by one of this layer's storage types")

    def scratch(self, max_len: int) -> np.ndarray:
        """A float32 work buffer for a cache of ``max_len`` positions."""
        return np.empty(int(LIB.qc_decode_scratch(self.words.ctypes.data, max_len)), np.float32)
