"""llama.cpp's own CPU dot-product kernels, called one row at a time (for tests and scripts).

llama-cpp-python ships ggml's CPU backend as a shared library; ``ggml_get_type_traits_cpu(type)`` hands out
the functions its matrix product uses when one token is decoded: ``from_float`` of the weight type's
``vec_dot_type`` (the rounding of the activations to Q8_0 / Q8_K) and ``vec_dot`` (one weight row against
them). ``vec_dot_rows`` runs exactly those, so a product of ours can be held to llama.cpp's bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np


class _Traits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


@functools.cache
def _cpu() -> ctypes.CDLL:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
    return cpu


def vec_dot_rows(type_id: int, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float32 [n] = llama.cpp's ``vec_dot`` of each packed row of ``rows`` (uint8 [n, row_bytes], GGML type
    ``type_id``) against ``x`` (float32 [cols]) rounded by ``from_float`` of the type's vec_dot_type."""
    cpu = _cpu()
    tr = cpu.ggml_get_type_traits_cpu(type_id).contents
    act = cpu.ggml_get_type_traits_cpu(tr.vec_dot_type).contents
    x = np.ascontiguousarray(x, np.float32)
    rows = np.ascontiguousarray(rows, np.uint8)
    buf = np.zeros(4 * x.size + 1024, np.uint8)  # any vec_dot_type's row of x.size values fits
    _FROM_FLOAT(act.from_float)(x.ctypes.data, buf.ctypes.data, x.size)
    dot = _VEC_DOT(tr.vec_dot)
    out = np.empty(len(rows), np.float32)
    s = ctypes.c_float()
    for r in range(len(rows)):
        dot(x.size, ctypes.byref(s), 0, rows[r].ctypes.data, 0, buf.ctypes.data, 0, 1)
        out[r] = s.value
    return out
