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


# ---- the decoder's products over the packed bytes (qconvert/decoder: _dot.c, _dot_iq_simd.h) ----
from formats.model.stored import KERNEL_TYPES, PackedMatrix  # noqa: E402
from formats.model.tensor import LazyTensor  # noqa: E402
from qconvert.decoder import native, products  # noqa: E402

needs_decoder = pytest.mark.skipif(not native.available(), reason="needs the decoder's compiled kernels")


def _isa_levels() -> list[int]:
    levels = [0]
    for level in (1, 2):
        if native.set_isa(level) == native.ISA_NAMES[level]:
            levels.append(level)
    native.set_isa(-1)
    return levels


def _matrix(t: str, rows: int, cols: int, seed: int = 1) -> tuple[PackedMatrix, np.ndarray]:
    block, size = GGML_QUANT_SIZES[GQ[t]]
    raw = random_blocks(t, rows * cols // block, seed).reshape(rows, cols // block * size)
    return PackedMatrix.ggml(t, raw, cols), raw


@needs_decoder
@pytest.mark.parametrize("t", TYPES)
def test_products_run_natively_and_match_dequantise_then_multiply(t):
    assert t in KERNEL_TYPES
    cols = 768 if GGML_QUANT_SIZES[GQ[t]][0] == 256 else 96 * 3  # 288: 9 blocks, MXFP4 rows of odd bytes
    m, raw = _matrix(t, 37, cols)
    assert m.stype == t and np.shares_memory(m.data, raw)  # the stored bytes themselves, not a copy
    w = codec.to_f32(raw, t).reshape(37, cols)
    rng = np.random.default_rng(7)
    try:
        for level in _isa_levels():
            native.set_isa(level)
            assert np.array_equal(products.dequant(m).view(np.uint32), w.view(np.uint32)), level
            assert np.array_equal(products.dequant(m, 5, 19), w[5:19]), level
            for T in (1, 3, 8, 20):
                x = rng.standard_normal((T, cols)).astype(np.float32)
                ref = x.astype(np.float64) @ w.T.astype(np.float64)
                y = products.matmul(m, x[0] if T == 1 else x)
                err = np.linalg.norm(y.reshape(T, -1) - ref) / np.linalg.norm(ref)
                assert err < 2e-6, (level, T, err)
    finally:
        native.set_isa(-1)


@needs_decoder
@pytest.mark.parametrize("t", ["IQ2_XXS", "IQ4_XS", "MXFP4", "TQ1_0"])
def test_lazy_tensor_packs_in_its_stored_type(t):
    """LazyTensor.packed hands the decoder the stored blocks (no float32 copy of the matrix)."""
    block, size = GGML_QUANT_SIZES[GQ[t]]
    raw = random_blocks(t, 16 * 512 // block).reshape(16, -1)
    lt = LazyTensor("w", (16, 512), t, lambda a, b: raw[a:b].reshape(-1), mapper=lambda: raw)
    m = lt.packed()
    assert m.stype == t and m.nbytes == raw.nbytes and np.shares_memory(m.data, raw)
    x = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    ref = lt.numpy().astype(np.float64) @ x
    assert np.linalg.norm(products.matmul(m, x) - ref) / np.linalg.norm(ref) < 2e-6
