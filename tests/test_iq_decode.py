"""Native decoding of the i-quants, TQ1_0 / TQ2_0 and MXFP4 (formats/ggml/iq_blocks.h): the GGML library's
to_f32 equals gguf-py's dequantize bit for bit, and the decoder's products over the packed bytes equal
dequantise-then-multiply."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from formats.ggml import codec

TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
         "MXFP4"]
# byte offset of each type's f16 block scale (IQ1_M spreads its scale over the top nibbles of bytes 48..55)
SCALE_AT = {"IQ1_S": 0, "IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0, "IQ4_NL": 0,
            "IQ4_XS": 0, "TQ1_0": 52, "TQ2_0": 64}

pytestmark = pytest.mark.skipif(not codec.available(), reason="needs the compiled kernels")


def random_blocks(t: str, n: int, seed: int = 0) -> np.ndarray:
    """n blocks of type t: random bytes, the f16 scale a moderate value of random sign."""
    size = GGML_QUANT_SIZES[GQ[t]][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    d = (rng.uniform(0.01, 2.0, n) * rng.choice([-1, 1], n)).astype(np.float16).view(np.uint16)
    if t in SCALE_AT:
        raw[:, SCALE_AT[t]:SCALE_AT[t] + 2] = d.view(np.uint8).reshape(n, 2)
    elif t == "IQ1_M":
        sc = raw[:, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        for k in range(4):
            sc[:, k] |= ((d >> np.uint16(4 * k)) & np.uint16(0xF)) << np.uint16(12)
        raw[:, 48:56] = sc.view(np.uint8)
    else:  # MXFP4: an E8M0 exponent near 1
        raw[:, 0] = rng.integers(120, 136, n)
    return raw


@pytest.mark.parametrize("t", TYPES)
def test_to_f32_matches_gguf_dequantize_bit_for_bit(t):
    raw = random_blocks(t, 700)
    ours = codec.to_f32(raw, t)
    ref = quants.dequantize(raw, GQ[t]).reshape(-1)
    assert ours.shape == ref.shape == (700 * GGML_QUANT_SIZES[GQ[t]][0],)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0.1
    assert ours.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()


@pytest.mark.parametrize("t", TYPES)
def test_to_f32_hostile_scales_match(t):
    """Every byte random, scales included (subnormal, huge, negative): still gguf-py's values where finite."""
    size = GGML_QUANT_SIZES[GQ[t]][1]
    raw = np.random.default_rng(5).integers(0, 256, size=(300, size), dtype=np.uint8)
    ours = codec.to_f32(raw, t)
    with np.errstate(all="ignore"):  # inf * 0 in gguf-py
        ref = quants.dequantize(raw, GQ[t]).reshape(-1)
    assert np.array_equal(ours, ref, equal_nan=True)
