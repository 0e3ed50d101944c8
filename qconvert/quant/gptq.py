"""GPTQ: data-aware group-wise quantisation (Frantar et al., 2022) through the numpy reference decoder.

For each linear layer ``y = x W^T`` GPTQ minimises ``||X W^T - X Q^T||^2`` over calibration inputs X:
columns are quantised one at a time and the rounding error of each is spread over the columns not
yet quantised, weighted by the inverse Hessian ``H = X^T X``. The model is processed layer by layer;
the inputs of layer i+1 come from layer i with its weights already quantised, so later layers
compensate earlier errors. Group scale/offset pairs are fitted (by the ``rtn`` or ``search`` method)
when the sweep reaches a group, on the error-updated weights (with 8-bit scale codes, on row steps fixed
beforehand from the original weights); ``act_order`` sweeps columns in order of
decreasing Hessian diagonal and fits the groups up front ("static groups"), so the stored layout is
unchanged. Linear algebra runs in torch when it is installed (numpy otherwise).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, MutableMapping

import numpy as np

from formats.errors import QConvertError
from formats.model.source import Source
from qconvert.quant import native
from qconvert.quant.groupwise import (METHODS, GroupQuant, QuantSpec, dequantize, group_values, quantize, scheme,
                                      stored_form)
from qconvert.quant.hessian import Hessian, dense_layer_staged, fast_bfloat16, has_torch

BLOCK = 128  # columns per lazy-update block


def inverse_hessian_factor(H, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so that H^-1 = U^T U), float32.

    ``H``: an array (copied), or a Hessian object whose accumulator is taken over and freed (a large Hessian
    then never coexists with more than one other [cols, cols] array). With torch: L = chol(H), H^-1 from L
    (cholesky_inverse), U = its upper Cholesky factor, each step dropping the previous one. Without torch:
    with J the order reversal and J H J = L L^T, U = J L^-1 J.
    """
    H = H.take() if isinstance(H, Hessian) else np.array(H, dtype=np.float32, copy=True)
    H[np.diag_indices_from(H)] += np.float32(damp * float(np.mean(np.diag(H), dtype=np.float64)))
    try:
        import torch
    except ImportError:
        R = np.ascontiguousarray(H[::-1, ::-1])
        Li = np.linalg.inv(np.linalg.cholesky(R)).astype(np.float32)
        return np.ascontiguousarray(Li[::-1, ::-1])
    t = torch.from_numpy(H)
    del H
    L = torch.linalg.cholesky(t)
    del t
    Hinv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(Hinv, upper=True).numpy()


def _grid(sc: np.ndarray, off: np.ndarray | None, bits: int):
    """(quantise, dequantise) functions for one column given per-row scale / offset (float32)."""
    nmax, half = (1 << bits) - 1, 1 << (bits - 1)
    inv = np.divide(1.0, sc, out=np.zeros_like(sc), where=sc != 0)
    if off is None:
        return (lambda w: np.clip(np.rint(w * inv) + half, 0, nmax),
                lambda q: (q - np.float32(half)) * sc)
    return (lambda w: np.clip(np.rint((w - off) * inv), 0, nmax),
            lambda q: q * sc + off)


def gptq_matrix(W: np.ndarray, H: np.ndarray, spec: QuantSpec = QuantSpec(), method: str = "search",
                damp: float = 0.01, act_order: bool = False, pool: ThreadPoolExecutor | None = None,
                use_c: bool = True, U: np.ndarray | None = None) -> GroupQuant:
    """GPTQ-quantise W [rows, cols] (float32) in ``spec`` given the input Hessian H [cols, cols] = X^T X.

    The column sweep runs in C when the kernels are built (``use_c``), else in numpy (the readable
    reference the C path is tested against). ``U`` may pass a ready ``inverse_hessian_factor`` (in sweep
    order) when several matrices share one H; H may then be just its diagonal [cols]."""
    bits, group_size, sym = spec.bits, spec.group_size, spec.sym
    W = np.array(W, dtype=np.float32, copy=True)
    rows, cols = W.shape
    dead = _diag(H) == 0
    if U is None or act_order:  # H itself is needed: a copy with never-seen inputs made harmless
        H = _undead(np.array(H, dtype=np.float32, copy=True))
    W[:, dead] = 0.0
    ng = -(-cols // group_size)
    scales = np.empty((rows, ng), np.uint16)
    offsets = None if sym else np.empty((rows, ng), np.uint16)
    steps = None
    if spec.scale_bits == 8 or act_order:  # row steps (and, for act-order, static groups) from the original weights
        g0 = quantize(W, bits, group_size, sym, method, pool, spec.scale_bits, zero_int=spec.zero_int)
        steps = g0.steps
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    if act_order:
        scales, offsets = g0.scales, g0.offsets
        W, H = W[:, perm], H[perm][:, perm]
    if U is None:
        U = inverse_hessian_factor(H, damp)
    Q = np.empty((rows, cols), np.uint8)
    block = max(BLOCK, group_size) // group_size * group_size
    if use_c and not act_order and _c_sweep(W, U, Q, scales, offsets, steps, spec, method, block, pool):
        return GroupQuant(Q, *stored_form(scales, offsets, steps, spec), bits, group_size, None, steps)
    sc = off = None
    for i1 in range(0, cols, block):
        i2 = min(cols, i1 + block)
        W1, E = W[:, i1:i2], np.empty((rows, i2 - i1), np.float32)  # W1 is a view: updated in place
        for i in range(i2 - i1):
            c = i1 + i
            g = perm[c] // group_size
            if act_order:
                s_all, o_all = group_values(scales[:, g:g + 1], None if sym else offsets[:, g:g + 1], steps)
                sc, off = s_all[:, 0], None if sym else o_all[:, 0]
            elif c % group_size == 0:  # a new group: fit its scale/offset on the error-updated weights
                gq = quantize(W1[:, i:i + group_size], bits, group_size, sym, method, pool, spec.scale_bits, steps,
                              spec.zero_int)
                scales[:, g] = gq.scales[:, 0].astype(np.int16).view(np.uint16) if steps is not None else gq.scales[:, 0]
                if not sym:
                    offsets[:, g] = gq.offsets[:, 0].astype(np.int16).view(np.uint16) if steps is not None \
                        else gq.offsets[:, 0]
                s_all, o_all = group_values(gq.scales, gq.offsets, gq.steps)
                sc, off = s_all[:, 0], None if sym else o_all[:, 0]
            qf, dq = _grid(sc, off, bits)
            w = W1[:, i]
            q = qf(w)
            Q[:, perm[c]] = q
            err = (w - dq(q)) / U[c, c]
            W1[:, i:] -= np.outer(err, U[c, c:i2])
            E[:, i] = err
        if i2 < cols:
            W[:, i2:] -= E @ U[i1:i2, i2:]
    if not act_order:
        scales, offsets = stored_form(scales, offsets, steps, spec)
    return GroupQuant(Q, scales, offsets, bits, group_size, None, steps)


def _c_sweep(W, U, Q, scales, offsets, steps, spec, method, block, pool) -> bool:
    """The column sweep in C (``qc_gptq_block``, rows split over two threads); False when unavailable."""
    lib = native.LIB
    if lib is None:
        return False
    rows, cols = W.shape
    ng = scales.shape[1]
    group_size = spec.group_size
    off_ptr = None if offsets is None else offsets.ctypes.data
    dq_ptr = None if steps is None else steps.ctypes.data
    for i1 in range(0, cols, block):
        i2 = min(cols, i1 + block)
        n = i2 - i1
        E = np.empty((rows, n), np.float32)
        Ub = np.ascontiguousarray(U[i1:i2, i1:i2])

        def run(r0: int, r1: int) -> None:
            lib.qc_gptq_block(W.ctypes.data + 4 * i1, cols, Ub.ctypes.data, n, n, r0, r1, group_size, spec.bits,
                              scheme(spec), METHODS[method], Q.ctypes.data + i1, cols, scales.ctypes.data, off_ptr,
                              dq_ptr, ng, i1 // group_size, E.ctypes.data)
        if pool is None or rows < 64:
            run(0, rows)
        else:
            fut = pool.submit(run, rows // 2, rows)
            run(0, rows // 2)
            fut.result()
        if i2 < cols:
            W[:, i2:] -= E @ U[i1:i2, i2:]
    return True


class _Recorder:
    """Wraps a decoder Matrix: accumulates X^T X of every input it multiplies."""

    def __init__(self, mat):
        self.mat, self.hess = mat, Hessian(mat.cols)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.hess.add(x)
        return self.mat(x)

    def split(self, y: np.ndarray) -> list[np.ndarray]:
        return self.mat.split(y)


def gptq_model(src: Source, windows: list[np.ndarray], specs: dict[str, QuantSpec], method: str = "search",
               damp: float = 0.01, act_order: bool = False, skip: set[str] = frozenset(),
               on_layer: Callable[[int, int], None] | None = None, sequential: bool = True,
               quantise: Callable | None = None, store: "MutableMapping | None" = None,
               propagate: float = 0.0, dtype: str = "auto") -> "MutableMapping":
    """GPTQ every decoder-layer matrix of ``src`` on calibration token ``windows``; {tensor name: result}.

    ``specs`` gives each matrix its QuantSpec (fused q/k/v and gate/up share one Hessian and are swept
    member by member in their own specs). ``sequential``: within a layer, q/k/v, then o_proj, then the
    feed-forward input matrices, then down_proj, each stage's Hessian recorded with the earlier stages
    already quantised (with torch installed a dense layer does this in one pass over the windows per stage
    that keeps the attention context and the residual stream between stages: about 1.5 forward passes per
    layer, torch GEMMs; otherwise, and for an MoE layer, the decoder runs the layer once per stage); without
    ``sequential`` one pass records the whole layer. Matrices named in ``skip`` (and
    those no calibration token reaches, e.g. an unused expert) are left to the caller's plain quantiser.
    ``quantise(name, W, H, spec, U, pool) -> (result, dequantised W)`` replaces the int4 group sweep (e.g.
    GGML blocks, qconvert/quant/gptq_ggml.py). ``store`` receives the results (default: a dict; a
    qconvert.quant.spill.SpillDict keeps them on disk). ``propagate`` > 0 (dense models, torch, sequential):
    the unquantised model runs alongside, and each matrix is first moved by that fraction of the least-squares
    change that makes its quantised-model inputs reproduce the unquantised model's outputs
    (Hessian.propagation), so later matrices also correct the error of earlier layers (a second forward
    stream and a second product per Hessian).
    ``dtype`` (the torch dense-layer pass): float32, bfloat16, or auto = bfloat16 where the CPU multiplies it
    natively (AMX / AVX512-BF16; ``fast_bfloat16``), else float32.
    Memory: one layer's weights (float32), its Hessians and activations (twice, with ``propagate``);
    ``on_layer(i, n_layers)`` reports progress.
    """
    from qconvert.decoder.numpy_backend import KVCache, NumpyDecoder
    from qconvert.decoder.rope import cos_sin

    dec = NumpyDecoder(src, stream=True)
    cfg = dec.cfg
    ctx = max(len(w) for w in windows)
    cos, sin = cos_sin(dec.inv_freq, dec.rope_scale, np.arange(ctx))
    staged = sequential and not cfg.is_moe and has_torch()
    if propagate and not staged:
        raise QConvertError("--propagate needs torch, a dense (not MoE) model and --sequential")
    dt = ("bfloat16" if fast_bfloat16() else "float32") if dtype == "auto" else dtype
    xs = [dec.m["model.embed_tokens.weight"].rows_f32(w) for w in windows]
    xs_ref = [x.copy() for x in xs] if propagate else None
    cache = KVCache(cfg, ctx)
    out = {} if store is None else store
    sweep = quantise or _int4_sweep(method, damp, act_order)
    with ThreadPoolExecutor(2) as pool:
        for i, n in enumerate(dec.layers):
            prefix = f"model.layers.{i}."
            keys = [k for k in dec.m if k.startswith(prefix) and not k.endswith("mlp.gate.weight")
                    and dec.m[k].rows > 1 and k not in skip]
            originals = {k: dec.m[k] for k in keys}
            done = lambda k, hess: _quantise_fused(dec, n, k, hess, specs, sweep, damp, act_order, pool, out,  # noqa: E731
                                                   propagate)
            if staged and n.o in keys and n.down in keys:
                xs, xs_ref = dense_layer_staged(dec, i, xs, cos, sin, keys, done, xs_ref, dtype=dt)
            elif propagate:
                raise QConvertError(f"--propagate needs every matrix of layer {i} quantised by GPTQ")
            else:
                stages = [[k for k in keys if _stage(k) == j] for j in range(4)] if sequential else [keys]
                for stage in stages:  # later stages see the outputs of the matrices already quantised
                    if not stage:
                        continue
                    rec = {k: _Recorder(dec.m[k]) for k in stage}
                    dec.m.update(rec)
                    for x in xs:
                        dec.layer(i, x, cache, cos[:len(x)], sin[:len(x)])
                    for k, r in rec.items():
                        dec.m[k] = r.mat
                        done(k, r.hess)
                xs = [dec.layer(i, x, cache, cos[:len(x)], sin[:len(x)]) for x in xs]
            dec.m.update(originals)  # the layer's dequantised float32 copies are no longer needed
            for m in dec.layer_mats[i]:
                m.release()
            if on_layer:
                on_layer(i + 1, len(dec.layers))
    return out


def _int4_sweep(method: str, damp: float, act_order: bool) -> Callable:
    def run(name, W, H, spec, U, pool):
        gq = gptq_matrix(W, H, spec, method, damp, act_order, pool, U=U)
        return gq, dequantize(gq)
    return run


def _quantise_fused(dec, n, k: str, hess: Hessian, specs, sweep, damp: float, act_order: bool, pool, out,
                    propagate: float = 0.0) -> None:
    """GPTQ one (fused) decoder matrix from its recorded Hessian; the decoder then uses the quantised weights.
    ``propagate``: the fraction of the error-propagation correction (Hessian.propagation) applied first."""
    from qconvert.decoder.matvec import Matrix

    mat = dec.m[k]
    if hess.n == 0:
        return
    members = [k] if len(mat.splits) == 1 else ([n.q, n.k, n.v] if k == n.q else [n.gate, n.up])
    W = mat.dense()
    hdiag = np.diag(hess.H).copy()  # zeros mark inputs no token reached
    U = None
    if not act_order:  # the sweeps need only the diagonal once U is known (dead inputs, importance)
        _undead(hess.H)  # in place: the recorder is done with it
        U = inverse_hessian_factor(hess, damp)
    Hs = hdiag if U is not None else hess.H
    if propagate and hess.has_cross:
        Ui = U if U is not None else inverse_hessian_factor(_undead(np.array(hess.H, copy=True)), damp)
        W += np.float32(propagate) * hess.propagation(W, Ui)
        del Ui
    r0 = 0
    for name, rows in zip(members, mat.splits):
        out[name], dq = sweep(name, W[r0:r0 + rows], Hs, specs[name], U, pool)
        W[r0:r0 + rows] = dq  # the dequantised rows replace the originals in place
        r0 += rows
    dec.m[k] = Matrix.from_f32(W, mat.splits)


def _stage(name: str) -> int:
    """Order of a (fused) matrix within a layer for the sequential mode: attention in, attention out,
    feed-forward in, feed-forward out."""
    if ".self_attn." in name:
        return 1 if name.endswith("o_proj.weight") else 0
    return 3 if name.endswith("down_proj.weight") else 2


def _diag(H: np.ndarray) -> np.ndarray:
    """The diagonal of a Hessian given whole [cols, cols], or just its diagonal [cols] (enough once the inverse
    factor U is computed)."""
    return H if H.ndim == 1 else np.diag(H)


def _undead(H: np.ndarray) -> np.ndarray:
    """H with the diagonal of never-seen inputs set to 1 (in place)."""
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    return H

