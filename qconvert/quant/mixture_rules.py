"""llama-quantize's per-tensor rules for the Qwen2 family as data (src/llama-quant.cpp,
``llama_tensor_get_type_impl``): which layer tensors of which mixture get another type than the mixture's base
type, and under what condition. qconvert/quant/mixtures.py applies them; tests/test_kquants.py and
tests/test_iq_mixtures.py check every mixture against llama-quantize's dry run at the family's real shapes.

llama.cpp treats the six lowest-bit i-quant files (``LOW_IQ``: iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m)
in a branch of their own: their attn_v, attn_k, ffn_down and attn_output rules replace the general ones, and
neither the 80-layer ("70B") attn_v bump nor the 8-expert attn_v / attn_k Q8_0 applies to them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple


class Where(NamedTuple):
    """What a rule may look at: layer index ``i`` of ``n`` layers, query heads per kv head ``g``, whether an
    importance matrix is given ``im``, the number of experts ``e`` (0 for a dense model) and ``c``, llama.cpp's
    running count of the tensors of this role before this one (the layer index, except for a MoE's ffn_down
    in the LOW_IQ branch, where the experts' and the shared expert's tensors are counted one by one)."""
    i: int
    n: int
    g: int
    im: bool
    e: int
    c: int


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for extra bits: first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


CONDITIONS: dict[str, Callable[[Where], bool]] = {
    "all": lambda w: True,
    "more_bits": lambda w: use_more_bits(w.i, w.n),
    "first_eighth": lambda w: w.i < w.n // 8,
    "first_eighth_imatrix": lambda w: w.i < w.n // 8 and w.im,
    "first_eighth_no_imatrix": lambda w: w.i < w.n // 8 and not w.im,
    "first_sixteenth": lambda w: w.i < w.n // 16,
    "first_2": lambda w: w.i < 2,
    "first_4": lambda w: w.i < 4,
    "gqa>=4": lambda w: w.g >= 4,
    "gqa>=4_or_experts>=4": lambda w: w.g >= 4 or w.e >= 4,
    "no_imatrix": lambda w: not w.im,
    "middle": lambda w: w.n // 8 <= w.i < 7 * w.n // 8,
    "first_eighth_or_8_experts_more_bits": lambda w: w.i < w.n // 8 or (w.e == 8 and use_more_bits(w.i, w.n)),
    "counted_first_eighth": lambda w: w.c < w.n // 8,
}

LOW_IQ = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m")


def _low(v_else: str, down: str, out: str | None) -> dict[str, list[tuple[str, str]]]:
    """One LOW_IQ mixture's rules: attn_v Q4_K with 4+ query heads per kv head or 4+ experts, else ``v_else``;
    the counted first eighth of ffn_down at ``down``; attn_output at ``out`` (None: the base type)."""
    rules = {"attn_v": [("gqa>=4_or_experts>=4", "Q4_K"), ("all", v_else)],
             "ffn_down": [("counted_first_eighth", down)]}
    if out:
        rules["attn_output"] = [("all", out)]
    return rules


_LOW_RULES = {
    "iq1_s": _low("Q2_K", "Q2_K", "IQ2_XXS"), "iq1_m": _low("Q2_K", "Q2_K", "IQ2_XXS"),
    "iq2_xxs": _low("Q2_K", "Q2_K", None), "iq2_xs": _low("Q2_K", "Q2_K", None),
    "iq2_s": _low("IQ3_S", "IQ3_S", "IQ3_S"), "iq2_m": _low("IQ3_S", "IQ3_S", "IQ3_S"),
}

# role -> mixture -> [(condition, type), ...]: the first condition that holds picks the type; none keeps the
# mixture's base type. (llama.cpp counts attn_v tensors; for Qwen2 that count is the layer index.)
RULES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "attn_v": {
        "q2_k": [("gqa>=4", "Q4_K"), ("all", "Q3_K")],
        "q2_k_s": [("gqa>=4", "Q4_K")],
        "q3_k_m": [("first_2", "Q5_K"), ("all", "Q4_K")],
        "q3_k_l": [("all", "Q5_K")],
        "q4_k_m": [("more_bits", "Q6_K")], "q5_k_m": [("more_bits", "Q6_K")],
        "q4_k_s": [("first_4", "Q5_K")],
        "iq4_nl": [("gqa>=4", "Q5_K")], "iq4_xs": [("gqa>=4", "Q5_K")],
        "iq3_xxs": [("gqa>=4", "Q4_K"), ("no_imatrix", "IQ3_S")],
        "iq3_xs": [("gqa>=4", "Q4_K")], "iq3_s": [("gqa>=4", "Q4_K")],
        "iq3_m": [("all", "Q4_K")],
    },
    "attn_k": {"iq3_xs": [("all", "IQ3_XXS")], "iq3_xxs": [("all", "IQ2_S")]},
    "attn_q": {"iq3_xs": [("all", "IQ3_XXS")], "iq3_xxs": [("all", "IQ2_S")]},
    "ffn_down": {
        "q2_k": [("all", "Q3_K")],
        "q2_k_s": [("first_eighth", "Q4_K")],
        "iq3_xxs": [("first_eighth_no_imatrix", "Q4_K"), ("no_imatrix", "Q3_K")],
        "q3_k_m": [("first_sixteenth", "Q5_K"), ("all", "Q4_K")],
        "iq3_m": [("first_eighth_or_8_experts_more_bits", "Q4_K")],
        "q3_k_l": [("all", "Q5_K")],
        "q4_k_m": [("more_bits", "Q6_K")], "q5_k_m": [("more_bits", "Q6_K")],
        "q4_k_s": [("first_eighth", "Q5_K")],
        "iq4_nl": [("first_eighth_no_imatrix", "Q5_K")], "iq4_xs": [("first_eighth_no_imatrix", "Q5_K")],
        # llama.cpp guards the first ffn_down layers of Q4_0 / Q5_0 files, only when an imatrix is given
        "q4_0_mix": [("first_eighth_imatrix", "Q4_1")], "q5_0_mix": [("first_eighth_imatrix", "Q5_1")],
    },
    "attn_output": {
        "q2_k": [("all", "Q3_K")], "q3_k_m": [("all", "Q4_K")], "q3_k_l": [("all", "Q5_K")],
        "iq3_xxs": [("all", "IQ3_S")], "iq3_m": [("all", "Q4_K")],
    },
    "ffn_gate": {"iq3_xs": [("middle", "IQ3_XXS")]},
    "ffn_up": {"iq3_xs": [("middle", "IQ3_XXS")]},
}
for _mix, _rules in _LOW_RULES.items():
    for _role, _list in _rules.items():
        RULES[_role][_mix] = _list

# 8-expert MoE: attn_output of these mixtures gets Q5_K (every other one keeps its base type there); attn_v /
# attn_k get Q8_0, or Q4_K (attn_k) in the LOW_IQ branch
MOE8_ATTN_OUTPUT_Q5K = {"q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs",
                        "iq3_xs", "iq3_xxs", "iq3_s", "iq3_m", *LOW_IQ}

# the output head (and a tied embedding) of these mixtures gets Q5_K instead of Q6_K
HEAD_Q5K = {"iq3_xxs", *LOW_IQ}
# an untied token embedding of these mixtures gets this type instead of the base type
EMBED = {"iq2_xxs": "Q2_K", "iq2_xs": "Q2_K", "iq1_s": "Q2_K", "iq1_m": "Q2_K",
         "iq2_s": "IQ3_S", "iq2_m": "IQ3_S", "iq3_xxs": "IQ3_S"}

# types llama-quantize refuses to write without importance weights (``tensor_requires_imatrix``: for every
# tensor but the token embedding and the output head); Q2_K only in a q2_k_s file
REQUIRES_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}
REQUIRES_IMATRIX_IN = {"q2_k_s": {"Q2_K"}}
