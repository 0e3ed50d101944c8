"""GGML block codecs: the C library ``formats.ggml._kernels`` (_kernels.c, _encode.c, _encode_w.c), with numpy
fallbacks.

``convert(raw, src, dst)`` turns raw rows of one stored type into raw rows of another; the C path is
bit-identical to the numpy / gguf-package path (tests check this) and releases the GIL, so callers
may convert chunks on several threads.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
from gguf import GGMLQuantizationType as GQ
from gguf.constants import GGML_QUANT_SIZES

from formats.ggml import dtypes
from formats.native import I64, INT, P, load

_F = [P, P, I64]
SIGNATURES = {
    **{f"qc_{a}_to_{b}": (_F, None) for a, b in (("f16", "f32"), ("f32", "f16"), ("bf16", "f32"), ("f32", "bf16"),
                                                 ("bf16", "f16"), ("f16", "bf16"))},
    "qc_dequant": ([INT, P, P, I64], INT),
    "qc_quant": ([INT, P, P, I64], INT),
    "qc_quant_ref": ([INT, P, P, I64], INT),
    "qc_quant_w": ([INT, P, P, I64, I64, P], INT),
    "qc_grid": ([INT, P, I64, P, P], INT),
    "qc_pack_codes": ([INT, P, I64, P], INT),
    "qc_pack_bits": ([P, I64, I64, INT, P], None),
    "qc_unpack_bits": ([P, I64, I64, INT, P], None),
    "qc_type_size": ([INT, P, P], INT),
    "qc_iq_register": ([INT, P, P, I64], INT),
    "qc_iq_register_signs": ([P], INT),
    "qc_iq_prepare": ([INT], INT),
}
_LIB = load("formats.ggml._kernels", SIGNATURES)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray | None:
    """C bit packing of codes [rows, cols] (formats/int4/layout.py: pack); None without the kernels."""
    if _LIB is None:
        return None
    q = np.ascontiguousarray(q, dtype=np.uint8)
    rows, cols = q.shape
    out = np.empty((rows, -(-cols * bits // 8)), np.uint8)
    _LIB.qc_pack_bits(_ptr(q), rows, cols, bits, _ptr(out))
    return out


def unpack_bits(b: np.ndarray, bits: int, cols: int) -> np.ndarray | None:
    """C unpacking (formats/int4/layout.py: unpack); None without the kernels."""
    if _LIB is None:
        return None
    b = np.ascontiguousarray(b, dtype=np.uint8)
    out = np.empty((b.shape[0], cols), np.uint8)
    _LIB.qc_unpack_bits(_ptr(b), b.shape[0], cols, bits, _ptr(out))
    return out


def _keep_chunk_buffers() -> None:
    """Let glibc reuse freed chunk buffers instead of mapping fresh pages for every chunk.

    Streaming converts tensors in chunks of a few MB; by default each such buffer is a new mmap whose
    page faults cost more than the conversion itself. Buffers below 64 MB now come from the heap.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_keep_chunk_buffers()
C_DEQUANT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M",
             "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"}
"""Block types qc_dequant decodes (blocks.h; the i-quants, ternary and MXFP4 types in iq_blocks.h)."""
C_QUANT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
IQ4 = {"IQ4_NL", "IQ4_XS"}  # formats/ggml/_encode_w.c: encoders and decoders
IQ_LATTICE = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"}
"""The i-quants whose blocks index a grid of 4 or 8 values (formats/ggml/iq.h; encoders in _encode_iq*.c)."""
NEEDS_IMATRIX = {"IQ1_S", "IQ2_XXS", "IQ2_XS"}
"""Types llama.cpp refuses to encode without an importance matrix (ggml_quantize_requires_imatrix)."""
WEIGHTED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
"""Types whose encoder uses an importance matrix (llama-quantize's set; Q8_0 and float types ignore it)."""
_FLOAT_DT = {"F32": np.float32, "F16": np.uint16, "BF16": np.uint16}


def available() -> bool:
    """True when the compiled kernels are loaded."""
    return _LIB is not None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _elems(raw: np.ndarray, t: str) -> tuple[np.ndarray, int]:
    """Contiguous raw buffer and its number of values."""
    raw = np.ascontiguousarray(raw)
    if t in _FLOAT_DT:
        return raw, raw.nbytes // np.dtype(_FLOAT_DT[t]).itemsize
    block, size = GGML_QUANT_SIZES[GQ[t]]
    return raw, raw.nbytes // size * block


def to_f32(raw: np.ndarray, t: str, use_c: bool = True) -> np.ndarray:
    """Raw values of type ``t`` (any shape, rows last) -> flat float32."""
    raw, n = _elems(raw, t)
    if t == "F32":
        return raw.view(np.float32).reshape(-1)
    if use_c and _LIB is not None and (t in ("F16", "BF16") or t in C_DEQUANT):
        out = np.empty(n, np.float32)
        if t == "F16":
            _LIB.qc_f16_to_f32(_ptr(raw), _ptr(out), n)
        elif t == "BF16":
            _LIB.qc_bf16_to_f32(_ptr(raw), _ptr(out), n)
        else:
            nb = raw.nbytes // GGML_QUANT_SIZES[GQ[t]][1]
            if _LIB.qc_dequant(int(GQ[t]), _ptr(raw), _ptr(out), nb) != 0:
                raise RuntimeError(f"{t}: the C decoder has no grid for this type (formats/ggml/iq.h)")
        return out
    block, size = GGML_QUANT_SIZES[GQ[t]]
    if t in ("F16", "BF16"):
        return dtypes.decode_rows(raw.reshape(-1), t).reshape(-1)
    return dtypes.decode_rows(raw.view(np.uint8).reshape(-1, size), t).reshape(-1)


def from_f32(x: np.ndarray, t: str, use_c: bool = True, imatrix: np.ndarray | None = None,
             reference: bool = False) -> np.ndarray:
    """float32 values -> flat raw values of type ``t`` (uint8 for block types, uint16 for F16/BF16).

    ``imatrix``: importance weights of the columns (x is then whole rows of ``len(imatrix)`` values), used
    by the types in ``WEIGHTED`` exactly as llama-quantize --imatrix uses them; other types ignore it.
    ``reference``: without an imatrix, ggml's reference quantisers where ours differ (Q2_K; Q2_K and Q3_K
    otherwise use our lower-error search), as llama-quantize --imatrix codes a tensor the file has no entry for.
    The IQ4 types and the weighted fits need the compiled kernels.
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    if t == "F32":
        return x
    if t in IQ4 or t in IQ_LATTICE or (imatrix is not None and t in WEIGHTED):
        return _from_f32_weighted(x, t, imatrix)
    if use_c and _LIB is not None and (t in ("F16", "BF16") or t in C_QUANT):
        if t in C_QUANT:
            block, size = GGML_QUANT_SIZES[GQ[t]]
            out = np.empty(n // block * size, np.uint8)
            (_LIB.qc_quant_ref if reference else _LIB.qc_quant)(int(GQ[t]), _ptr(x), _ptr(out), n // block)
        else:
            out = np.empty(n, np.uint16)
            (_LIB.qc_f32_to_f16 if t == "F16" else _LIB.qc_f32_to_bf16)(_ptr(x), _ptr(out), n)
        return out
    if t == "F16":
        return x.astype(np.float16).view(np.uint16)
    if t == "BF16":
        return dtypes.f32_to_bf16(x)
    block = GGML_QUANT_SIZES[GQ[t]][0]
    return dtypes.encode_rows(x.reshape(-1, block), t).reshape(-1)


def _from_f32_weighted(x: np.ndarray, t: str, imatrix: np.ndarray | None) -> np.ndarray:
    if _LIB is None:
        raise RuntimeError(f"{t} encoding{' with an importance matrix' if imatrix is not None else ''} needs the "
                           "compiled kernels (formats.ggml._kernels); reinstall qconvert with a C compiler")
    block, size = GGML_QUANT_SIZES[GQ[t]]
    cols = x.size if imatrix is None else imatrix.size
    if cols == 0 or x.size % cols or cols % block:
        raise ValueError(f"{t}: {x.size} values are not whole rows of {cols} (a multiple of {block})")
    if t in NEEDS_IMATRIX and imatrix is None:
        raise ValueError(f"{t} needs an importance matrix (make one with `qconvert imatrix`)")
    if t in IQ_LATTICE:
        _prepare(t)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    out = np.empty(x.size // block * size, np.uint8)
    rc = _LIB.qc_quant_w(int(GQ[t]), _ptr(x), _ptr(out), x.size // cols, cols, None if qw is None else _ptr(qw))
    if rc != 0 and t in IQ_LATTICE:
        raise ValueError(f"{t}: values out of the encoder's range (non-finite, or so large that no grid point "
                         "fits; llama.cpp aborts on them): check the source tensor")
    if rc != 0:
        raise ValueError(f"no importance-weighted encoder for {t}")
    return out


_PREPARED: set[str] = set()
_PREPARE_LOCK = threading.Lock()


def _prepare(t: str) -> None:
    """Builds the quantiser's lookup of an i-quant grid once (C: qc_iq_prepare, not thread-safe itself)."""
    if t in _PREPARED:
        return
    with _PREPARE_LOCK:
        if t not in _PREPARED:
            if _LIB.qc_iq_prepare(int(GQ[t])) != 0:
                raise RuntimeError(f"{t}: the grid tables could not be built (out of memory?)")
            _PREPARED.add(t)


def _register_grids() -> None:
    """Hands gguf-py's i-quant grids to the C library (formats/ggml/iq.h): each point's level indices and
    its values as stored, and the sign table."""
    from gguf import quants

    for name in ("IQ1_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"):
        cls = getattr(quants, name)
        cls.init_grid()
        values = np.ascontiguousarray(cls.grid, dtype=np.float32).reshape(-1)
        idx = np.searchsorted(np.asarray(cls.grid_map, np.float32), values).astype(np.uint8)
        stored = np.ascontiguousarray(values.astype(np.int8))
        if _LIB.qc_iq_register(int(GQ[name]), _ptr(idx), _ptr(stored), cls.grid_shape[0]) != 0:
            raise RuntimeError(f"gguf-py's {name} grid has an unexpected shape {cls.grid_shape}")
    signs = np.frombuffer(quants.IQ2_XXS.ksigns, np.uint8).copy()
    _LIB.qc_iq_register_signs(_ptr(signs))


if _LIB is not None:
    _register_grids()


GRID_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
"""Block types whose sub-block grids ``block_grid`` reads and whose codes ``pack_codes`` rewrites."""


def _need_grid(t: str) -> None:
    if _LIB is None:
        raise RuntimeError("GGML block grids need the compiled kernels (formats.ggml._kernels)")
    if t not in GRID_TYPES:
        raise ValueError(f"no block grid for {t}")


def block_grid(raw: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Sub-block parameters of GGML blocks: (d, m) [n_sub] with value = d * G(code) + m, and the sub-block
    length. G(code) = code for the affine types (codes 0..nmax, Q8_0's stored + 128), the IQ4 grid for IQ4."""
    _need_grid(t)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    block, size = GGML_QUANT_SIZES[GQ[t]]
    nb = raw.size // size
    subs = 1 if block == 32 else (16 if t in ("Q2_K", "Q3_K", "Q6_K") else 8)
    d, m = np.empty(nb * subs, np.float32), np.empty(nb * subs, np.float32)
    _LIB.qc_grid(int(GQ[t]), _ptr(raw), nb, _ptr(d), _ptr(m))
    return d, m, block // subs


def pack_codes(raw: np.ndarray, t: str, codes: np.ndarray) -> np.ndarray:
    """A copy of GGML blocks ``raw`` with their codes replaced by ``codes`` (one uint8 per value, as
    ``block_grid`` numbers them) and their scale bytes kept."""
    _need_grid(t)
    out = np.array(raw, dtype=np.uint8, copy=True).reshape(-1)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    block, size = GGML_QUANT_SIZES[GQ[t]]
    if codes.size != out.size // size * block:
        raise ValueError(f"{codes.size} codes for {out.size // size} {t} blocks")
    _LIB.qc_pack_codes(int(GQ[t]), _ptr(out), out.size // size, _ptr(codes))
    return out


def convert(raw: np.ndarray, src: str, dst: str, use_c: bool = True, imatrix: np.ndarray | None = None,
            reference: bool = False) -> np.ndarray:
    """Raw values of type ``src`` -> flat raw values of type ``dst`` (a copy-free view when equal); ``imatrix``:
    column importance for the encoder, ``reference``: ggml's reference quantisers (see ``from_f32``)."""
    if src == dst:
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if use_c and _LIB is not None and (src, dst) in (("BF16", "F16"), ("F16", "BF16")):
        raw, n = _elems(raw, src)
        out = np.empty(n, np.uint16)
        (_LIB.qc_bf16_to_f16 if src == "BF16" else _LIB.qc_f16_to_bf16)(_ptr(raw), _ptr(out), n)
        return out.view(np.uint8)
    return from_f32(to_f32(raw, src, use_c), dst, use_c, imatrix, reference).view(np.uint8)
