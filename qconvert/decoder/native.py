"""The decoder's C library (``qconvert.decoder._kernels``: _kernels.c, _dot.c, _dot_int.c, _dot_par.c) and
its signatures, declared once. ``LIB`` is None when the library is not built (the numpy paths run)."""
from __future__ import annotations

from formats.native import I64, INT, P, load

_DOT_GGML = [INT, P, I64, P, I64, I64, P, I64, I64, I64]
_DOT_INT = [P, I64, P, P, P, INT, INT, INT, P, I64, I64, P, I64, I64, I64]
SIGNATURES = {
    "qc_dot_ggml": (_DOT_GGML, INT),
    "qc_matmul_ggml": (_DOT_GGML + [INT], INT),
    "qc_dequant_ggml": ([INT, P, I64, I64, I64, I64, P], INT),
    "qc_dot_int": (_DOT_INT, INT),
    "qc_matmul_int": (_DOT_INT + [INT], INT),
    "qc_dequant_int": ([P, I64, P, P, P, INT, INT, INT, I64, I64, I64, P], INT),
    "qc_dot_set_isa": ([INT], INT),
    "qc_dot_isa": ([], INT),
    "qc_softmax_causal": ([P, I64, I64, I64, I64, I64], None),
    "qc_silu_mul": ([P, I64, P, I64, I64, P, I64, I64], None),
}
LIB = load("qconvert.decoder._kernels", SIGNATURES)
ISA_NAMES = ("portable C", "AVX2", "AVX-512")


def available() -> bool:
    """True when the C kernels are loaded (else the numpy fallbacks run)."""
    return LIB is not None


def isa() -> str:
    """Instruction set the C kernels use on this CPU ("numpy" without them)."""
    return "numpy" if LIB is None else ISA_NAMES[LIB.qc_dot_isa()]


def set_isa(level: int) -> str:
    """Force the C kernels' instruction set (0 portable C, 1 AVX2, 2 AVX-512, -1 the best the CPU has; a level
    the CPU lacks gives the best it has), e.g. to test every path on one machine; returns the one in use."""
    return "numpy" if LIB is None else ISA_NAMES[LIB.qc_dot_set_isa(int(level))]
