"""``qconvert quantize --format int4`` as a function: plan the per-matrix specs, run GPTQ if asked, write."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from formats.gguf.imatrix import Imatrix
from formats.model.names import canonical_names, canonical_shape
from formats.model.source import Source
from qconvert.quant.groupwise import GroupQuant, QuantSpec, quantize
from qconvert.quant.recipes import head_name, plan
from qconvert.quant.spill import SpillDict


@dataclass
class CalibOptions:
    """GPTQ's calibration choices (the CLI's --calib, --calib-samples, --calib-ctx, --act-order, --damp,
    --sequential, --propagate, --calib-dtype)."""

    text: Path | None = None
    samples: int = 64
    ctx: int = 512
    act_order: bool = False
    damp: float = 0.01
    sequential: bool = True
    propagate: float = 0.0
    dtype: str = "auto"


def matrix_shapes(src: Source) -> dict[str, tuple[int, int]]:
    """[rows, cols] of every matrix the int4 layout quantises (1-D tensors and router gates excluded)."""
    out = {}
    for n in canonical_names(src.config):
        shape = canonical_shape(n, src.config)
        if len(shape) == 2 and shape[0] > 1 and not n.endswith("mlp.gate.weight"):
            out[n] = (int(shape[0]), int(shape[1]))
    return out


def quantize_int4(src: Source, out: Path, base: QuantSpec = QuantSpec(), method: str = "search",
                  mix: str = "roles", head_bits: int = 8, target_bpw: float | None = None,
                  calib: CalibOptions = CalibOptions(), force: bool = False, quiet: bool = False,
                  echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantise ``src`` into the int4 folder ``out``; the writer's summary plus ``upgrades`` (the mix steps)."""
    from formats.int4.write import write_int4

    specs, upgrades = plan(src.config, matrix_shapes(src), base, head_bits, mix, target_bpw)
    summary = {"bits": base.bits, "group_size": base.group_size, "scheme": "sym" if base.sym else "asym",
               "scale_bits": base.scale_bits, "head_bits": head_bits, "mix": mix, "upgrades": upgrades,
               "zero_point": "int" if base.zero_int or base.sym else "float"}
    with SpillDict(near=out) as store:
        pre = _gptq(src, specs, calib, quiet, echo, store=store) if method == "gptq" else None
        st = write_int4(src, out, specs, plain_quantizer(method), method, force=force, progress=not quiet,
                        precomputed=pre, summary=summary)
    st["upgrades"] = upgrades
    return st


def plain_quantizer(method: str) -> Callable[..., GroupQuant]:
    """The writer's quantiser for matrices without precomputed codes: ``rtn`` as asked or at 8 bits (where
    the search gains nothing measurable over min/max), else the ``search`` fit."""
    def run(x, sp: QuantSpec, pool) -> GroupQuant:
        m = "rtn" if sp.bits == 8 or method == "rtn" else "search"
        return quantize(x, sp.bits, sp.group_size, sp.sym, m, pool, sp.scale_bits, zero_int=sp.zero_int)
    return run


def _gptq(src: Source, specs: dict, calib: CalibOptions, quiet: bool, echo: Callable[[str], None],
          quantise: Callable | None = None, skip: set[str] | None = None, store: SpillDict | None = None) -> dict:
    """GPTQ results for every decoder-layer matrix (the head, and ``skip``, are left to the plain quantiser),
    into ``store`` (results on disk) if given; ``quantise``: gptq_model's sweep (default: the int4 groups)."""
    from formats.files.progress import bar
    from qconvert.corpus import CALIB_MODULES, stdlib_text, tokens_digest, windows
    from qconvert.quant.gptq import gptq_model
    from qconvert.text import encode

    text = calib.text.read_text(encoding="utf-8", errors="replace") if calib.text else stdlib_text(CALIB_MODULES)
    ws = windows(encode(src.tokenizer, text), calib.samples, calib.ctx)
    t0 = time.perf_counter()
    with bar(src.config.num_hidden_layers, "gptq layers", not quiet) as pb:
        pre = gptq_model(src, ws, specs, "search", calib.damp, calib.act_order,
                         skip={head_name(src.config)} | (skip or set()), on_layer=lambda i, total: pb.update(1),
                         sequential=calib.sequential, quantise=quantise, store=store, propagate=calib.propagate,
                         dtype=calib.dtype)
    echo(f"gptq: {len(ws)} x {len(ws[0])} calibration tokens (ids {tokens_digest(ws)}), "
         f"{len(pre)} matrices in {time.perf_counter() - t0:.1f}s")
    return pre


def quantize_gguf_gptq(src: Source, out: Path, gtype: str, imatrix: Imatrix | None = None,
                       calib: CalibOptions = CalibOptions(), force: bool = False, quiet: bool = False,
                       echo: Callable[[str], None] = print) -> dict[str, str]:
    """``quantize --format gguf --type GTYPE --method gptq``: GPTQ onto the GGML blocks of a plain type or a
    llama-quantize mixture (qconvert/quant/gptq_ggml.py); the embedding and head are encoded plainly. The block
    fits use ``imatrix`` where it has an entry, else the calibration Hessian's diagonal; ``calib.act_order``
    fits every block up front and sweeps columns by decreasing Hessian diagonal. Returns the types."""
    from formats.gguf.write import FILE_TYPE, tensor_type, write_gguf
    from formats.model.names import gguf_layout, hf_to_gguf
    from qconvert.quant.gptq_ggml import GPTQ_TYPES, gptq_ggml_matrix
    from qconvert.quant.mixtures import MIXTURES, ROLES, ROLES_FILE_TYPE, mixture_types

    cfg = src.config
    if gtype in MIXTURES or gtype == ROLES:
        types = mixture_types(cfg, gtype, imatrix is not None)
        file_type = MIXTURES[gtype][1] if gtype in MIXTURES else ROLES_FILE_TYPE
    else:
        types = {g: tensor_type(g, canonical_shape(m[0], cfg), gtype) for g, m in gguf_layout(cfg)}
        file_type = FILE_TYPE[gtype.upper()]
    specs = {}
    for g, members in gguf_layout(cfg):
        for m in members:
            if m.startswith("model.layers.") and types[g] in GPTQ_TYPES:
                specs[m] = types[g]
    skip = {n for n in matrix_shapes(src) if n not in specs}

    def sweep(name, W, H, qtype, U, pool):
        g, expert = hf_to_gguf(name)
        imp = None
        if imatrix is not None and g in imatrix.entries:
            n_mat = cfg.num_experts if expert is not None else 1
            imp = imatrix.weights(g, W.shape[1], n_mat)[expert or 0]
        return gptq_ggml_matrix(W, H, qtype, imp, calib.damp, U, calib.act_order)

    with SpillDict(near=out) as store:
        pre = _gptq(src, specs, calib, quiet, echo, quantise=sweep, skip=skip, store=store)
        write_gguf(src, out, force=force, progress=not quiet, types=types, file_type=file_type, imatrix=imatrix,
                   raw_chunks=lambda m, t, pool: [np.asarray(pre[m]).reshape(-1)] if m in pre else None)
    return types

