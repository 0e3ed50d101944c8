"""The quantisers' C library (``qconvert.quant._kernels``: int4 group search, GPTQ column sweep) and its
signatures, declared once."""
from __future__ import annotations

import ctypes

from formats.errors import QConvertError
from formats.native import I64, INT, P, load

SIGNATURES = {
    "qc_group_quant": ([P, I64, I64, INT, INT, INT, INT, P, P, P, P, INT, P], None),
    "qc_gptq_block": ([P, I64, P, I64, I64, I64, I64, INT, INT, INT, INT, P, I64, P, P, P, I64, I64, P], None),
}
LIB = load("qconvert.quant._kernels", SIGNATURES)


def lib() -> ctypes.CDLL:
    """The library, or a one-line error saying how to build it."""
    if LIB is None:
        raise QConvertError("the compiled quantisation kernels (qconvert.quant._kernels) are missing; "
                            "reinstall qconvert with a C compiler (pip install -e .)")
    return LIB
