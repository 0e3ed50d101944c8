"""What every backend shares: weight access over a Source, the KV cache shape, and sampling helpers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats.model.config import ModelConfig
from formats.model.source import Source


@dataclass
class LayerNames:
    """Canonical tensor names of one decoder layer."""

    i: int

    def __getattr__(self, short: str) -> str:  # e.g. names.q_proj -> model.layers.i.self_attn.q_proj.weight
        table = {
            "ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
            "q": "self_attn.q_proj.weight", "q_b": "self_attn.q_proj.bias",
            "k": "self_attn.k_proj.weight", "k_b": "self_attn.k_proj.bias",
            "v": "self_attn.v_proj.weight", "v_b": "self_attn.v_proj.bias",
            "o": "self_attn.o_proj.weight",
            "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
            "router": "mlp.gate.weight", "sh_gate": "mlp.shared_expert.gate_proj.weight",
            "sh_up": "mlp.shared_expert.up_proj.weight", "sh_down": "mlp.shared_expert.down_proj.weight",
            "sh_router": "mlp.shared_expert_gate.weight",
        }
        if short not in table:
            raise AttributeError(short)
        return f"model.layers.{self.i}.{table[short]}"

    def expert(self, e: int, proj: str) -> str:
        """Name of expert ``e``'s ``proj`` (gate_proj / up_proj / down_proj) weight."""
        return f"model.layers.{self.i}.mlp.experts.{e}.{proj}.weight"


def load_f32(src: Source, name: str) -> np.ndarray:
    """One tensor of the source as a float32 array in its canonical shape."""
    a = np.ascontiguousarray(src.tensors[name].numpy(), dtype=np.float32)
    return a if a.flags.writeable else a.copy()


def lm_head_name(cfg: ModelConfig) -> str:
    """The output projection's tensor (the embedding when tied)."""
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
