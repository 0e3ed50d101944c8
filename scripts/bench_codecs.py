#!/usr/bin/env python3
"""Speed of ``products.matmul`` (qconvert/decoder/products.py) per storage type: decoding (T = 1 row of x) on two threads.

Prints, per type and matrix shape, the time per product, ns per weight and the stored bytes read per second,
next to the peer: numpy's float32 BLAS product over the same matrix as F32. Matrices above the caches
(151936x896) measure memory bandwidth as much as the kernels; this machine's timings are noisy, so compare
runs taken back to back. ``--t`` sets the rows of x (default 1); ``--shapes`` e.g. ``4864x896,151936x896``; K-quants
need rows of whole 256-value blocks, so for them a shape whose cols are not a multiple of 256 is transposed
(896x4864: the same number of weights). ``--threads 1`` runs the kernels on one thread.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats.ggml import codec  # noqa: E402
from formats.int4 import layout as int4  # noqa: E402
from formats.model.stored import PackedMatrix  # noqa: E402
from qconvert.decoder import native, products  # noqa: E402

GGML = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
INTS = [(4, 32, False, 8), (4, 64, False, 16), (4, 32, True, 8), (8, 32, True, 8), (8, 32, True, 16), (3, 32, False, 8),
        (5, 32, False, 8), (2, 32, False, 8)]  # (bits, group, sym, scale_bits)
BASE_ROWS = 4864  # larger matrices repeat the rows of a quantised base (content does not change the speed)


def _tile(a: np.ndarray, rows: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(a, (rows,) + a.shape[1:]))


def ggml_matrix(t: str, w: np.ndarray, rows: int) -> PackedMatrix:
    """W (a base block of rows, repeated to ``rows``) stored as GGML type ``t``."""
    if t.endswith("_K") and w.shape[1] % 256:  # transposed: whole K blocks per row
        rows, w = rows * w.shape[1] // w.shape[0], np.ascontiguousarray(w.T)
    raw = codec.from_f32(w, t).view(np.uint8).reshape(w.shape[0], -1)
    return PackedMatrix.ggml(t, _tile(raw, rows), w.shape[1])


def int_matrix(spec: tuple[int, int, bool, int], w: np.ndarray, rows: int) -> PackedMatrix:
    """W quantised round-to-nearest into int codes of ``spec`` (bits, group, sym, scale_bits)."""
    from qconvert.quant.groupwise import quantize

    bits, group, sym, sb = spec
    g = quantize(w, bits, group, sym, method="rtn", scale_bits=sb)
    return PackedMatrix.int_codes(_tile(int4.pack(g.q, bits), rows), _tile(g.scales, rows),
                                  None if g.offsets is None else _tile(g.offsets, rows),
                                  None if g.steps is None else _tile(g.steps, rows), bits, group, w.shape[1])


def timeit(fn, seconds: float = 0.5) -> float:
    """Median seconds per call over about ``seconds`` of calls."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 5:
        fn()
        n += 1
    times = []
    for _ in range(5):
        t1 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t1) / n)
    return float(np.median(times))


def peer_blas(w: np.ndarray, x: np.ndarray):
    """The peer: numpy's float32 BLAS product x @ W.T over the same weights held as float32."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    return lambda: np.matmul(x, w.T, out=out)


def main() -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=1)
    ap.add_argument("--shapes", default="4864x896,151936x896")
    ap.add_argument("--types", default="", help="comma-separated subset, e.g. BF16,Q4_0,int4 g32 asym s8")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2, choices=(1, 2))
    ap.add_argument("--isa", type=int, default=-1, help="force 0 portable C, 1 AVX2, 2 AVX-512")
    a = ap.parse_args()
    if a.threads == 1:
        products.MIN_SPLIT = 1 << 62
    native.set_isa(a.isa)
    rng = np.random.default_rng(0)
    want = set(filter(None, a.types.split(",")))
    print(f"T = {a.t}, {a.threads} thread(s), {native.isa()}. ns/weight: time / (rows * cols); GB/s: stored bytes / time")
    print(f"{'type':22s} {'shape':>12s} {'us':>9s} {'ns/weight':>10s} {'GB/s':>7s}")
    for shape in a.shapes.split(","):
        rows, cols = map(int, shape.split("x"))
        w = (rng.standard_normal((min(rows, BASE_ROWS), cols)) * 0.02).astype(np.float32)
        x = rng.standard_normal((a.t, cols)).astype(np.float32)
        mats = [(t, lambda t=t: ggml_matrix(t, w, rows)) for t in GGML]
        mats += [(int4.QuantSpec(*s).label(), lambda s=s: int_matrix(s, w, rows)) for s in INTS]
        for name, make in mats:
            if want and name not in want:
                continue
            m = make()
            out = np.empty((a.t, m.rows), np.float32)
            xm = x if m.cols == cols else rng.standard_normal((a.t, m.cols)).astype(np.float32)
            dt = timeit(lambda: products.matmul(m, xm, out=out), a.seconds)
            n = rows * cols
            print(f"{m.stype:22s} {f'{m.rows}x{m.cols}':>12s} {dt * 1e6:9.1f} {dt * 1e9 / n:10.4f} {m.nbytes / dt / 1e9:7.1f}")
            if name == "F32":
                dt = timeit(peer_blas(products.dequant(m), x), a.seconds)
                print(f"{'  peer numpy BLAS f32':22s} {shape:>12s} {dt * 1e6:9.1f} {dt * 1e9 / n:10.4f} "
                      f"{m.nbytes / dt / 1e9:7.1f}")


if __name__ == "__main__":
    main()
