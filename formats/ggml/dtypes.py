"""(De)quantisation glue between float32 rows and the stored encodings (F32, F16, BF16, GGML types).

``decode_rows`` turns raw stored rows into float32; ``encode_rows`` turns float32 rows into the raw
bytes of a target type. Quantised GGML types go through the ``gguf`` package's block codecs.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GQ
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

HF_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """Raw bfloat16 (uint16) -> float32, exact."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> raw bfloat16 (uint16) with round-to-nearest-even; NaNs stay NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def row_nbytes(t: str, n: int) -> int:
    """Bytes used by one row of ``n`` values stored as type ``t``."""
    block, size = GGML_QUANT_SIZES[GQ[t]]
    if n % block:
        raise ValueError(f"row of {n} values is not a multiple of the {t} block size {block}")
    return n // block * size


def decode_rows(raw: np.ndarray, t: str) -> np.ndarray:
    """Raw stored rows of type ``t`` -> float32 array (rows, n)."""
    if t == "F32":
        return raw.view(np.float32)
    if t == "F16":
        return raw.view(np.float16).astype(np.float32)
    if t == "BF16":
        return bf16_to_f32(raw.view(np.uint16))
    return quants.dequantize(raw.view(np.uint8), GQ[t])


def encode_rows(x: np.ndarray, t: str) -> np.ndarray:
    """float32 rows -> raw rows of type ``t`` (float types keep their numpy dtype, others uint8)."""
    if t == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if t == "F16":
        return x.astype(np.float16)
    if t == "BF16":
        return f32_to_bf16(x)
    return quants.quantize(np.ascontiguousarray(x, dtype=np.float32), GQ[t])
