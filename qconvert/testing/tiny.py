"""Tiny random Qwen2 / Qwen2-MoE checkpoints with the real Qwen2 tokenizer, for tests and the offline demo.

Weights are seeded and scaled so logits are peaky (std of several units): conversion errors show up
as KL divergence instead of vanishing in flat distributions. Files are written with the
``safetensors`` package and hand-written JSON, independently of qconvert's own writers.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "data" / "qwen2-tokenizer"
VOCAB = 151936

VARIANTS: dict[str, dict[str, Any]] = {
    "tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "untied_yarn": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, tie_word_embeddings=False,
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "h256": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    # YaRN with a short original window, so 256 tokens run far past it (positions 64..255 are extrapolated)
    "yarn_short": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256,
                       rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "moe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, model_type="qwen2_moe", num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
}


def write_tokenizer(out: Path) -> None:
    """Copy the shipped Qwen2 tokenizer files (tokenizer.json, tokenizer_config.json) into ``out``."""
    with gzip.open(DATA / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(DATA / "tokenizer_config.json", out / "tokenizer_config.json")


def hf_config(variant: str, dtype: str = "float32", style: int = 4) -> dict[str, Any]:
    """config.json content of a variant, transformers-4 (``style=4``) or transformers-5 (``style=5``) style."""
    v = dict(VARIANTS[variant])
    mt = v.pop("model_type", "qwen2")
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2MoeForCausalLM" if mt == "qwen2_moe" else "Qwen2ForCausalLM"], "model_type": mt,
        "vocab_size": VOCAB, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": v["num_hidden_layers"], "attention_dropout": 0.0,
    }
    rope = v.pop("rope_scaling", None)
    cfg.update(v)
    if mt == "qwen2_moe":
        cfg.update(norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
    if style == 4:
        cfg.update(rope_theta=1e6, rope_scaling=rope, torch_dtype=dtype)
    else:
        params = {"rope_type": "default", "rope_theta": 1e6}
        if rope:
            params = {"rope_type": rope["type"], "rope_theta": 1e6,
                      **{k: val for k, val in rope.items() if k != "type"}}
        cfg.update(rope_parameters=params, dtype=dtype)
    return cfg


def tensors(variant: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of a variant (HF names)."""
    c = hf_config(variant)
    rng = np.random.default_rng(seed)
    h, ff = c["hidden_size"], c["intermediate_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def w(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    def vec(n: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": (rng.standard_normal((VOCAB, h)) * 5.0 / np.sqrt(h)).astype(np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = vec(h, 1.0, 0.1)
        t[p + "post_attention_layernorm.weight"] = vec(h, 1.0, 0.1)
        for name, rows, bias_std in (("q_proj", q, 0.3), ("k_proj", kv, 0.3), ("v_proj", kv, 0.1)):
            t[p + f"self_attn.{name}.weight"] = w(rows, h)
            t[p + f"self_attn.{name}.bias"] = vec(rows, 0.0, bias_std)
        t[p + "self_attn.o_proj.weight"] = w(h, q, 0.5)
        if c["model_type"] == "qwen2_moe":
            e, mff, sff = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
            t[p + "mlp.gate.weight"] = w(e, h, 8.0)
            for j in range(e):
                t[p + f"mlp.experts.{j}.gate_proj.weight"] = w(mff, h)
                t[p + f"mlp.experts.{j}.up_proj.weight"] = w(mff, h)
                t[p + f"mlp.experts.{j}.down_proj.weight"] = w(h, mff, 0.25)
            t[p + "mlp.shared_expert.gate_proj.weight"] = w(sff, h)
            t[p + "mlp.shared_expert.up_proj.weight"] = w(sff, h)
            t[p + "mlp.shared_expert.down_proj.weight"] = w(h, sff, 0.25)
            t[p + "mlp.shared_expert_gate.weight"] = w(1, h, 2.0)
        else:
            t[p + "mlp.gate_proj.weight"] = w(ff, h)
            t[p + "mlp.up_proj.weight"] = w(ff, h)
            t[p + "mlp.down_proj.weight"] = w(h, ff, 0.5)
    t["model.norm.weight"] = vec(h, 1.0, 0.1)
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = (rng.standard_normal((VOCAB, h)) * 5.0 / np.sqrt(h)).astype(np.float32)
    return t


def make_tiny(out: Path, variant: str, dtype: str = "f32", seed: int = 0, style: int = 4,
              shard_bytes: int | None = None) -> Path:
    """Write a tiny HF checkpoint folder; ``dtype`` f32|bf16|f16; ``shard_bytes`` splits it with an index."""
    import torch  # only for bf16 serialisation through safetensors
    from safetensors.torch import save_file

    tdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ts = {k: torch.from_numpy(v).to(tdt) for k, v in tensors(variant, seed).items()}
    name = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[dtype]
    (out / "config.json").write_text(json.dumps(hf_config(variant, name, style), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                            "do_sample": False}, indent=2))
    write_tokenizer(out)
    if shard_bytes is None:
        save_file(ts, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for k, v in ts.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    wm = {}
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / fn), metadata={"format": "pt"})
        wm.update({k: fn for k in sh})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    return out
