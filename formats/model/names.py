"""Tensor-name tables: canonical (HF) names <-> GGUF names, as data.

Canonical names are the HF ones (``model.layers.{i}.self_attn.q_proj.weight``). GGUF stacks the routed
experts of a qwen2moe layer into one tensor (``blk.{i}.ffn_gate_exps.weight``, experts outermost); the
per-expert canonical names map to (stacked GGUF name, expert index).
"""
from __future__ import annotations

import re

from formats.model.config import ModelConfig

GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {  # suffix after model.layers.{i}. -> suffix after blk.{i}.
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
DENSE_MLP = {
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MOE_MLP = {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}
EXPERTS = {  # mlp.experts.{e}.<proj>.weight -> stacked GGUF suffix
    "gate_proj.weight": "ffn_gate_exps.weight",
    "up_proj.weight": "ffn_up_exps.weight",
    "down_proj.weight": "ffn_down_exps.weight",
}
# GGUF tensors llama.cpp's converter keeps in F32 whatever the output type (besides all 1-D tensors)
KEEP_F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def canonical_names(cfg: ModelConfig) -> list[str]:
    """Every tensor a checkpoint of this config holds, in canonical order (lm_head only when untied)."""
    names = ["model.embed_tokens.weight"]
    mlp = MOE_MLP if cfg.is_moe else DENSE_MLP
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.{s}" for s in LAYER]
        names += [f"model.layers.{i}.{s}" for s in mlp]
        if cfg.is_moe:
            names += [f"model.layers.{i}.mlp.experts.{e}.{s}" for s in EXPERTS for e in range(cfg.num_experts)]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_to_gguf(name: str) -> tuple[str, int | None]:
    """Canonical name -> (GGUF name, expert index or None). Raises KeyError for unknown names."""
    if name in GLOBAL:
        return GLOBAL[name], None
    m = _LAYER_RE.match(name)
    if m:
        i, rest = m.groups()
        for table in (LAYER, DENSE_MLP, MOE_MLP):
            if rest in table:
                return f"blk.{i}.{table[rest]}", None
        e = _EXPERT_RE.match(rest)
        if e and e.group(2) in EXPERTS:
            return f"blk.{i}.{EXPERTS[e.group(2)]}", int(e.group(1))
    raise KeyError(name)


_INV_GLOBAL = {v: k for k, v in GLOBAL.items()}
_INV_LAYER = {v: k for t in (LAYER, DENSE_MLP, MOE_MLP) for k, v in t.items()}
_INV_EXPERTS = {v: k for k, v in EXPERTS.items()}


def gguf_to_hf(name: str, num_experts: int = 0) -> list[str]:
    """GGUF name -> canonical names (one, or one per expert for a stacked tensor). KeyError if unknown."""
    if name in _INV_GLOBAL:
        return [_INV_GLOBAL[name]]
    m = _BLK_RE.match(name)
    if m:
        i, rest = m.groups()
        if rest in _INV_LAYER:
            return [f"model.layers.{i}.{_INV_LAYER[rest]}"]
        if rest in _INV_EXPERTS:
            return [f"model.layers.{i}.mlp.experts.{e}.{_INV_EXPERTS[rest]}" for e in range(num_experts)]
    raise KeyError(name)


def gguf_layout(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """GGUF tensors of a model in file order, each with the canonical names it is built from."""
    out: dict[str, list[str]] = {}
    for name in canonical_names(cfg):
        g, _ = hf_to_gguf(name)
        out.setdefault(g, []).append(name)
    return list(out.items())


def canonical_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The HF shape of a canonical tensor (numpy order: out_features, in_features)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if name == "model.norm.weight":
        return (h,)
    m = _LAYER_RE.match(name)
    if not m:
        raise KeyError(name)
    rest = m.group(2)
    ff, mff, sff = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    e = _EXPERT_RE.match(rest)
    if e:
        rest, ff = "mlp." + e.group(2), mff
    elif rest.startswith("mlp.shared_expert."):
        rest, ff = "mlp." + rest[len("mlp.shared_expert."):], sff
    table = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
        "mlp.gate.weight": (cfg.num_experts, h), "mlp.shared_expert_gate.weight": (1, h),
    }
    return table[rest]
