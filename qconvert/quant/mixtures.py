"""llama-quantize's file types (mixtures) as per-tensor type rules: the K-quant mixtures (q2_k, q2_k_s,
q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k), the i-quant ones (iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m, iq3_xxs,
iq3_xs, iq3_s, iq3_m, iq4_nl, iq4_xs), and the 32-value types as llama-quantize writes them (q4_0_mix ..
q5_1_mix: the head in Q6_K; plain ``--outtype q4_0`` instead gives every matrix Q4_0).

The rules follow llama.cpp's ``llama_tensor_get_type`` for the Qwen2 family (the table is
qconvert/quant/mixture_rules.py): the output head (and a tied embedding) gets Q6_K, or Q5_K in the lowest-bit
i-quant files, or Q8_0 when its rows do not fit the mixture's base block; an untied embedding gets Q2_K / IQ3_S
in some i-quant files; the layer tensors get other types by mixture, role and layer (``RULES``), some only with
or only without an importance matrix; a dense 80-layer Qwen2 (llama.cpp's "70B") and an 8-expert MoE get
llama.cpp's extra bumps; and a row length that does not fit the block falls back as llama.cpp's
``tensor_type_fallback`` does (the 256-value i-quants -> IQ4_NL, Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K ->
Q5_1, Q6_K -> Q8_0; F16 if 32 does not divide it either).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from formats.errors import QConvertError
from formats.model.config import ModelConfig
from formats.model.names import KEEP_F32_SUFFIXES, canonical_shape, gguf_layout
from qconvert.quant.mixture_rules import (CONDITIONS, EMBED, HEAD_Q5K, LOW_IQ, MOE8_ATTN_OUTPUT_Q5K, REQUIRES_IMATRIX,
                                          REQUIRES_IMATRIX_IN, RULES, Where)

if TYPE_CHECKING:
    from formats.gguf.imatrix import Imatrix

MIXTURES = {  # name -> (base type, llama_ftype: include/llama.h)
    "q2_k": ("Q2_K", 10), "q2_k_s": ("Q2_K", 21), "q3_k_s": ("Q3_K", 11), "q3_k_m": ("Q3_K", 12),
    "q3_k_l": ("Q3_K", 13), "q4_k_m": ("Q4_K", 15), "q4_k_s": ("Q4_K", 14), "q5_k_m": ("Q5_K", 17),
    "q5_k_s": ("Q5_K", 16), "q6_k": ("Q6_K", 18),
    "iq1_s": ("IQ1_S", 24), "iq1_m": ("IQ1_M", 31), "iq2_xxs": ("IQ2_XXS", 19), "iq2_xs": ("IQ2_XS", 20),
    "iq2_s": ("IQ2_XS", 28), "iq2_m": ("IQ2_S", 29), "iq3_xxs": ("IQ3_XXS", 23), "iq3_xs": ("IQ3_S", 22),
    "iq3_s": ("IQ3_S", 26), "iq3_m": ("IQ3_S", 27), "iq4_nl": ("IQ4_NL", 25), "iq4_xs": ("IQ4_XS", 30),
    "q4_0_mix": ("Q4_0", 2), "q4_1_mix": ("Q4_1", 3), "q5_0_mix": ("Q5_0", 8), "q5_1_mix": ("Q5_1", 9),
}
IQ_LATTICE = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL",
            **{t: "IQ4_NL" for t in IQ_LATTICE}}
BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
         **{t: 256 for t in IQ_LATTICE},
         "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "IQ4_NL": 32}
_LAYER = re.compile(r"^blk\.(\d+)\.")
# llama.cpp's tensor categories, matched on the GGUF name in this order (``tensor_get_category``)
_CATEGORIES = ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight", "ffn_up", "ffn_gate",
               "ffn_down")


def _role(gname: str) -> str | None:
    """The llama.cpp tensor category that the rules distinguish (attn_v, attn_k, attn_q, attn_output, ffn_up,
    ffn_gate, ffn_down), or None."""
    for cat in _CATEGORIES:
        if cat in gname:
            return cat.removesuffix(".weight")
    return None


def fallback(t: str, cols: int) -> str:
    """A type whose block fits the row length ``cols``."""
    if cols % BLOCK.get(t, 1) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % BLOCK.get(t, 1) == 0 else "F16"


def layer_type(cfg: ModelConfig, mixture: str, role: str | None, i: int, imatrix: bool = False,
               count: int | None = None) -> str:
    """GGML type (before the row-length fallback) of a layer tensor of ``role`` in layer ``i`` (``imatrix``:
    whether the file is quantised with an importance matrix, which some rules depend on; ``count``: llama.cpp's
    running count of this role's tensors before this one, default ``i``, see mixture_rules.Where)."""
    base, _ = MIXTURES[mixture]
    n = cfg.num_hidden_layers
    experts = cfg.num_experts if cfg.is_moe else 0
    where = Where(i, n, cfg.n_kv_groups, imatrix, experts, i if count is None else count)
    t = base
    for cond, typ in RULES.get(role or "", {}).get(mixture, []):
        if CONDITIONS[cond](where):
            t = typ
            break
    if mixture in LOW_IQ:  # llama.cpp's branch of its own: no 70B bump, Q4_K / Q5_K for 8 experts
        if experts == 8 and role in ("attn_k", "attn_output"):
            t = "Q4_K" if role == "attn_k" else "Q5_K"
        return t
    if role == "attn_v" and not cfg.is_moe and n == 80 and t in ("Q3_K", "Q4_K"):
        t = "Q5_K"  # llama.cpp's 70B bump (Qwen2-72B has 80 layers)
    if experts == 8:
        if role in ("attn_v", "attn_k"):
            t = "Q8_0"
        elif role == "attn_output":
            t = "Q5_K" if mixture in MOE8_ATTN_OUTPUT_Q5K else base
    return t


def head_type(mixture: str, cols: int) -> str:
    """Type of the output head (and of a tied embedding), before the row-length fallback."""
    base, _ = MIXTURES[mixture]
    if cols % BLOCK[base]:
        return "Q8_0"
    return "Q5_K" if mixture in HEAD_Q5K else "Q6_K"


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
    layout = gguf_layout(cfg)
    # llama.cpp visits the tensors by layer, then by name, and counts each role's tensors as it goes
    order = sorted((int(m.group(1)) if (m := _LAYER.match(g)) else -1, g) for g, _ in layout)
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    for _, g in order:
        role = _role(g)
        counts[g] = seen.get(role or "", 0)
        seen[role or ""] = counts[g] + 1
    out = {}
    for gname, members in layout:
        shape = canonical_shape(members[0], cfg)
        cols = shape[-1]
        if len(shape) == 1 or shape[0] == 1 or gname.endswith(KEEP_F32_SUFFIXES):
            out[gname] = "F32"
            continue
        if gname == "output.weight" or (gname == "token_embd.weight" and cfg.tie_word_embeddings):
            t = head_type(mixture, cols)
        elif gname == "token_embd.weight":
            t = EMBED.get(mixture, MIXTURES[mixture][0])
        else:
            m = _LAYER.match(gname)
            t = layer_type(cfg, mixture, _role(gname), int(m.group(1)) if m else -1, imatrix, counts[gname])
        out[gname] = fallback(t, cols)
    return out


def imatrix_required(mixture: str, types: dict[str, str]) -> list[str]:
    """The tensors (in ``types``' order) whose type llama-quantize refuses to write without importance weights
    (``tensor_requires_imatrix``: never the token embedding or the output head)."""
    strict = REQUIRES_IMATRIX | REQUIRES_IMATRIX_IN.get(mixture, set())
    return [g for g, t in types.items() if t in strict and g not in ("token_embd.weight", "output.weight")]


def check_imatrix(mixture: str, types: dict[str, str], imatrix: Imatrix | None, flag: str) -> None:
    """Refuse, as llama-quantize does, a file whose types need importance weights when no imatrix is given
    (``flag``: the option that chose ``mixture``, for the message), or when the imatrix lacks a tensor's entry."""
    need = imatrix_required(mixture, types)
    if need and imatrix is None:
        raise QConvertError(f"{flag} {mixture} needs an importance matrix, as in llama-quantize ({need[0]} would be "
                            f"{types[need[0]]}): make one with `qconvert imatrix MODEL -o imatrix.gguf` and pass "
                            "--imatrix imatrix.gguf")
    missing = [g for g in need if imatrix is not None and g not in imatrix.entries]
    if missing:
        raise QConvertError(f"the imatrix has no entry for {missing[0]}, which {mixture} writes as {types[missing[0]]} "
                            "(llama-quantize refuses that too); compute it on this model with `qconvert imatrix`")
