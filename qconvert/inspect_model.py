"""``qconvert inspect``: a model's metadata and tensor table, as text or JSON."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from formats.model.source import Source


def describe(src: Source) -> dict[str, Any]:
    """A JSON-ready summary: format, config, tokenizer, tensors (name, shape, type, bytes)."""
    cfg = src.config
    tok = src.tokenizer
    tensors = [{"name": n, "shape": list(t.shape), "type": t.quant or t.stype, "nbytes": t.nbytes}
               for n, t in sorted(src.tensors.items(), key=lambda kv: natural_key(kv[0]))]
    cfg_d = cfg.to_hf_dict()
    return {
        "path": src.path, "format": src.kind, "arch": cfg.arch, "config": cfg_d, "parts": src.parts,
        "quantization": src.quantization,
        "tokenizer": {"tokens": len(tok.tokens), "real_tokens": tok.n_real, "merges": len(tok.merges),
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "add_bos": tok.add_bos,
                      "chat_template": bool(tok.chat_template)},
        "n_params": sum(_numel(t["shape"]) for t in tensors),
        "n_bytes": sum(t["nbytes"] for t in tensors),
        "types": dict(Counter(t["type"] for t in tensors)),
        "tensors": tensors,
    }


def render(d: dict[str, Any], max_rows: int | None = None) -> str:
    """Human-readable text of ``describe``'s output."""
    c = d["config"]
    rs = c.get("rope_scaling")
    lines = [
        f"{d['path']}  ({d['format']}, {d['arch']}"
        + (f", {d['quantization']}" if d.get("quantization") else "")
        + (f", split into {d['parts']} files)" if d.get("parts", 1) > 1 else ")"),
        f"  layers {c['num_hidden_layers']}  hidden {c['hidden_size']}  ffn {c['intermediate_size']}  "
        f"heads {c['num_attention_heads']}/{c['num_key_value_heads']}  vocab {c['vocab_size']}  "
        f"tied {c['tie_word_embeddings']}",
        f"  rope theta {c['rope_theta']:g}  scaling {rs if rs else 'none'}  ctx {c['max_position_embeddings']}  "
        f"rms eps {c['rms_norm_eps']:g}",
    ]
    dca = c.get("dual_chunk_attention_config")
    if dca:
        orig = dca.get("original_max_position_embeddings")
        exact = min(dca["chunk_size"], orig or dca["chunk_size"])
        lines.append(f"  dual chunk attention: chunk {dca['chunk_size']}, local {dca['local_size']}"
                     + (f", original ctx {orig}" if orig else "") + " (qconvert's numpy decoder runs it; llama.cpp "
                     f"ignores it and uses plain attention, which gives the same results only up to {exact} tokens)")
    if d["arch"] == "qwen2moe":
        lines.append(f"  experts {c['num_experts']} (top {c['num_experts_per_tok']}, ffn {c['moe_intermediate_size']}), "
                     f"shared ffn {c['shared_expert_intermediate_size']}")
    t = d["tokenizer"]
    lines.append(f"  tokenizer: {t['real_tokens']} tokens ({t['tokens']} slots), {t['merges']} merges, bos {t['bos_id']} "
                 f"eos {t['eos_id']} pad {t['pad_id']}, add_bos {t['add_bos']}, chat template {t['chat_template']}")
    lines.append(f"  {len(d['tensors'])} tensors, {d['n_params'] / 1e6:.1f}M params, {d['n_bytes'] / 2**20:.1f} MiB, "
                 f"types {d['types']}")
    rows = d["tensors"] if max_rows is None else d["tensors"][:max_rows]
    w = max((len(r["name"]) for r in rows), default=10)
    for r in rows:
        lines.append(f"  {r['name']:<{w}}  {r['type']:>14}  {str(r['shape']):>16}  {r['nbytes'] / 2**20:9.2f} MiB")
    if max_rows is not None and len(d["tensors"]) > max_rows:
        lines.append(f"  ... {len(d['tensors']) - max_rows} more (use --all)")
    return "\n".join(lines)


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers inside a name by value: layers.2 before layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
