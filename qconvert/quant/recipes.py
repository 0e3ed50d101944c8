"""Which bits each matrix gets: the int4 layout's per-tensor plan ("mix"), as data.

``uniform``: every matrix at the requested spec, the output head at ``head_bits``.
``roles`` (the default): start from the requested spec and apply ``RULES`` (measured on
Qwen2.5-Coder-0.5B, docs/int4-format.md): the untied input embedding drops one bit (a table lookup: its
error barely reaches the logits); k_proj and v_proj go to 8 bits (each GQA kv head feeds several query
heads, and they are tiny); q_proj and o_proj get one bit more. The feed-forward matrices then balance the
bits-per-weight budget (``target_bpw``, default ``bits + 0.5``, counting every quantised matrix but the
head, as the figure ``qconvert quantize`` prints): over budget, layers take groups twice as wide, least
sensitive layer first; under budget, layers get one bit more, most sensitive first (``ffn_layer_order``), matrix by matrix
(``FFN_PARTS``).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

from formats.errors import QConvertError
from formats.model.config import ModelConfig
from qconvert.quant.groupwise import QuantSpec

MIXES = ("roles", "uniform")
# feed-forward matrices in the order they get an extra bit within a layer: the most sensitive first, by the
# mean KL each costs when quantised alone at 4 bits (scripts/bench_quant.py measures it)
FFN_PARTS = ("up_proj", "down_proj", "gate_proj")

# role of a canonical tensor name (first match wins); matrices with no role keep the base spec
ROLES: list[tuple[str, str]] = [
    (r"^model\.embed_tokens\.weight$", "embed"),
    (r"\.self_attn\.q_proj\.weight$", "attn_q"),
    (r"\.self_attn\.k_proj\.weight$", "attn_k"),
    (r"\.self_attn\.v_proj\.weight$", "attn_v"),
    (r"\.self_attn\.o_proj\.weight$", "attn_o"),
    (r"\.mlp\.(experts\.\d+\.|shared_expert\.)?(gate|up|down)_proj\.weight$", "ffn"),
]

# (description, roles, change of bits), applied in this order
RULES: list[tuple[str, tuple[str, ...], Callable[[int], int]]] = [
    ("input embedding -1 bit", ("embed",), lambda b: max(2, b - 1)),
    ("k_proj, v_proj at 8 bits", ("attn_k", "attn_v"), lambda b: 8),
    ("q_proj, o_proj +1 bit", ("attn_q", "attn_o"), lambda b: min(8, b + 1)),
]


def role_of(name: str) -> str | None:
    """The ROLES entry of a canonical tensor name, or None."""
    for pat, role in ROLES:
        if re.search(pat, name):
            return role
    return None


def layer_of(name: str) -> int | None:
    """Decoder layer index of a canonical tensor name, or None."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def ffn_layer_order(n_layers: int) -> list[int]:
    """Feed-forward layers in the order they get an extra bit: the ends of the stack first (the first and
    last eighth), then every third layer between, then the rest: llama.cpp's ``use_more_bits`` pattern."""
    more = [i for i in range(n_layers)
            if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2]
    ends = sorted(more, key=lambda i: min(i, n_layers - 1 - i))
    return ends + [i for i in range(n_layers) if i not in more]


def head_name(cfg: ModelConfig) -> str:
    """The output head's canonical name: lm_head, or the embedding of a tied model."""
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


def plan(cfg: ModelConfig, shapes: dict[str, tuple[int, int]], base: QuantSpec, head_bits: int = 8,
         mix: str = "roles", target_bpw: float | None = None) -> tuple[dict[str, QuantSpec], list[str]]:
    """QuantSpec of every matrix in ``shapes`` (canonical name -> [rows, cols]) and the steps applied.

    A budget below what the role rules with 128-wide feed-forward groups cost is not reached: the plan then
    stops there (the printed bits per weight says so)."""
    if mix not in MIXES:
        raise QConvertError(f"unknown --mix {mix!r}; choose one of {', '.join(MIXES)}")
    head = head_name(cfg)
    specs = {n: base for n in shapes}
    if head in specs:
        specs[head] = replace(base, bits=head_bits)
    if mix == "uniform":
        return specs, []
    body = [n for n in shapes if n != head]
    numel = sum(shapes[n][0] * shapes[n][1] for n in body)
    budget = (base.bits + 0.5 if target_bpw is None else target_bpw) * numel

    def cost(s: dict[str, QuantSpec]) -> float:
        return sum(s[n].bits_per_weight(*shapes[n]) * shapes[n][0] * shapes[n][1] for n in body)

    applied = []
    for desc, roles, change in RULES:
        names = [n for n in body if role_of(n) in roles]
        if names:
            specs.update({n: replace(specs[n], bits=change(specs[n].bits)) for n in names})
            applied.append(desc)
    order = ffn_layer_order(cfg.num_hidden_layers)
    ffn = {i: [n for n in body if role_of(n) == "ffn" and layer_of(n) == i] for i in order}
    total = cost(specs)
    group = base.group_size
    while total > budget and group < 128:  # over budget: wider groups, least sensitive layers first
        group *= 2
        for i in reversed(order):
            if total <= budget:
                break
            specs.update({n: replace(specs[n], group_size=group) for n in ffn[i]})
            applied.append(f"layer {i} feed-forward g{group}")
            total = cost(specs)
    for i in order:  # under budget: one bit more, most sensitive layers first, matrix by matrix
        for part in FFN_PARTS:
            names = [n for n in ffn[i] if f".{part}." in n]
            trial = dict(specs)
            trial.update({n: replace(specs[n], bits=min(8, specs[n].bits + 1)) for n in names})
            if names and specs[names[0]].group_size == base.group_size and cost(trial) <= budget:
                specs, total = trial, cost(trial)
                applied.append(f"layer {i} {part} +1 bit")
    return specs, applied


def describe_plan(applied: list[str]) -> str:
    """The plan's steps in one line, per-layer feed-forward steps folded: ``... ; feed-forward +1 bit:
    layers 0 (up, down, gate), 23 (up)``."""
    plain, layers = [], {}
    for step in applied:
        m = re.fullmatch(r"layer (\d+) ([\w-]+?)(?:_proj)? (\+1 bit|g\d+)", step)
        if m and m.group(2) != "feed-forward":
            layers.setdefault(m.group(3), {}).setdefault(int(m.group(1)), []).append(m.group(2))
        elif m:
            layers.setdefault(m.group(3), {}).setdefault(int(m.group(1)), [])
        else:
            plain.append(step)
    for change, per in layers.items():
        plain.append(f"feed-forward {change}: layers " + ", ".join(
            f"{i} ({', '.join(parts)})" if parts and len(parts) < len(FFN_PARTS) else str(i) for i, parts in per.items()))
    return "; ".join(plain)
