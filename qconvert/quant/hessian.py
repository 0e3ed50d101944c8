"""Recording the inputs of a layer's matrices for GPTQ: the Hessian accumulator (X^T X, and the cross term
of error propagation) and the staged torch pass over one dense decoder layer (qconvert/quant/gptq.py runs it).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import numpy as np

from formats import threads

KEEP_ACTIVATIONS = 1 << 30  # bytes of down_proj inputs kept between its two passes (more are recomputed)
TRI_BLOCK = 1024  # column block of the upper-triangle Hessian update (wider Hessians only)


class Hessian:
    """X^T X of the inputs of one matrix, accumulated in float32 (with torch's GEMM when installed: about twice
    numpy's speed here; on ``device``), and the number of rows seen."""

    def __init__(self, cols: int, device: str = "cpu", cross: bool = False):
        self.n, self._cross, self._upper = 0, None, False
        try:
            import torch
            threads.sync_libraries()
            self._t = torch.zeros((cols, cols), dtype=torch.float32, device=device)
            if cross:
                self._cross = torch.zeros((cols, cols), dtype=torch.float32, device=device)
        except ImportError:
            if cross:
                raise
            self._t, self._np = None, np.zeros((cols, cols), np.float32)

    def add(self, x, x_ref=None) -> None:
        """Count the input rows ``x``; ``x_ref``: the same rows in the unquantised model (needs ``cross``):
        adds (x_ref - x)^T x to the cross term used by ``propagation``."""
        if self._t is None:
            x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
            self._np += x.T @ x
        else:
            import torch
            if not isinstance(x, torch.Tensor):
                x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            # float32 products even for bfloat16 inputs: a bfloat16 GEMM rounds its output, and that rounding
            # (2^-9 of each entry, large next to an outlier channel's) makes a Hessian indefinite
            x = x.reshape(-1, x.shape[-1]).to(self._t.device, torch.float32)
            cols = x.shape[1]
            if cols < 2 * TRI_BLOCK:
                self._t.addmm_(x.T, x)
            else:  # the upper triangle only, by column blocks (about half the products); ``H`` mirrors it
                for s in range(0, cols, TRI_BLOCK):
                    e = min(cols, s + TRI_BLOCK)
                    self._t[:e, s:e].addmm_(x[:, :e].T, x[:, s:e])
                self._upper = True
            if self._cross is not None:
                self._cross.addmm_((x_ref.reshape(x.shape).to(x.device, torch.float32) - x).T, x)
        self.n += x.shape[0]

    def propagation(self, W: np.ndarray, U: np.ndarray) -> np.ndarray:
        """The least-squares weight change that lets the quantised model's inputs X reproduce the unquantised
        model's outputs (error propagation, as in QEP / GPTAQ): W D H^-1 with D = (X_ref - X)^T X and
        H^-1 = U^T U (the damped inverse), so that ||X_ref W^T - X Q^T||^2 equals, up to a constant,
        ||X (W + W D H^-1)^T - X Q^T||^2: GPTQ of the corrected W then minimises the error against the
        unquantised model rather than against this layer alone."""
        import torch
        w = torch.from_numpy(np.ascontiguousarray(W, np.float32))
        u = torch.from_numpy(U)
        return ((w @ self._cross.cpu()) @ u.T @ u).numpy()

    @property
    def has_cross(self) -> bool:
        return self._cross is not None

    @property
    def H(self) -> np.ndarray:
        """X^T X as float32 (the accumulator itself on the CPU: no copy)."""
        if self._t is None:
            return self._np
        if self._upper:  # mirror the upper triangle, one column block at a time (no full-size temporary)
            n = self._t.shape[0]
            for s in range(0, n, TRI_BLOCK):
                e = min(n, s + TRI_BLOCK)
                self._t[e:, s:e].copy_(self._t[s:e, e:].T)
            self._upper = False
        return self._t.cpu().numpy()

    def take(self) -> np.ndarray:
        """The accumulator as float32, handed over: this object keeps no reference to it."""
        H = self.H
        self._t = self._np = None
        return H


def fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo): there torch's
    bfloat16 GEMM is about 5x its float32 one; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def has_torch() -> bool:
    """Whether torch is installed (the staged pass and the fast Hessian need it)."""
    return importlib.util.find_spec("torch") is not None


def dense_layer_staged(dec, i: int, xs: list, cos, sin, keys: list[str], done: Callable[[str, Hessian], None],
                        xs_ref: list | None = None, device: str = "cpu",
                        dtype: str = "float32") -> tuple[list, list | None]:
    """One dense layer, stage by stage, one pass over the windows per stage, in torch (its float32 GEMM is
    about twice numpy's here; ``device`` cuda on a GPU); returns the layer's outputs with all its matrices
    quantised. ``dtype`` bfloat16: the layer's matrix products take bfloat16 inputs and weights (float32
    accumulation; 5x the float32 GEMM speed on a CPU with AMX); norms, attention, the residual stream and the
    Hessians stay float32.
    q/k/v see the normed inputs; o_proj the attention context of the quantised q/k/v (kept per window); gate/up
    the normed residual after the quantised o_proj (kept); down the activations of the quantised gate/up (kept up to KEEP_ACTIVATIONS bytes, else recomputed for the outputs: they are the widest).
    ``xs_ref``: the unquantised model's inputs to this layer (error propagation): each stage's Hessian then
    also records the cross term against the same stage of the unquantised layer, whose outputs are returned
    second (else None)."""
    import torch
    F = torch.nn.functional
    cfg, n, m = dec.cfg, dec.layers[i], dec.m
    hd, nh, nkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    ref = xs_ref is not None

    def t(a):
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)

    dt = getattr(torch, dtype)

    def weight(k):  # the layer copy itself (float32: no second copy); quantised once ``done`` has run
        return t(m[k].f32()).to(dt)

    def norm(x, g):
        return (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g).to(dt)

    def rotate(x, c, s_):  # x [heads, T, hd]
        half = hd // 2
        return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s_

    def quantised(k, before):  # the weight after ``done``; in bfloat16 the float32 quantised copy is dropped
        w = weight(k)
        if dt is not torch.float32:
            m[k] = before  # the pass uses the bfloat16 copy; the caller restores the layer's matrices at its end
        return w

    def record(k, pairs):  # pairs: (input rows, the unquantised model's rows or None)
        hess = Hessian(m[k].cols, device, cross=ref)
        for x, x_ref in pairs:
            hess.add(x, x_ref)
        done(k, hess)

    ln1, ln2 = t(dec.w[n.ln1]), t(dec.w[n.ln2])
    bias = torch.cat([t(dec.w[n.q_b]), t(dec.w[n.k_b]), t(dec.w[n.v_b])])
    cos_t, sin_t = t(cos), t(sin)
    xs_in, xs = xs, [t(x) for x in xs]
    xr = [t(x) for x in xs_ref] if ref else [None] * len(xs)

    def attend(x, wqkv):
        T = x.shape[0]
        qkv = F.linear(norm(x, ln1), wqkv).float() + bias  # attention in float32: Qwen2's large k biases
        q = qkv[:, :nh * hd].view(T, nh, hd).transpose(0, 1)
        k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd).transpose(0, 1)
        v = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd).transpose(0, 1)
        c, s_ = cos_t[:T], sin_t[:T]
        o = F.scaled_dot_product_attention(rotate(q, c, s_)[None], rotate(k, c, s_)[None], v[None], is_causal=True,
                                           enable_gqa=True)[0]
        return o.transpose(0, 1).reshape(T, nh * hd).to(dt)

    wqkv_ref, before = weight(n.q) if ref else None, m[n.q]
    if n.q in keys:
        record(n.q, ((norm(x, ln1), None if r is None else norm(r, ln1)) for x, r in zip(xs, xr)))
    wqkv = quantised(n.q, before)
    ctxs = [attend(x, wqkv) for x in xs]
    ctx_ref = [attend(r, wqkv_ref) for r in xr] if ref else xr
    del wqkv_ref, wqkv
    wo_ref, before = weight(n.o) if ref else None, m[n.o]
    record(n.o, zip(ctxs, ctx_ref))
    wo = quantised(n.o, before)
    hs = [x + F.linear(c, wo) for x, c in zip(xs, ctxs)]
    hr = [x + F.linear(c, wo_ref) for x, c in zip(xr, ctx_ref)] if ref else xr
    del ctxs, ctx_ref, xs, wo_ref, wo
    xs_in.clear()  # the caller's list: the layer inputs are no longer needed
    if xs_ref is not None:
        xs_ref.clear()
    wgu_ref, before = weight(n.gate) if ref else None, m[n.gate]
    if n.gate in keys:
        record(n.gate, ((norm(h, ln2), None if r is None else norm(r, ln2)) for h, r in zip(hs, hr)))
    wgu = quantised(n.gate, before)
    ff = wgu.shape[0] // 2

    def act(h, w):
        gu = F.linear(norm(h, ln2), w)
        return F.silu(gu[:, :ff]) * gu[:, ff:]
    keep = sum(h.shape[0] for h in hs) * ff * wgu.element_size() <= KEEP_ACTIVATIONS  # else recomputed
    acts = []

    def down_inputs():
        for h, r in zip(hs, hr):
            a = act(h, wgu)
            acts.append(a if keep else None)
            yield a, None if r is None else act(r, wgu_ref)
    wd_ref, before = weight(n.down) if ref else None, m[n.down]
    record(n.down, down_inputs())
    wd = quantised(n.down, before)
    out = [(h + F.linear(act(h, wgu) if a is None else a, wd)).float().cpu().numpy() for h, a in zip(hs, acts)]
    out_ref = [(r + F.linear(act(r, wgu_ref), wd_ref)).float().cpu().numpy() for r in hr] if ref else None
    return out, out_ref
