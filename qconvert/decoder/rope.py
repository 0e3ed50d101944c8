"""Rotary position tables shared by every backend: default, linear and YaRN, as transformers computes them.

YaRN follows transformers' ``_compute_yarn_parameters``: blended inverse frequencies between
interpolation (``/factor``) and extrapolation over the correction range [low, high] (floored / ceiled),
and an attention factor ``0.1 ln(factor) + 1`` applied to cos and sin.
"""
from __future__ import annotations

import math

import numpy as np

from formats.model.config import ModelConfig


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2] float32, attention scaling) for the config's rope."""
    dim, base = cfg.head_dim, float(cfg.rope_theta)
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponent, dtype=np.float32)
    inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if not rs:
        return inv, 1.0
    factor = float(rs["factor"])
    if rs["type"] == "linear":
        return (inv / np.float32(factor)).astype(np.float32), 1.0
    # yarn
    orig = int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings))
    attn = rs.get("attention_factor")
    if attn is None:
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extra = (np.float32(1) - ramp).astype(np.float32)
    inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (inter * (1 - extra) + inv * extra).astype(np.float32), float(attn)


def cos_sin(inv_freq: np.ndarray, scale: float, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [T, head_dim] (halves duplicated, as rotate_half expects), times the attention scale."""
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return (np.cos(emb) * np.float32(scale)).astype(np.float32), (np.sin(emb) * np.float32(scale)).astype(np.float32)
