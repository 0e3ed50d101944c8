"""One model configuration for Qwen2 and Qwen2-MoE, read from / written to HF ``config.json`` and GGUF.

Reads transformers-4 style (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and transformers-5 style
(``rope_parameters``, ``dtype``) configs; writes transformers-4 style, which both versions load.
Derived fields (head_dim, kv groups, MoE flag) are computed once in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from formats.errors import QConvertError

HF_MODEL_TYPES = {"qwen2": "qwen2", "qwen2_moe": "qwen2moe"}  # HF model_type -> GGUF arch
HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM"}
SUPPORTED_ROPE = ("yarn", "linear")
_DTYPES = {"bfloat16", "float16", "float32"}


@dataclass
class ModelConfig:
    """Hyper-parameters of a Qwen2 / Qwen2-MoE decoder, in HF naming."""

    arch: str  # GGUF architecture: "qwen2" or "qwen2moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn"|"linear", "factor": f, ...}
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # MoE (qwen2moe only)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    # Qwen2.5-1M dual chunk attention {"chunk_size", "local_size", "original_max_position_embeddings"}
    dual_chunk_attention_config: dict[str, int] | None = None
    # kept for a faithful round trip (GGUF: {arch}.hf.*), unused by the maths (use_sliding_window true is refused)
    sliding_window: int | None = None
    max_window_layers: int | None = None
    use_sliding_window: bool = False
    name: str | None = None
    # derived
    head_dim: int = field(init=False)
    n_kv_groups: int = field(init=False)
    is_moe: bool = field(init=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.arch not in HF_ARCHITECTURES:
            raise QConvertError(f"unsupported architecture {self.arch!r}: qconvert handles qwen2 and qwen2moe only")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise QConvertError(f"inconsistent head counts: hidden {self.hidden_size}, heads "
                                f"{self.num_attention_heads}, kv heads {self.num_key_value_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.n_kv_groups = self.num_attention_heads // self.num_key_value_heads
        self.is_moe = self.arch == "qwen2moe"
        if self.is_moe and not (self.num_experts and self.num_experts_per_tok and self.moe_intermediate_size):
            raise QConvertError("qwen2moe config lacks num_experts / num_experts_per_tok / moe_intermediate_size")
        self.dual_chunk_attention_config = check_dca(self.dual_chunk_attention_config)
        if self.use_sliding_window:
            raise QConvertError("use_sliding_window is true; sliding-window attention is not supported (llama.cpp "
                                "ignores it for qwen2 too): set it to false if the model was trained without")

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], where: str = "config.json") -> "ModelConfig":
        """Build from a parsed HF ``config.json`` (transformers 4 or 5 style)."""
        if not isinstance(d, dict):
            raise QConvertError(f"{where}: expected a JSON object, got {type(d).__name__}; provide a valid HF config.json")
        mt = d.get("model_type")
        if not isinstance(mt, str) or mt not in HF_MODEL_TYPES:
            raise QConvertError(f"{where}: model_type {mt!r} is not supported; qconvert converts Qwen2-family "
                                f"models only (model_type 'qwen2' or 'qwen2_moe')")
        arch = HF_MODEL_TYPES[mt]
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict) or not isinstance(d.get("rope_scaling") or {}, dict):
            raise QConvertError(f"{where}: rope_parameters / rope_scaling must be JSON objects")
        if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
            raise QConvertError(f"{where}: per-layer rope_parameters are not supported for {mt}")
        theta = d.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None)
        if mt == "qwen2_moe":
            if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
                raise QConvertError(f"{where}: dense layers inside a qwen2_moe model (mlp_only_layers / "
                                    "decoder_sparse_step != 1) cannot be represented in GGUF")
        if d.get("use_sliding_window"):
            raise QConvertError(f"{where}: use_sliding_window is true; sliding-window attention is not supported "
                                "(llama.cpp ignores it for qwen2 too): set it to false if the model was trained without")
        dtype = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
        try:
            return cls(
                arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                max_position_embeddings=d.get("max_position_embeddings", 32768), rope_theta=float(theta),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                rope_scaling=normalize_rope_scaling(scaling, where), dtype=dtype if dtype in _DTYPES else "bfloat16",
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                num_experts=d.get("num_experts", 0), num_experts_per_tok=d.get("num_experts_per_tok", 0),
                moe_intermediate_size=d.get("moe_intermediate_size", 0),
                shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                sliding_window=d.get("sliding_window"), max_window_layers=d.get("max_window_layers"),
                dual_chunk_attention_config=check_dca(d.get("dual_chunk_attention_config"), where),
                name=d.get("_name_or_path") or None,
            )
        except KeyError as e:
            raise QConvertError(f"{where}: missing required key {e.args[0]!r}; is this a complete HF config?") from None
        except QConvertError as e:
            raise _located(e, where) from None
        except (TypeError, ValueError, OverflowError) as e:
            raise QConvertError(f"{where}: a value has the wrong type ({e}); fix config.json") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """HF ``config.json`` content (transformers-4 style, loadable by transformers 4 and 5)."""
        d: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[self.arch]],
            "model_type": "qwen2" if self.arch == "qwen2" else "qwen2_moe",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "use_sliding_window": self.use_sliding_window, "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers if self.max_window_layers is not None else self.num_hidden_layers,
            "torch_dtype": self.dtype,
        }
        if self.dual_chunk_attention_config:
            d["dual_chunk_attention_config"] = dict(self.dual_chunk_attention_config)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        if self.is_moe:
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                     output_router_logits=False, router_aux_loss_coef=0.001)
        return d

    # ---------------------------------------------------------------- GGUF
    def to_gguf_kv(self) -> dict[str, Any]:
        """Architecture keys for GGUF (``{arch}.*``), as llama.cpp reads them; values are Python scalars."""
        a = self.arch
        kv: dict[str, Any] = {
            f"{a}.block_count": self.num_hidden_layers, f"{a}.context_length": self.max_position_embeddings,
            f"{a}.embedding_length": self.hidden_size, f"{a}.feed_forward_length": self.intermediate_size,
            f"{a}.attention.head_count": self.num_attention_heads,
            f"{a}.attention.head_count_kv": self.num_key_value_heads,
            f"{a}.rope.freq_base": float(self.rope_theta),
            f"{a}.attention.layer_norm_rms_epsilon": float(self.rms_norm_eps),
        }
        if self.rope_scaling:
            rs = self.rope_scaling
            kv[f"{a}.rope.scaling.type"] = rs["type"]
            kv[f"{a}.rope.scaling.factor"] = float(rs["factor"])
            if "original_max_position_embeddings" in rs:
                kv[f"{a}.rope.scaling.original_context_length"] = int(rs["original_max_position_embeddings"])
            for hf, key in ROPE_EXTRA_KEYS.items():  # llama.cpp's yarn_beta_* where it has them, else ours
                if rs.get(hf) is not None:
                    kv[key.format(a=a)] = rs[hf] if hf == "truncate" else float(rs[hf])
        if self.dual_chunk_attention_config:  # our keys (gguf-py has none): llama.cpp ignores them (plain attention)
            for key, hf in DCA_KEYS.items():
                if hf in self.dual_chunk_attention_config:
                    kv[f"{a}.dual_chunk_attention.{key}"] = int(self.dual_chunk_attention_config[hf])
        # HF-only fields under {arch}.hf.* (not attention.sliding_window, which would mean SWA to llama.cpp)
        if self.sliding_window is not None:
            kv[f"{a}.hf.sliding_window"] = int(self.sliding_window)
        if self.max_window_layers is not None:
            kv[f"{a}.hf.max_window_layers"] = int(self.max_window_layers)
        if self.sliding_window is not None or self.max_window_layers is not None:
            kv[f"{a}.hf.use_sliding_window"] = bool(self.use_sliding_window)
        if self.is_moe:
            kv.update({f"{a}.expert_count": self.num_experts, f"{a}.expert_used_count": self.num_experts_per_tok,
                       f"{a}.expert_feed_forward_length": self.moe_intermediate_size,
                       f"{a}.expert_shared_feed_forward_length": self.shared_expert_intermediate_size})
            if self.norm_topk_prob:
                kv[f"{a}.expert_weights_norm"] = True
        return kv

    @classmethod
    def from_gguf_kv(cls, kv: dict[str, Any], vocab_size: int, tied: bool, where: str = "GGUF") -> "ModelConfig":
        """Build from GGUF metadata (``kv``: key -> Python value), the token count and tie detection."""
        a = kv.get("general.architecture")
        if a not in HF_ARCHITECTURES:
            raise QConvertError(f"{where}: general.architecture is {a!r}; qconvert handles qwen2 and qwen2moe only")

        def req(key: str) -> Any:
            if f"{a}.{key}" not in kv:
                raise QConvertError(f"{where}: missing metadata key {a}.{key}; the file is incomplete")
            return kv[f"{a}.{key}"]

        scaling = None
        st = kv.get(f"{a}.rope.scaling.type")
        if st and st != "none":
            scaling = {"type": st, "factor": float(kv.get(f"{a}.rope.scaling.factor", 1.0))}
            if f"{a}.rope.scaling.original_context_length" in kv:
                scaling["original_max_position_embeddings"] = int(kv[f"{a}.rope.scaling.original_context_length"])
            for hf, key in ROPE_EXTRA_KEYS.items():
                if key.format(a=a) in kv:
                    v = kv[key.format(a=a)]
                    scaling[hf] = v if hf == "truncate" else _f32_clean(v)
            scaling = normalize_rope_scaling(scaling, where)
        eos = kv.get("tokenizer.ggml.eos_token_id")
        dca = None
        if any(f"{a}.dual_chunk_attention.{key}" in kv for key in DCA_KEYS):
            dca = check_dca({hf: kv[f"{a}.dual_chunk_attention.{key}"] for key, hf in DCA_KEYS.items()
                             if f"{a}.dual_chunk_attention.{key}" in kv}, where)
        if kv.get(f"{a}.hf.use_sliding_window"):
            raise QConvertError(f"{where}: {a}.hf.use_sliding_window is true; sliding-window attention is not supported")
        try:
            return cls._from_gguf(kv, a, req, vocab_size, tied, scaling, eos, dca)
        except QConvertError as e:
            raise _located(e, where) from None
        except (TypeError, ValueError, OverflowError) as e:
            raise QConvertError(f"{where}: a metadata value has the wrong type ({e}); the file is damaged") from None

    @classmethod
    def _from_gguf(cls, kv: dict[str, Any], a: str, req: Any, vocab_size: int, tied: bool, scaling: Any, eos: Any,
                   dca: Any) -> "ModelConfig":
        return cls(
            arch=a, vocab_size=vocab_size, hidden_size=int(req("embedding_length")),
            intermediate_size=int(req("feed_forward_length")), num_hidden_layers=int(req("block_count")),
            num_attention_heads=int(req("attention.head_count")),
            num_key_value_heads=int(kv.get(f"{a}.attention.head_count_kv", req("attention.head_count"))),
            max_position_embeddings=int(kv.get(f"{a}.context_length", 32768)),
            rope_theta=_f32_clean(kv.get(f"{a}.rope.freq_base", 1e6)),
            rms_norm_eps=_f32_clean(kv.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings=tied, rope_scaling=scaling,
            bos_token_id=kv.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos,
            num_experts=int(kv.get(f"{a}.expert_count", 0)), num_experts_per_tok=int(kv.get(f"{a}.expert_used_count", 0)),
            moe_intermediate_size=int(kv.get(f"{a}.expert_feed_forward_length", 0)),
            shared_expert_intermediate_size=int(kv.get(f"{a}.expert_shared_feed_forward_length", 0)),
            norm_topk_prob=bool(kv.get(f"{a}.expert_weights_norm", False)),
            dual_chunk_attention_config=dca, sliding_window=_opt_int(kv.get(f"{a}.hf.sliding_window")),
            max_window_layers=_opt_int(kv.get(f"{a}.hf.max_window_layers")), name=kv.get("general.name"),
        )

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (derived fields recomputed)."""
        init = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        init.update(changes)
        return ModelConfig(**init)


def normalize_rope_scaling(rs: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """Canonical rope scaling dict ``{"type", "factor", ...}`` from either HF style, or None."""
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if kind == "default":
        return None
    if kind not in SUPPORTED_ROPE:
        raise QConvertError(f"{where}: rope scaling {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    if "factor" not in rs:
        raise QConvertError(f"{where}: rope scaling {kind!r} needs a 'factor'")
    out: dict[str, Any] = {"type": kind, "factor": float(rs.pop("factor"))}
    if "original_max_position_embeddings" in rs:
        out["original_max_position_embeddings"] = int(rs.pop("original_max_position_embeddings"))
    for k, v in rs.items():  # beta_fast, beta_slow, ... kept verbatim
        if v is not None:
            out[k] = v
    return out


ROPE_EXTRA_KEYS = {"beta_fast": "{a}.rope.scaling.yarn_beta_fast", "beta_slow": "{a}.rope.scaling.yarn_beta_slow",
                   "attention_factor": "{a}.hf.rope_scaling.attention_factor", "mscale": "{a}.hf.rope_scaling.mscale",
                   "mscale_all_dim": "{a}.hf.rope_scaling.mscale_all_dim", "truncate": "{a}.hf.rope_scaling.truncate"}
DCA_KEYS = {"chunk_size": "chunk_size", "local_size": "local_size",
            "original_context_length": "original_max_position_embeddings"}  # GGUF suffix -> HF key


def check_dca(dca: Any, where: str = "config") -> dict[str, Any] | None:
    """A validated ``dual_chunk_attention_config`` or None: chunk_size and local_size positive integers with
    local_size < chunk_size, original_max_position_embeddings (optional, as in vLLM: no length scaling without
    it) a positive integer. Other keys (vLLM's sparse_attention_*) are kept as they are for HF outputs; GGUF
    stores the three sizes only."""
    if dca is None or dca == {}:
        return None

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 < v < 1 << 31

    sizes = [k for k in DCA_KEYS.values() if k in (dca if isinstance(dca, dict) else {})]
    if not isinstance(dca, dict) or not {"chunk_size", "local_size"} <= set(sizes) or \
            not all(is_int(dca[k]) for k in sizes):
        raise QConvertError(f"{where}: dual_chunk_attention_config must hold positive integers chunk_size, "
                            f"local_size (and optionally original_max_position_embeddings); got {dca!r}")
    out = dict(dca)
    out.update({k: int(dca[k]) for k in sizes})
    if out["local_size"] >= out["chunk_size"]:
        raise QConvertError(f"{where}: dual_chunk_attention_config is invalid: local_size ({out['local_size']}) "
                            f"must be smaller than chunk_size ({out['chunk_size']})")
    return out


# (field, kind, lowest, highest): what a config may say before anything is sized from it
_LIMITS = [("vocab_size", "int", 1, 1 << 24), ("hidden_size", "int", 1, 1 << 17), ("intermediate_size", "int", 1, 1 << 20),
           ("num_hidden_layers", "int", 1, 1024), ("num_attention_heads", "int", 1, 4096),
           ("num_key_value_heads", "int", 1, 4096), ("max_position_embeddings", "int", 1, 1 << 26),
           ("rope_theta", "float", 1.0001, 1e12), ("rms_norm_eps", "float", 1e-12, 0.5),
           ("num_experts", "int", 0, 4096), ("num_experts_per_tok", "int", 0, 4096),
           ("moe_intermediate_size", "int", 0, 1 << 20), ("shared_expert_intermediate_size", "int", 0, 1 << 20),
           ("sliding_window", "int?", 0, 1 << 31), ("max_window_layers", "int?", 0, 1 << 31),
           ("bos_token_id", "int?", 0, (1 << 31) - 1)]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_fields(c: "ModelConfig") -> None:
    """Types and ranges of every field (a hostile config must not size an allocation or divide by zero)."""
    for name, kind, lo, hi in _LIMITS:
        v = getattr(c, name)
        if kind == "int?" and v is None:
            continue
        ok = _is_int(v) if kind.startswith("int") else isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v)
        if not ok or not lo <= v <= hi:
            raise QConvertError(f"{name} is {v!r}; expected {'an integer' if kind != 'float' else 'a number'} "
                                f"in [{lo}, {hi}]")
    eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
    if len(eos) > 64 or not all(e is None or (_is_int(e) and 0 <= e < 1 << 31) for e in eos):
        raise QConvertError(f"eos_token_id is {c.eos_token_id!r}; expected a token id or a short list of ids")
    if c.num_experts_per_tok > c.num_experts:
        raise QConvertError(f"num_experts_per_tok ({c.num_experts_per_tok}) exceeds num_experts ({c.num_experts})")
    if c.name is not None and not isinstance(c.name, str):
        raise QConvertError(f"the model name is {type(c.name).__name__}; expected a string")
    if not isinstance(c.dtype, str) or not isinstance(c.tie_word_embeddings, bool):
        raise QConvertError("dtype must be a string and tie_word_embeddings a boolean")
    rs = c.rope_scaling
    if rs is not None:
        f, orig = rs.get("factor"), rs.get("original_max_position_embeddings")
        if not isinstance(f, float) or not math.isfinite(f) or not 0 < f <= 1e6:
            raise QConvertError(f"rope scaling factor is {f!r}; expected a positive number")
        if orig is not None and not (_is_int(orig) and 0 < orig <= 1 << 26):
            raise QConvertError(f"rope scaling original_max_position_embeddings is {orig!r}; expected a positive integer")
        for k, v in rs.items():
            if k in ("type", "factor", "original_max_position_embeddings") or v is None:
                continue
            if k not in ROPE_EXTRA_KEYS:
                raise QConvertError(f"rope scaling has an unknown key {k!r} (known: factor, original_max_position_"
                                    f"embeddings, {', '.join(ROPE_EXTRA_KEYS)}); remove or fix it")
            if k == "truncate" and not isinstance(v, bool) or k != "truncate" and not (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < 1e6):
                raise QConvertError(f"rope scaling {k} is {v!r}; expected {'true/false' if k == 'truncate' else 'a positive number'}")


def _located(e: QConvertError, where: str) -> QConvertError:
    msg = str(e)
    return QConvertError(msg if msg.startswith(where) else f"{where}: {msg}")


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _f32_clean(x: float) -> float:
    """GGUF stores floats as f32: turn 9.99999997e-07 back into the 1e-06 the HF config had."""
    return float(f"{float(x):.7g}")
