"""The lattice i-quants (IQ1_S .. IQ3_S): our encoders against ggml's own, bit for bit."""
import gguf
import numpy as np
import pytest
from test_imatrix import _ggml, _hostile_rows

from formats.ggml import codec

GQ = gguf.GGMLQuantizationType
LATTICE = sorted(codec.IQ_LATTICE)


def _rows(rows: int = 24, cols: int = 512) -> np.ndarray:
    """Hostile rows (zeros, one huge value, one sign, tiny values) and weight-like rows."""
    rng = np.random.default_rng(3)
    x = np.concatenate([_hostile_rows(rows, cols), rng.standard_normal((rows, cols)).astype(np.float32) * 0.02,
                        (rng.standard_t(3, (rows, cols)) * 0.05).astype(np.float32)])
    return x


def _importance(cols: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    im = (rng.gamma(0.5, 1.0, cols) * 3).astype(np.float32)
    im[5], im[100:132] = 0, 0
    return im


@pytest.mark.parametrize("qtype", LATTICE)
def test_lattice_encoders_bit_identical_to_ggml(qtype):
    """With and (where llama.cpp allows it) without an importance matrix, our bytes are ggml_quantize_chunk's,
    and the gguf package decodes them to within the type's error of the input."""
    lib = _ggml()
    q = GQ[qtype]
    lib.ggml_quantize_init(int(q))
    x = _rows()
    im = _importance(x.shape[1])
    block, size = gguf.constants.GGML_QUANT_SIZES[q]
    for w in (im,) if qtype in codec.NEEDS_IMATRIX else (im, None):
        ref = np.zeros(x.size // block * size, np.uint8)
        lib.ggml_quantize_chunk(int(q), x.ctypes.data, ref.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if w is None else w.ctypes.data)
        ours = codec.from_f32(x, qtype, imatrix=w)
        bad = np.flatnonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(1))
        assert bad.size == 0, f"{qtype} imatrix={w is not None}: {bad.size} of {ref.size // size} blocks differ, first {bad[:5]}"
    dq = gguf.quants.dequantize(ours, q).reshape(x.shape)
    normal = slice(x.shape[0] // 3, None)
    rel = float(np.linalg.norm(dq[normal] - x[normal]) / np.linalg.norm(x[normal]))
    assert rel < 0.8, rel


@pytest.mark.parametrize("qtype", sorted(codec.NEEDS_IMATRIX))
def test_types_that_need_an_imatrix_refuse_without_one(qtype):
    with pytest.raises(ValueError, match="qconvert imatrix"):
        codec.from_f32(np.ones(256, np.float32), qtype)


def test_values_no_grid_point_fits_are_refused_in_one_line():
    """Where ggml aborts the process (IQ2_XXS on huge values), we raise one clear error instead."""
    x = np.full((1, 256), 1e30, np.float32)
    with pytest.raises(ValueError, match="out of the encoder's range"):
        codec.from_f32(x, "IQ2_XXS", imatrix=np.ones(256, np.float32))
