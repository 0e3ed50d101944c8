"""Where an i-quant super-block keeps each group's grid code and scale, so that a quantiser of its own (GPTQ's
column sweep, qconvert/quant/gptq_ggml.py) can re-choose the codes of a block the type's encoder made.

Every lattice type cuts its 256-value super-block into 32 groups of 8 values. A group's values are
``s * grid[i]`` with the group's signs (IQ2_*, IQ3_*: grid magnitudes, one sign bit per value) or
``s * (grid[i] + delta)`` (IQ1_*: signed grid points and a shift of ±1/8). ``s`` comes from the block's scale
fields, which stay as the encoder chose them; only the codes (grid index, signs, IQ1_M's shift) change.
Three sign schemes, the type table's ``signs``:

- ``parity``: 7 stored bits, the eighth makes the count of negative values even (IQ2_XXS, IQ2_XS, IQ3_XXS);
- ``free``: 8 stored bits (IQ2_S, IQ3_S);
- ``grid``: the grid points are signed; IQ1_M also stores each group's shift sign (IQ1_S: one per 32 values).

The byte layout is llama.cpp's (ggml-common.h block_iq*), the same the ``gguf`` package's dequantisers read;
tests/test_gptq.py::test_gptq_on_lattice_grids checks that blocks rewritten here decode, in the ``gguf`` package
and in our C decoder, to exactly the values ``round_group`` returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as GQ
from gguf import quants

GROUPS = 32  # groups of 8 values per 256-value super-block
IQ1_DELTA = np.float32(0.125)


def _u(b: np.ndarray, off: int, n: int) -> np.ndarray:
    """Little-endian unsigned field of ``n`` bytes at byte ``off`` of every row of ``b`` (uint32)."""
    v = np.zeros(b.shape[0], np.uint32)
    for i in range(n):
        v |= b[:, off + i].astype(np.uint32) << np.uint32(8 * i)
    return v


def _put(b: np.ndarray, off: int, n: int, v: np.ndarray) -> None:
    for i in range(n):
        b[:, off + i] = (v >> np.uint32(8 * i)) & np.uint32(0xFF)


def _f16(b: np.ndarray, off: int) -> np.ndarray:
    return _u(b, off, 2).astype(np.uint16).view(np.float16).astype(np.float32)


def _nibble(b: np.ndarray, off: int, i: int) -> np.ndarray:
    """The i-th 4-bit field of the bytes from ``off`` (low nibble first)."""
    return ((b[:, off + i // 2] >> np.uint8(4 * (i % 2))) & np.uint8(15)).astype(np.float32)


def _bits(b: np.ndarray, off: int, n: int, shift: int, width: int, v: np.ndarray) -> None:
    """Set ``width`` bits at ``shift`` of the n-byte field at ``off`` to ``v``."""
    mask = np.uint32(((1 << width) - 1) << shift)
    _put(b, off, n, (_u(b, off, n) & ~mask) | ((v.astype(np.uint32) << np.uint32(shift)) & mask))


# --- each type: scale(b, k) -> (s [rows], delta [rows] or None); write(b, k, idx [rows, 8 // width], signs, neg)
#     signs: the 8-bit mask of negative values (bit j = value j); neg: IQ1 shift sign (True: -1/8)

def _xxs_scale(b, k):
    return _f16(b, 0) * (np.float32(0.5) + (_u(b, 2 + 8 * (k // 4) + 4, 4) >> 28).astype(np.float32)) * np.float32(
        0.25), None


def _xxs_write(b, k, idx, signs, neg):
    b[:, 2 + 8 * (k // 4) + k % 4] = idx[:, 0]
    _bits(b, 2 + 8 * (k // 4) + 4, 4, 7 * (k % 4), 7, signs & 0x7F)


def _xs_scale(b, k):
    return _f16(b, 0) * (np.float32(0.5) + _nibble(b, 66, k // 2)) * np.float32(0.25), None


def _xs_write(b, k, idx, signs, neg):
    _put(b, 2 + 2 * k, 2, idx[:, 0].astype(np.uint32) | ((signs.astype(np.uint32) & 0x7F) << 9))


def _s_scale(b, k):
    return _f16(b, 0) * (np.float32(0.5) + _nibble(b, 74, k // 2)) * np.float32(0.25), None


def _s_write(b, k, idx, signs, neg):
    b[:, 2 + k] = idx[:, 0] & 0xFF
    b[:, 34 + k] = signs
    _bits(b, 66 + k // 4, 1, 2 * (k % 4), 2, idx[:, 0] >> 8)


def _3xxs_scale(b, k):
    return _f16(b, 0) * (np.float32(0.5) + (_u(b, 66 + 4 * (k // 4), 4) >> 28).astype(np.float32)) * np.float32(
        0.5), None


def _3xxs_write(b, k, idx, signs, neg):
    b[:, 2 + 2 * k] = idx[:, 0]
    b[:, 3 + 2 * k] = idx[:, 1]
    _bits(b, 66 + 4 * (k // 4), 4, 7 * (k % 4), 7, signs & 0x7F)


def _3s_scale(b, k):
    return _f16(b, 0) * (1 + 2 * _nibble(b, 106, k // 4)), None


def _3s_write(b, k, idx, signs, neg):
    for h in range(2):
        j = 2 * k + h
        b[:, 2 + j] = idx[:, h] & 0xFF
        _bits(b, 66 + j // 8, 1, j % 8, 1, idx[:, h] >> 8)
    b[:, 74 + k] = signs


def _1s_scale(b, k):
    qh = _u(b, 34 + 2 * (k // 4), 2)
    dl = _f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)
    return dl, np.where(qh & 0x8000, -IQ1_DELTA, IQ1_DELTA).astype(np.float32)


def _1s_write(b, k, idx, signs, neg):
    b[:, 2 + k] = idx[:, 0] & 0xFF
    _bits(b, 34 + 2 * (k // 4), 2, 3 * (k % 4), 3, idx[:, 0] >> 8)


def _1m_d(b):
    sc = [_u(b, 48 + 2 * i, 2) for i in range(4)]
    d = ((sc[0] >> 12) | ((sc[1] >> 12) << 4) | ((sc[2] >> 12) << 8) | ((sc[3] >> 12) << 12)).astype(np.uint16)
    return d.view(np.float16).astype(np.float32)


def _1m_scale(b, k):
    t = k // 2
    ls = (_u(b, 48 + 2 * (t // 4), 2) >> np.uint32(3 * (t % 4))) & 7
    return _1m_d(b) * (2 * ls + 1).astype(np.float32), None


def _1m_write(b, k, idx, signs, neg):
    _bits(b, 32 + k // 2, 1, 4 * (k % 2), 4, (idx[:, 0] >> 8) | (neg.astype(np.uint32) << 3))
    b[:, k] = idx[:, 0] & 0xFF


@dataclass(frozen=True)
class Lattice:
    """One lattice type: its grid (points of ``width`` values), sign scheme and group fields."""

    cls: type
    width: int
    signs: str
    scale: Callable
    write: Callable

    @cached_property
    def grid(self) -> np.ndarray:
        """[points, width] float32: the grid as the ``gguf`` package decodes it (built once per type)."""
        self.cls.init_grid()
        return self.cls.grid.reshape(-1, self.width).astype(np.float32)


LATTICES: dict[str, Lattice] = {
    "IQ2_XXS": Lattice(quants.IQ2_XXS, 8, "parity", _xxs_scale, _xxs_write),
    "IQ2_XS": Lattice(quants.IQ2_XS, 8, "parity", _xs_scale, _xs_write),
    "IQ2_S": Lattice(quants.IQ2_S, 8, "free", _s_scale, _s_write),
    "IQ3_XXS": Lattice(quants.IQ3_XXS, 4, "parity", _3xxs_scale, _3xxs_write),
    "IQ3_S": Lattice(quants.IQ3_S, 4, "free", _3s_scale, _3s_write),
    "IQ1_S": Lattice(quants.IQ1_S, 8, "grid", _1s_scale, _1s_write),
    "IQ1_M": Lattice(quants.IQ1_M, 8, "grid", _1m_scale, _1m_write),
}
assert set(LATTICES) == {t.name for t in (GQ.IQ2_XXS, GQ.IQ2_XS, GQ.IQ2_S, GQ.IQ3_XXS, GQ.IQ3_S, GQ.IQ1_S, GQ.IQ1_M)}


PARITY_CANDIDATES = 4  # grid points per half that an odd-parity group weighs against its sign flip


def _scores(x: np.ndarray, s: np.ndarray, G: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """[rows, points]: sum_j wt_j (x_j - s G[i, j])^2 less its part that does not depend on i."""
    return np.square(s)[:, None] * (np.square(G) @ wt)[None, :] - (2 * s)[:, None] * ((x * wt) @ G.T)


def _nearest(x: np.ndarray, s: np.ndarray, G: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Per row, the index of the grid point minimising sum_j wt_j (x_j - s G[i, j])^2 (first on ties)."""
    return np.argmin(_scores(x, s, G, wt), axis=1)


def _odd_parity(a: np.ndarray, m: np.ndarray, G: np.ndarray, wt: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose signs must flip one value: the grid points (each half's ``PARITY_CANDIDATES`` best) and the
    value to flip minimising distance + flip cost (4 wt_j a_j v_j). Returns (idx [n, 8 // w], flip [n])."""
    n, T = a.shape[0], PARITY_CANDIDATES
    halves = []
    for h in range(0, 8, w):
        sc = _scores(a[:, h:h + w], m, G, wt[h:h + w])
        top = np.argpartition(sc, T, axis=1)[:, :T]
        halves.append((top, np.take_along_axis(sc, top, axis=1)))
    if len(halves) == 1:
        cand, free = halves[0][0][:, :, None], halves[0][1]
    else:
        (t0, s0), (t1, s1) = halves
        cand = np.stack([np.repeat(t0, T, axis=1), np.tile(t1, (1, T))], axis=2)  # [n, T*T, 2]
        free = (s0[:, :, None] + s1[:, None, :]).reshape(n, -1)
    v = m[:, None, None] * G[cand].reshape(n, cand.shape[1], 8)
    cost = 4 * wt[None, None, :] * a[:, None, :] * v
    total = free + cost.min(axis=2)
    best = np.argmin(total, axis=1)
    rows = np.arange(n)
    return cand[rows, best], np.argmin(cost[rows, best], axis=1)


def round_group(lat: Lattice, b: np.ndarray, k: int, x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Re-choose group ``k``'s codes in the blocks ``b`` [rows, block bytes] (in place, scales kept) as the
    grid point nearest to ``x`` [rows, 8] in the column-weighted distance ``wt`` [8]; returns the values the
    new codes decode to [rows, 8] float32.

    Signed types fold the signs: the magnitude grid point nearest to |x|, the signs of x (times the scale's);
    under ``parity`` an odd count of negatives flips one value: the grid point and value whose distance plus
    flip cost (4 wt_j |x_j| v_j) is least, among each half's few nearest points.
    IQ1_M tries both shifts; IQ1_S keeps its sub-block's.
    """
    x = np.asarray(x, np.float32)
    wt = np.asarray(wt, np.float32)
    G = lat.grid
    s, delta = lat.scale(b, k)
    rows = x.shape[0]
    if lat.signs == "grid":
        neg = np.zeros(rows, bool)
        if delta is None:  # IQ1_M: the shift is the group's own; the negative one where it is strictly closer
            tries = []
            for dv in (IQ1_DELTA, -IQ1_DELTA):
                i = _nearest(x, s, G + dv, wt)
                v = s[:, None] * (G + dv)[i]
                tries.append((i, v, np.square(x - v) @ wt))
            (i0, v0, e0), (i1, v1, e1) = tries
            neg = e1 < e0
            idx, vals = np.where(neg, i1, i0), np.where(neg[:, None], v1, v0)
        else:
            idx = np.empty(rows, np.int64)
            vals = np.empty_like(x)
            for dv in (IQ1_DELTA, -IQ1_DELTA):
                r = delta == dv
                if r.any():
                    Gd = G + dv
                    idx[r] = _nearest(x[r], s[r], Gd, wt)
                    vals[r] = s[r, None] * Gd[idx[r]]
        lat.write(b, k, idx[:, None].astype(np.uint32), None, neg)
        return vals.astype(np.float32)
    a, m = np.abs(x), np.abs(s)
    w = lat.width
    idx = np.stack([_nearest(a[:, h:h + w], m, G, wt[h:h + w]) for h in range(0, 8, w)], axis=1)
    mag = s[:, None] * G[idx].reshape(rows, 8)  # the decoder's s * grid; signs below
    neg = (x < 0) != (s < 0)[:, None]
    if lat.signs == "parity":
        odd = np.flatnonzero(np.count_nonzero(neg, axis=1) % 2)
        if odd.size:
            idx[odd], j = _odd_parity(a[odd], m[odd], G, wt, w)
            mag[odd] = s[odd, None] * G[idx[odd]].reshape(odd.size, 8)
            neg[odd, j] ^= True
    signs = (neg.astype(np.uint32) << np.arange(8, dtype=np.uint32)).sum(axis=1).astype(np.uint32)
    lat.write(b, k, idx.astype(np.uint32), signs, None)
    return np.where(neg, -mag, mag).astype(np.float32)
