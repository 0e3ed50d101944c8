"""int4 layout -> GGML blocks by repacking bytes, where the int4 grid is a GGML grid (no rounding).

A GGML block covers 32 consecutive values of a row with one f16 scale ``d`` (and, for Q4_1, one f16 ``m``):

- Q4_0: ``d``, 16 bytes; byte ``j`` holds value ``j`` (low nibble) and ``j + 16`` (high nibble); ``d * (q - 8)``;
- Q4_1: ``d``, ``m``, 16 bytes as Q4_0; ``d * q + m``;
- Q5_0: ``d``, 4 bytes ``qh`` (bit k: the fifth bit of value k), 16 bytes of low nibbles as Q4_0; ``d * (q - 16)``;
- Q5_1: ``d``, ``m``, ``qh``, 16 bytes as Q5_0; ``d * q + m``;
- Q8_0: ``d``, 32 int8; ``d * q``.

An int4 group (``group_size`` 32/64/128 columns, one f16 scale, plus an f16 offset when asymmetric) spans
whole blocks when the row length is a multiple of 32 (a short last group then is too), so:

- b-bit symmetric codes (``s * (q - 2^(b-1))``), b <= 4 -> Q4_0 with ``d = s``, code ``q + 8 - 2^(b-1)``;
- b-bit asymmetric codes (``s * q + m``), b <= 4 -> Q4_1 with ``d = s``, ``m = m``, code ``q``;
- b-bit symmetric codes, b <= 4 -> Q4_1 with ``d = s``, ``m = -2^(b-1) * s`` (exact unless that overflows f16);
- b-bit symmetric codes, b <= 5 -> Q5_0 with ``d = s``, code ``q + 16 - 2^(b-1)``;
- b-bit asymmetric codes, b <= 5 -> Q5_1 with ``d = s``, ``m = m``, code ``q`` (symmetric: ``m = -2^(b-1) * s``);
- b-bit symmetric codes, b <= 8 -> Q8_0 with ``d = s``, int8 ``q - 2^(b-1)``.

Matrices stored with 8-bit scale codes (``scale_bits`` 8: scale = row step x code) map the same way, their
scales and offsets rounded to f16 (the codes are kept; the summary says "scales rounded").
Everything else (asymmetric codes to Q4_0 / Q8_0, more than 4 bits to Q4_x, a row length that is not a
multiple of 32) cannot be written exactly and is requantised from the dequantised values by the usual
GGUF writer. ``repack`` is the pure byte-level function; ``Int4GGUFPlan`` chooses per tensor and streams.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from formats.errors import QConvertError
from formats.gguf.write import FILE_TYPE, tensor_type
from formats.int4.layout import unpack
from formats.int4.read import stored_matrices
from formats.model.names import canonical_shape, gguf_layout
from formats.model.source import Source
from formats.model.stored import CodeMatrix
from formats.model.tensor import pipelined

MAPPABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


EXACT_OUTTYPES = ("auto", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # --outtype values that map int4 codes exactly


QK = 32  # values per GGML block of the mappable types


_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


_WIDTH = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}  # code bits of the nibble types


def exact_reason(bits: int, sym: bool, group_size: int, cols: int, ggml_type: str) -> str | None:
    """None when codes of this kind map exactly onto ``ggml_type`` blocks, else why not (a short phrase)."""
    if ggml_type not in MAPPABLE:
        return f"codes map onto {', '.join(MAPPABLE)} only, not {ggml_type}"
    if cols % QK:
        return f"row length {cols} is not a multiple of {QK}"
    if group_size % QK:
        return f"group size {group_size} is not a multiple of {QK}"
    if ggml_type == "Q8_0":
        if not sym:
            return "asymmetric codes have an offset Q8_0 cannot hold"
        if bits > 8:
            return f"{bits}-bit codes do not fit Q8_0"
        return None
    if bits > _WIDTH[ggml_type]:
        return f"{bits}-bit codes do not fit {ggml_type}'s {_WIDTH[ggml_type]} bits"
    if ggml_type in ("Q4_0", "Q5_0") and not sym:
        return f"asymmetric codes have an offset {ggml_type} cannot hold"
    return None


def _sym_offset(scales_u16: np.ndarray, bits: int) -> np.ndarray:
    """Raw f16 ``m = -2^(bits-1) * s`` (Q4_1 offset of symmetric codes); exact unless it overflows."""
    s = scales_u16.view(np.float16).astype(np.float32)
    return (s * np.float32(-(1 << (bits - 1)))).astype(np.float16).view(np.uint16)


def offset_overflows(scales_u16: np.ndarray, bits: int) -> bool:
    """True when some finite scale ``s`` makes ``-2^(bits-1) * s`` overflow f16 (then Q4_1 is not exact)."""
    s = scales_u16.view(np.float16)
    with np.errstate(over="ignore"):
        m = _sym_offset(scales_u16, bits).view(np.float16)
    return bool((np.isfinite(s) & ~np.isfinite(m)).any())


def _codes(qweight: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Codes [rows, cols] uint8 from stored (bit-packed) bytes."""
    return unpack(qweight, bits, cols)


def _per_block(v: np.ndarray, group_size: int, nb: int) -> np.ndarray:
    """Raw f16 per group [rows, G] -> per 32-block [rows, nb, 2] bytes (a group covers group_size/32 blocks)."""
    b = np.ascontiguousarray(v).view(np.uint8).reshape(v.shape[0], v.shape[1], 2)
    if group_size != QK:
        b = np.repeat(b, group_size // QK, axis=1)
    return b[:, :nb]


def repack(qweight: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, bits: int, group_size: int,
           cols: int, ggml_type: str) -> np.ndarray:
    """Stored int4-layout rows -> GGML ``ggml_type`` rows, uint8 [rows, row_nbytes], by byte repacking only.

    ``qweight``: uint8 [rows, ceil(cols * bits / 8)] (bit-packed codes, formats/int4/layout.py: pack); ``scales`` / ``offsets``:
    raw f16 (uint16 or float16) [rows, G]; ``offsets`` None for symmetric codes. Raises QConvertError when
    the mapping would not be exact (see ``exact_reason``).
    """
    sym = offsets is None
    kind = f"{bits}-bit {'sym' if sym else 'asym'} g{group_size}"
    why = exact_reason(bits, sym, group_size, cols, ggml_type)
    if why:
        raise QConvertError(f"cannot map {kind} codes onto {ggml_type}: {why}")
    rows, nb = qweight.shape[0], cols // QK
    want_q = (rows, -(-cols * bits // 8))
    want_s = (rows, -(-cols // group_size))
    if qweight.shape != want_q or scales.shape != want_s or (offsets is not None and offsets.shape != want_s):
        raise QConvertError(f"{kind} codes of {cols} columns: got qweight {list(qweight.shape)}, scales "
                            f"{list(scales.shape)}, expected {list(want_q)} and {list(want_s)}; the int4 file is corrupt")
    scales = np.ascontiguousarray(scales).view(np.uint16)
    if sym and ggml_type in ("Q4_1", "Q5_1"):
        if offset_overflows(scales, bits):
            raise QConvertError(f"cannot map symmetric codes onto {ggml_type}: -{1 << (bits - 1)} x scale overflows f16")
        offsets = _sym_offset(scales, bits)
    out = np.empty((rows, nb, _BLOCK_BYTES[ggml_type]), np.uint8)
    out[:, :, 0:2] = _per_block(scales, group_size, nb)
    if ggml_type == "Q8_0":
        c = _codes(qweight, bits, cols).reshape(rows, nb, QK)
        shift = np.uint8((256 - (1 << (bits - 1))) & 0xFF)  # q - 2^(b-1) in two's complement
        np.add(c, shift, out=out[:, :, 2:], casting="unsafe")
        return out.reshape(rows, -1)
    body = 2
    if ggml_type in ("Q4_1", "Q5_1"):
        out[:, :, 2:4] = _per_block(np.ascontiguousarray(offsets).view(np.uint16), group_size, nb)
        body = 4
    if ggml_type in ("Q5_0", "Q5_1"):
        c = _codes(qweight, bits, cols).reshape(rows, nb, QK)
        if sym and ggml_type == "Q5_0":
            c = c + np.uint8(16 - (1 << (bits - 1)))
        high = ((c >> 4) & 1).astype(np.uint32) << np.arange(QK, dtype=np.uint32)  # qh bit k: fifth bit of value k
        out[:, :, body:body + 4] = high.sum(axis=2, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, nb, 4)
        low = c & 0x0F
        out[:, :, body + 4:] = low[:, :, :16] | (low[:, :, 16:] << 4)
        return out.reshape(rows, -1)
    nib = out[:, :, body:]
    if bits == 4:  # codes unchanged (Q4_0 of sym, Q4_1 of sym or asym): move nibbles only
        # byte i of an int4 block holds values 2i, 2i+1; GGML byte j holds values j and j+16
        b = np.ascontiguousarray(qweight[:, : cols // 2]).reshape(rows, nb, 16)
        lo, hi = b[:, :, :8], b[:, :, 8:]
        nib[:, :, 0::2] = (lo & 0x0F) | (hi << 4)
        nib[:, :, 1::2] = (lo >> 4) | (hi & 0xF0)
        return out.reshape(rows, -1)
    c = _codes(qweight, bits, cols).reshape(rows, nb, QK)
    if sym and ggml_type == "Q4_0":
        c = c + np.uint8(8 - (1 << (bits - 1)))
    nib[...] = c[:, :, :16] | (c[:, :, 16:] << 4)
    return out.reshape(rows, -1)


def auto_type(bits: int, sym: bool) -> str:
    """GGML type ``--outtype auto`` gives an int4-layout matrix: Q4_0 / Q4_1 up to 4 bits, Q5_0 / Q5_1 for
    5 bits, Q8_0 above (exact for symmetric codes; asymmetric ones are requantised)."""
    if bits <= 4:
        return "Q4_0" if sym else "Q4_1"
    if bits == 5:
        return "Q5_0" if sym else "Q5_1"
    return "Q8_0"


def stream_blocks(m: CodeMatrix, ggml_type: str, pool: ThreadPoolExecutor | None = None,
                  chunk_values: int = 1 << 22) -> Iterator[np.ndarray]:
    """Yield ``m`` as GGML ``ggml_type`` bytes, row chunk by row chunk (two chunks ahead on ``pool``)."""
    step = max(1, chunk_values // m.cols)
    ranges = [(r, min(r + step, m.rows)) for r in range(0, m.rows, step)]

    def work(r: tuple[int, int]) -> np.ndarray:
        q, s, o = m.read(*r)
        return repack(q, s, o, m.bits, m.group_size, m.cols, ggml_type).reshape(-1)

    return pipelined(work, ranges, pool)


@dataclass
class Int4GGUFPlan:
    """Per-tensor GGML types for writing an int4 folder as GGUF, and which matrices are mapped exactly.

    ``types``: GGUF name -> GGML type (for ``write_gguf(types=...)``); ``exact``: canonical name -> type of
    the matrices written by repacking; ``requantised``: GGUF name -> (type, reason).
    """

    types: dict[str, str]
    file_type: int
    exact: dict[str, str]
    requantised: dict[str, tuple[str, str]]
    matrices: dict[str, CodeMatrix] = field(repr=False)
    rounded: set[str] = field(default_factory=set)  # GGUF names mapped with scales rounded to f16
    label: str = "int4"  # what the codes came from (the source's quantisation)
    mapped: set[str] = field(default_factory=set)  # GGUF names written by repacking codes
    rounding: str = CodeMatrix.ROUNDING

    def raw_chunks(self, name: str, ggml_type: str, pool: ThreadPoolExecutor | None) -> Iterator[np.ndarray] | None:
        """Pre-encoded bytes of canonical tensor ``name`` (a ``write_gguf`` hook), or None to convert as usual."""
        if self.exact.get(name) != ggml_type:
            return None
        return stream_blocks(self.matrices[name], ggml_type, pool)

    @property
    def n_exact(self) -> int:
        """GGUF tensors written by exact mapping (every member mapped)."""
        return len(self.mapped)

    def summary(self) -> str:
        """One line: how many tensors were mapped exactly, and which were requantised and why."""
        mapped = Counter(self.types[g] for g in self.mapped)
        n = self.n_exact + len(self.requantised)
        line = (f"{self.label} -> GGUF: {self.n_exact} of {n} quantised tensors mapped exactly"
                + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(mapped.items()))})" if mapped else "")
                + (f", {len(self.rounded)} of them with {self.rounding} (codes kept)"
                   if self.rounded else ""))
        if not self.requantised:
            return line + "; none requantised"
        groups: dict[tuple[str, str], list[str]] = {}
        for g, (t, why) in self.requantised.items():
            groups.setdefault((t, why), []).append(g)
        parts = []
        for (t, why), names in groups.items():
            shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            parts.append(f"{shown} -> {t} ({why})")
        return f"{line}; requantised {len(self.requantised)}: " + "; ".join(parts)


def plan_int4_gguf(src: Source, outtype: str, mixture: dict[str, str] | None = None,
                   file_type: int | None = None) -> Int4GGUFPlan:
    """Choose GGML types for an int4 Source (or a quantised HF checkpoint, ``src.stored``): ``auto`` -> per matrix Q4_0 (sym) / Q4_1 (asym) up to 4 bits,
    Q8_0 above (so an 8-bit head is Q8_0); ``q4_0`` / ``q4_1`` / ``q8_0`` -> that type for every matrix.

    Matrices whose codes map exactly are repacked; the others are requantised from their dequantised values
    (F16 when the row length is not a multiple of 32, as for any source). 1-D tensors, norms and routers
    stay F32. ``mixture`` (GGUF name -> type, e.g. a llama-quantize mixture's) fixes every tensor's type
    instead: the codes are repacked where they fit that type, the rest encoded as the mixture says.
    """

    if mixture is not None:
        return _plan_mixture(src, mixture, file_type)
    if outtype not in EXACT_OUTTYPES:
        raise QConvertError(f"--outtype {outtype} does not map int4 codes; choose one of {', '.join(EXACT_OUTTYPES)}")
    cfg = src.config
    mats = src.stored or stored_matrices(src)
    types, exact, req, rounded, mapped = {}, {}, {}, set(), set()
    for gname, members in gguf_layout(cfg):
        shape = canonical_shape(members[0], cfg)
        base = tensor_type(gname, shape, "q8_0")  # F32 (1-D, norms, routers), F16 (row not in blocks) or Q8_0
        ms = [mats.get(m) for m in members]
        if base == "F32" or any(m is None for m in ms):
            types[gname] = base if base == "F32" else tensor_type(gname, shape, "f16" if outtype == "auto" else outtype)
            continue
        m0 = ms[0]
        want = auto_type(m0.bits, m0.sym) if outtype == "auto" else outtype.upper()
        t = "F16" if base == "F16" else want
        why = f"row length {m0.cols} is not a multiple of {QK}" if base == "F16" else _why_not(ms, t)
        types[gname] = t
        _place(gname, ms, t, why, exact, mapped, rounded, req)
    counts = Counter(t for t in types.values() if t != "F32")
    main = counts.most_common(1)[0][0] if counts else "F32"
    return Int4GGUFPlan(types, FILE_TYPE.get(main, FILE_TYPE["F16"]), exact, req, mats, rounded,
                        label=src.quantization or "int4", mapped=mapped,
                        rounding=next(iter(mats.values())).ROUNDING if mats else CodeMatrix.ROUNDING)


def _plan_mixture(src: Source, mixture: dict[str, str], file_type: int | None) -> Int4GGUFPlan:
    """``plan_int4_gguf`` with every type given: repack the matrices whose codes fit their type."""

    cfg = src.config
    mats = src.stored or stored_matrices(src)
    exact, req, rounded, mapped = {}, {}, set(), set()
    for gname, members in gguf_layout(cfg):
        t = mixture[gname]
        ms = [mats.get(m) for m in members]
        if t in ("F32", "F16", "BF16") or any(m is None for m in ms):
            continue
        _place(gname, ms, t, _why_not(ms, t), exact, mapped, rounded, req)
    return Int4GGUFPlan(dict(mixture), file_type if file_type is not None else FILE_TYPE["F16"], exact, req, mats,
                        rounded, label=src.quantization or "int4", mapped=mapped,
                        rounding=next(iter(mats.values())).ROUNDING if mats else CodeMatrix.ROUNDING)


def _why_not(ms: list[CodeMatrix], t: str) -> str | None:
    """Why the matrices ``ms`` of one GGUF tensor cannot be repacked into ``t`` blocks (None: they can)."""
    m0 = ms[0]
    why = exact_reason(m0.bits, m0.sym, m0.group_size, m0.cols, t)
    if why is None and m0.sym and t in ("Q4_1", "Q5_1"):
        if any(offset_overflows(m.read(0, m.rows)[1], m.bits) for m in ms):
            why = f"-{1 << (m0.bits - 1)} x scale overflows f16"
    if why is None:
        why = next((r for m in ms if (r := m.map_reason())), None)
    if why is None and len({(m.bits, m.sym, m.group_size) for m in ms}) > 1:
        why = "its fused members differ in bits, scheme or group size"  # e.g. q/k/v of a mixed plan
    return why


def _place(gname: str, ms: list[CodeMatrix], t: str, why: str | None, exact: dict[str, str], mapped: set[str],
           rounded: set[str], req: dict[str, tuple[str, str]]) -> None:
    """Record one GGUF tensor as repacked (``why`` None) or requantised (with the reason)."""
    if why is None:
        exact.update({m.name: t for m in ms})
        mapped.add(gname)
        if any(m.rounded for m in ms):
            rounded.add(gname)
    else:
        m0 = ms[0]
        req[gname] = (t, f"{m0.bits}-bit {'sym' if m0.sym else 'asym'}: {why}")
