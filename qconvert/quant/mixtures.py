"""llama-quantize's file types (mixtures) as per-tensor type rules: the K-quant mixtures (q2_k, q3_k_s/m/l,
q4_k_s/m, q5_k_s/m, q6_k), iq4_nl / iq4_xs, and the 32-value types as llama-quantize writes them (q4_0_mix ..
q5_1_mix: the head in Q6_K; plain ``--outtype q4_0`` instead gives every matrix Q4_0).

The rules follow llama.cpp's ``llama_tensor_get_type`` for the Qwen2 family: the output head (and a tied
embedding) gets Q6_K (Q8_0 stays Q8_0); ``attn_v``, ``ffn_down`` and ``attn_output`` get more bits by
mixture and layer (``RULES``), some only with or only without an importance matrix; a dense 80-layer Qwen2
(llama.cpp's "70B") and an 8-expert MoE get llama.cpp's extra bumps; and a row length that does not fit the
block falls back (Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; F16 if 32
does not divide it).
"""
from __future__ import annotations

import re
from typing import Callable

from formats.model.config import ModelConfig
from formats.model.names import KEEP_F32_SUFFIXES, canonical_shape, gguf_layout

MIXTURES = {  # name -> (base type, llama_ftype)
    "q2_k": ("Q2_K", 10), "q3_k_s": ("Q3_K", 11), "q3_k_m": ("Q3_K", 12), "q3_k_l": ("Q3_K", 13),
    "q4_k_m": ("Q4_K", 15), "q4_k_s": ("Q4_K", 14), "q5_k_m": ("Q5_K", 17), "q5_k_s": ("Q5_K", 16),
    "q6_k": ("Q6_K", 18), "iq4_nl": ("IQ4_NL", 25), "iq4_xs": ("IQ4_XS", 30),
    "q4_0_mix": ("Q4_0", 2), "q4_1_mix": ("Q4_1", 3), "q5_0_mix": ("Q5_0", 8), "q5_1_mix": ("Q5_1", 9),
}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
         "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "IQ4_NL": 32}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for extra bits: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Conditions on (layer index i, number of layers n, query heads per kv head g, importance matrix given im).
CONDITIONS: dict[str, Callable[[int, int, int, bool], bool]] = {
    "all": lambda i, n, g, im: True,
    "more_bits": lambda i, n, g, im: use_more_bits(i, n),
    "first_eighth": lambda i, n, g, im: i < n // 8,
    "first_eighth_imatrix": lambda i, n, g, im: i < n // 8 and im,
    "first_eighth_no_imatrix": lambda i, n, g, im: i < n // 8 and not im,
    "first_sixteenth": lambda i, n, g, im: i < n // 16,
    "first_2": lambda i, n, g, im: i < 2,
    "first_4": lambda i, n, g, im: i < 4,
    "gqa>=4": lambda i, n, g, im: g >= 4,
}
# role -> mixture -> [(condition, type), ...]: the first condition that holds picks the type; none keeps
# the mixture's base type. (llama.cpp counts attn_v tensors; for Qwen2 that count is the layer index.)
RULES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "attn_v": {
        "q2_k": [("gqa>=4", "Q4_K"), ("all", "Q3_K")],
        "q3_k_m": [("first_2", "Q5_K"), ("all", "Q4_K")],
        "q3_k_l": [("all", "Q5_K")],
        "q4_k_m": [("more_bits", "Q6_K")], "q5_k_m": [("more_bits", "Q6_K")],
        "q4_k_s": [("first_4", "Q5_K")],
        "iq4_nl": [("gqa>=4", "Q5_K")], "iq4_xs": [("gqa>=4", "Q5_K")],
    },
    "ffn_down": {
        "q2_k": [("all", "Q3_K")],
        "q3_k_m": [("first_sixteenth", "Q5_K"), ("all", "Q4_K")],
        "q3_k_l": [("all", "Q5_K")],
        "q4_k_m": [("more_bits", "Q6_K")], "q5_k_m": [("more_bits", "Q6_K")],
        "q4_k_s": [("first_eighth", "Q5_K")],
        "iq4_nl": [("first_eighth_no_imatrix", "Q5_K")], "iq4_xs": [("first_eighth_no_imatrix", "Q5_K")],
        # llama.cpp guards the first ffn_down layers of Q4_0 / Q5_0 files, only when an imatrix is given
        "q4_0_mix": [("first_eighth_imatrix", "Q4_1")], "q5_0_mix": [("first_eighth_imatrix", "Q5_1")],
    },
    "attn_output": {
        "q2_k": [("all", "Q3_K")], "q3_k_m": [("all", "Q4_K")], "q3_k_l": [("all", "Q5_K")],
    },
}
# 8-expert MoE: llama.cpp gives attn_v / attn_k Q8_0, and attn_output Q5_K under these mixtures
_MOE8_ATTN_OUTPUT_Q5K = {"q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs"}


def _role(gname: str) -> str | None:
    """The llama.cpp tensor category that the rules distinguish (attn_v, attn_k, attn_output, ffn_down)."""
    for role in ("attn_v.weight", "attn_k.weight", "attn_output.weight"):
        if role in gname:
            return role[:-7]
    return "ffn_down" if "ffn_down" in gname else None


def fallback(t: str, cols: int) -> str:
    """A type whose block fits the row length ``cols``."""
    if cols % BLOCK.get(t, 1) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % BLOCK.get(t, 1) == 0 else "F16"


def layer_type(cfg: ModelConfig, mixture: str, role: str | None, i: int, imatrix: bool = False) -> str:
    """GGML type (before the row-length fallback) of a layer tensor of ``role`` in layer ``i`` (``imatrix``:
    whether the file is quantised with an importance matrix, which some rules depend on)."""
    base, _ = MIXTURES[mixture]
    n = cfg.num_hidden_layers
    t = base
    for cond, typ in RULES.get(role or "", {}).get(mixture, []):
        if CONDITIONS[cond](i, n, cfg.n_kv_groups, imatrix):
            t = typ
            break
    if role == "attn_v" and not cfg.is_moe and n == 80 and t in ("Q3_K", "Q4_K"):
        t = "Q5_K"  # llama.cpp's 70B bump (Qwen2-72B has 80 layers)
    if cfg.is_moe and cfg.num_experts == 8:
        if role in ("attn_v", "attn_k"):
            t = "Q8_0"
        elif role == "attn_output":
            t = "Q5_K" if mixture in _MOE8_ATTN_OUTPUT_Q5K else base
    return t


ROLES = "roles"
ROLES_FILE_TYPE = 1024  # llama_ftype "guessed": a mix of our own
GGML_OF_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_1", 5: "Q5_1", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}


def roles_types(cfg: ModelConfig, bits: int = 4, target_bpw: float | None = None) -> dict[str, str]:
    """{GGUF tensor name: GGML type} of the int4 ``--mix roles`` plan (qconvert/quant/recipes.py) on GGUF-native
    types: each matrix's planned bits as the asymmetric GGML type of that width (4 -> Q4_1, 5 -> Q5_1, 8 ->
    Q8_0, 3 -> Q3_K, ...), with llama.cpp's row-length fallbacks."""
    from qconvert.quant.groupwise import QuantSpec
    from qconvert.quant.recipes import plan

    shapes = {}
    for _, members in gguf_layout(cfg):
        for m in members:
            shape = canonical_shape(m, cfg)
            if len(shape) == 2 and shape[0] > 1 and not m.endswith("mlp.gate.weight"):
                shapes[m] = (int(shape[0]), int(shape[1]))
    specs, _ = plan(cfg, shapes, QuantSpec(bits=bits), 8, "roles", target_bpw)
    out = {}
    for gname, members in gguf_layout(cfg):
        shape = canonical_shape(members[0], cfg)
        sp = specs.get(members[0])
        if sp is None or gname.endswith(KEEP_F32_SUFFIXES):
            out[gname] = "F32"
            continue
        out[gname] = fallback(GGML_OF_BITS[max(2, min(8, sp.bits))], shape[-1])
    return out


def mixture_types(cfg: ModelConfig, mixture: str, imatrix: bool = False) -> dict[str, str]:
    """{GGUF tensor name: GGML type} for every tensor of ``cfg`` under ``mixture`` (``imatrix``: quantised with
    an importance matrix; ``roles``: roles_types)."""
    if mixture == ROLES:
        return roles_types(cfg)
    out = {}
    for gname, members in gguf_layout(cfg):
        shape = canonical_shape(members[0], cfg)
        cols = shape[-1]
        if len(shape) == 1 or shape[0] == 1 or gname.endswith(KEEP_F32_SUFFIXES):
            out[gname] = "F32"
            continue
        if gname == "output.weight" or (gname == "token_embd.weight" and cfg.tie_word_embeddings):
            t = "Q8_0" if cols % 256 else "Q6_K"
        else:
            m = _LAYER.match(gname)
            t = layer_type(cfg, mixture, _role(gname), int(m.group(1)) if m else -1, imatrix)
        out[gname] = fallback(t, cols)
    return out
