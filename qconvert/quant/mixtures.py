"""llama-quantize's K-quant mixtures (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k) as per-tensor type rules.

The rules follow llama.cpp's ``llama_tensor_get_type`` for the Qwen2 family (no importance matrix):
the output head (and a tied embedding) gets Q6_K, ``attn_v`` and ``ffn_down`` get more bits in the
first and last eighth of the layers and every third layer between, and a row length that is not a
multiple of 256 falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if 32 does not divide it).
"""
from __future__ import annotations

import re

from formats.config import ModelConfig
from formats.names import KEEP_F32_SUFFIXES, canonical_shape, gguf_layout

MIXTURES = {  # name -> (base type, llama_ftype)
    "q4_k_m": ("Q4_K", 15), "q4_k_s": ("Q4_K", 14), "q5_k_m": ("Q5_K", 17), "q5_k_s": ("Q5_K", 16),
    "q6_k": ("Q6_K", 18),
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for extra bits: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(t: str, cols: int) -> str:
    """A type whose block fits the row length ``cols``."""
    if cols % BLOCK.get(t, 1) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % BLOCK.get(t, 1) == 0 else "F16"


def mixture_types(cfg: ModelConfig, mixture: str) -> dict[str, str]:
    """{GGUF tensor name: GGML type} for every tensor of ``cfg`` under ``mixture``."""
    base, _ = MIXTURES[mixture]
    n = cfg.num_hidden_layers
    out = {}
    for gname, members in gguf_layout(cfg):
        shape = canonical_shape(members[0], cfg)
        cols = shape[-1]
        if len(shape) == 1 or shape[0] == 1 or gname.endswith(KEEP_F32_SUFFIXES):
            out[gname] = "F32"
            continue
        m = _LAYER.match(gname)
        i = int(m.group(1)) if m else -1
        t = base
        if gname == "output.weight" or (gname == "token_embd.weight" and cfg.tie_word_embeddings):
            t = "Q8_0" if cols % 256 else "Q6_K"
        elif gname.endswith("attn_v.weight"):
            if mixture in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
                t = "Q6_K"
            elif mixture == "q4_k_s" and i < 4:
                t = "Q5_K"
        elif "ffn_down" in gname:
            if mixture in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
                t = "Q6_K"
            elif mixture == "q4_k_s" and i < n // 8:
                t = "Q5_K"
        out[gname] = fallback(t, cols)
    return out
