"""The C kernels equal the numpy / gguf-package codecs bit for bit."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

from formats.ggml import codec

pytestmark = pytest.mark.skipif(not codec.available(), reason="C kernels not built")


def _floats(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(n) * 0.05).astype(np.float32)
    x[:12] = [0.0, -0.0, 1e-8, -3e-7, 6.1e-5, -6.0e-5, 65504, 65519, -65520, 70000, 1e-30, 3.0]
    return x


@pytest.mark.parametrize("t", ["F16", "BF16"])
def test_float_conversions_bit_exact(t):
    x = _floats(1 << 16)
    with np.errstate(over="ignore"):
        a, b = codec.from_f32(x, t), codec.from_f32(x, t, use_c=False)
    assert a.view(np.uint16).tolist() == b.view(np.uint16).tolist()
    assert np.array_equal(codec.to_f32(a, t), codec.to_f32(b, t, use_c=False))


def test_bf16_to_f16_direct_equals_via_f32():
    u = codec.from_f32(_floats(1 << 16), "BF16")
    with np.errstate(over="ignore"):
        assert np.array_equal(codec.convert(u, "BF16", "F16"), codec.convert(u, "BF16", "F16", use_c=False))


@pytest.mark.parametrize("t", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])  # K-quants: see test_kquants.py
def test_block_quantize_matches_gguf_package(t):
    x = _floats(1 << 15)
    x[:32] = 0.0  # an all-zero block
    x[32:64] = np.linspace(-1, 1, 32)  # ties in magnitude: the first extreme wins
    x[64:96] = -x[32:64]
    x = x[np.isfinite(x) & (np.abs(x) < 1e4)][: 1 << 14].reshape(-1, 256)
    ours = codec.from_f32(x, t)
    ref = quants.quantize(x, GQ[t]).reshape(-1)
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize("t", sorted(codec.C_DEQUANT))
def test_dequant_matches_gguf_package(t):
    block, size = GGML_QUANT_SIZES[GQ[t]]
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(512, size), dtype=np.uint8)
    raw[:, 1::2] &= 0x3B  # keep every f16 field finite
    ours = codec.to_f32(raw, t)
    ref = quants.dequantize(raw, GQ[t]).reshape(-1)
    assert ours.shape == ref.shape == (512 * block,)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("t", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_round_trip_error(t):
    """Encoding then decoding stays within a fraction of the block range (a wrong packing breaks this)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256 * 64).astype(np.float32)
    y = codec.to_f32(codec.from_f32(x, t), t)
    rel = np.sqrt(((y - x) ** 2).mean()) / x.std()
    assert rel < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[t], rel


def test_c_type_table_matches_gguf_constants():
    """formats/ggml/types.h, through qc_type_size: every type it knows has gguf-py's (block, bytes), and it
    knows every type the C code handles; ids it does not know answer -1."""
    import ctypes
    block, size = ctypes.c_int64(-7), ctypes.c_int64(-7)
    known = {}
    for t in GQ:
        if codec._LIB.qc_type_size(int(t), ctypes.byref(block), ctypes.byref(size)) == 0:
            known[t.name] = (block.value, size.value)
            assert known[t.name] == GGML_QUANT_SIZES[t], t.name
    handled = {"F32", "F16", "BF16", "IQ4_NL", "IQ4_XS"} | codec.C_DEQUANT | codec.C_QUANT | codec.GRID_TYPES
    assert len(handled) >= 15 and handled <= set(known), sorted(handled - set(known))
    block.value = size.value = -7
    for bad in (-1, 4, 9, 15, 31, 1 << 20):
        assert codec._LIB.qc_type_size(bad, ctypes.byref(block), ctypes.byref(size)) == -1
    assert (block.value, size.value) == (-7, -7)
