"""The decoder's C library (``qconvert.decoder._kernels``: _kernels.c, _dot.c, _dot_int.c, _dot_par.c, _step.c, _dot_q8.c) and
its signatures, declared once. ``LIB`` is None when the library is not built (the numpy paths run)."""
from __future__ import annotations

import ctypes

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
    "qc_dot_iq_register": ([INT, P, I64], INT),
    "qc_dot_iq_register_signs": ([P], INT),
    "qc_softmax_causal": ([P, I64, I64, I64, I64, I64], None),
    "qc_silu_mul": ([P, I64, P, I64, I64, P, I64, I64], None),
    "qc_decode_layer": ([P, P, P, P, I64, I64, P, P, ctypes.c_float, INT, INT, P], INT),
    "qc_decode_scratch": ([P, I64], I64),
    "qc_q8_supports": ([INT], INT),
    "qc_matmul_q8": ([INT, P, I64, P, I64, I64, P, I64, I64, I64, INT], INT),
    "qc_q8_quantize": ([INT, P, I64, P, P, P], INT),
    "qc_f32_to_bf16": ([P, P, I64], None),
    "qc_dequant_ggml_bf16": ([INT, P, I64, I64, I64, I64, P, INT], INT),
    "qc_bf16_to_f32": ([P, I64, I64, I64, P, I64], None),
}
LIB = load("qconvert.decoder._kernels", SIGNATURES)
ISA_NAMES = ("portable C", "AVX2", "AVX-512")
IQ_GRIDS = ("IQ1_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
"""The i-quants whose grids the library holds (IQ1_M uses IQ1_S's); formats/ggml/iq_blocks.h decodes with them."""


def _register_grids() -> None:
    """Hands gguf-py's i-quant grids (each point's values as ggml stores them) and sign table to the library,
    its own copy: formats/ggml/codec.py gives formats.ggml._kernels the same tables."""
    import numpy as np
    from gguf import GGMLQuantizationType as GQ
    from gguf import quants

    for name in IQ_GRIDS:
        cls = getattr(quants, name)
        cls.init_grid()
        values = np.ascontiguousarray(np.asarray(cls.grid, np.float32).reshape(-1).astype(np.int8))
        if LIB.qc_dot_iq_register(int(GQ[name]), values.ctypes.data, values.size) != 0:
            raise RuntimeError(f"gguf-py's {name} grid has an unexpected shape {cls.grid_shape}")
    signs = np.frombuffer(quants.IQ2_XXS.ksigns, np.uint8).copy()
    LIB.qc_dot_iq_register_signs(signs.ctypes.data)


if LIB is not None:
    _register_grids()


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
