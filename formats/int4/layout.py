"""qconvert's int4 layout (docs/int4-format.md): the stored form, no I/O (formats/int4/read.py reads it,
formats/int4/write.py writes it).

One ``model.int4.safetensors`` holds, for every quantised matrix ``W`` [rows, cols], the tensors
``W.qweight`` (uint8 codes: two 4-bit codes per byte, low nibble first, for 4 bits; one code per byte
otherwise), ``W.scales`` and, when asymmetric, ``W.offsets`` ([rows, groups]: f16, or 8-bit codes with
per-row f16 steps ``W.steps`` [rows, 2]) or integer zeros ``W.zeros`` (bit-packed, version 3), each matrix
with its own bits / group size;
1-D tensors are stored as F32. The header's ``__metadata__`` carries the format name, version and the
quantisation choices so a reader repeats them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from formats.errors import QConvertError
from formats.ggml import codec

FORMAT, VERSION, FILENAME = "qconvert-int4", "3", "model.int4.safetensors"  # reads versions 1 to 3


ZEROS_VERSION, PLAIN_VERSION = "3", "2"  # written: 3 when a matrix stores integer zeros (W.zeros), else 2


@dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantised: code width, group size, scheme and scale precision."""

    bits: int = 4
    group_size: int = 32
    sym: bool = False
    scale_bits: int = 8  # 16: f16 scales / offsets; 8: 8-bit codes on per-row f16 steps
    zero_int: bool = False  # asymmetric groups on an integer-zero grid, w = s * (q - z) (export-exact); False: any offset

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise QConvertError(f"--bits {self.bits} is not supported; choose 2 to 8")
        if self.scale_bits not in (8, 16):
            raise QConvertError(f"--scale-bits {self.scale_bits} is not supported; choose 8 or 16")
        if self.group_size < 1:
            raise QConvertError(f"--group-size {self.group_size} must be positive")

    def bits_per_weight(self, rows: int, cols: int) -> float:
        """Stored bits per weight of a [rows, cols] matrix in this spec (codes, scales, offsets, steps)."""
        ng = -(-cols // self.group_size)
        code = 8 * -(-cols * self.bits // 8)  # codes are bit-packed (formats/int4/layout.py: pack)
        zint = self.zero_int and not self.sym
        per_group = self.scale_bits + (0 if self.sym or zint else self.scale_bits)
        zeros = 8 * -(-ng * self.bits // 8) if zint else 0  # bit-packed integer zeros
        steps = 32 if self.scale_bits == 8 else 0
        return (code + ng * per_group + zeros + steps) / cols

    def label(self) -> str:
        """Short description, e.g. ``int4 g32 asym s8``."""
        return f"int{self.bits} g{self.group_size} {'sym' if self.sym else 'asym'}" + (
            " s8" if self.scale_bits == 8 else "") + (" zint" if self.zero_int and not self.sym else "")


@dataclass
class GroupQuant:
    """One quantised matrix: codes [rows, cols] uint8 and its scales / offsets [rows, groups].

    ``scale_bits`` 16: scales / offsets are f16 (raw uint16). ``scale_bits`` 8: scales are uint8 codes
    (int8 when symmetric), offsets int8 codes, and ``steps`` [rows, 2] f16 (raw uint16) holds each row's
    scale step and offset step: scale = step * code."""

    q: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    bits: int
    group_size: int
    sq_err: float | None = None  # sum of squared dequantisation errors, when the quantiser measured it
    steps: np.ndarray | None = None

    @property
    def sym(self) -> bool:
        return self.offsets is None

    @property
    def scale_bits(self) -> int:
        return 16 if self.steps is None else 8

    def rows(self, r0: int, r1: int) -> "GroupQuant":
        """Rows [r0, r1) as their own GroupQuant."""
        return GroupQuant(self.q[r0:r1], self.scales[r0:r1], None if self.offsets is None else self.offsets[r0:r1],
                          self.bits, self.group_size, None, None if self.steps is None else self.steps[r0:r1])


def is_int4_dir(d: Path) -> bool:
    """True for a folder written by ``write_int4``."""
    return (Path(d) / FILENAME).is_file()


def row_bytes(cols: int, bits: int) -> int:
    """Stored bytes of one row of ``cols`` b-bit codes: ceil(cols * bits / 8)."""
    return -(-cols * bits // 8)


_SHIFTS = {b: (np.arange(8, dtype=np.uint64) * np.uint64(b)) for b in range(1, 9)}


def pack(q: np.ndarray, bits: int, use_c: bool = True) -> np.ndarray:
    """Codes [rows, cols] -> stored bytes [rows, row_bytes(cols, bits)].

    Every 8 consecutive codes of a row fill ``bits`` bytes, little-endian: code ``k`` of the eight occupies
    bits ``k*bits .. k*bits + bits - 1`` (so 4-bit codes go two per byte, even column in the low nibble, and
    8-bit codes one per byte). A row whose length is not a multiple of 8 is padded with zero codes and the
    trailing all-padding bytes are dropped."""
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    if bits == 4:
        if cols % 2:
            q = np.concatenate([q, np.zeros((rows, 1), np.uint8)], axis=1)
        return q[:, 0::2] | (q[:, 1::2] << 4)
    if use_c and (out := codec.pack_bits(q, bits)) is not None:
        return out
    n8 = -(-cols // 8)
    c = np.zeros((rows, n8 * 8), np.uint64)
    c[:, :cols] = q
    v = (c.reshape(rows, n8, 8) << _SHIFTS[bits]).sum(axis=2, dtype=np.uint64)
    out = v.astype("<u8").view(np.uint8).reshape(rows, n8, 8)[:, :, :bits].reshape(rows, n8 * bits)
    return np.ascontiguousarray(out[:, :row_bytes(cols, bits)])


def unpack(b: np.ndarray, bits: int, cols: int, use_c: bool = True) -> np.ndarray:
    """Stored bytes [rows, row_bytes(cols, bits)] -> codes [rows, cols] uint8 (the inverse of ``pack``)."""
    rows = b.shape[0]
    if bits == 8:
        return b[:, :cols]
    if bits == 4:
        out = np.empty((rows, b.shape[1] * 2), np.uint8)
        out[:, 0::2] = b & 0x0F
        out[:, 1::2] = b >> 4
        return out[:, :cols]
    if use_c and (out := codec.unpack_bits(b, bits, cols)) is not None:
        return out
    n8 = -(-cols // 8)
    full = np.zeros((rows, n8, 8), np.uint8)
    padded = np.zeros((rows, n8 * bits), np.uint8)
    padded[:, :b.shape[1]] = b
    full[:, :, :bits] = padded.reshape(rows, n8, bits)
    v = full.view("<u8").reshape(rows, n8, 1)
    codes = (v >> _SHIFTS[bits]) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(rows, n8 * 8)[:, :cols]


def unpack_v1(b: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Codes from a version-1 file: 4-bit codes as ``pack``, other widths one code per byte."""
    return unpack(b, bits, cols) if bits == 4 else b[:, :cols]


def group_values(scales: np.ndarray, offsets: np.ndarray | None, steps: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 scales and offsets [rows, groups] from their stored form.

    ``steps`` None: scales / offsets are f16 (raw uint16). Otherwise they are 8-bit codes (scales uint8, or
    int8 when symmetric; offsets int8) and ``steps`` [rows, 2] (f16, raw uint16) holds each row's scale step
    and offset step: scale = step * code (a float32 product). ``offsets`` of dtype uint8 are integer zero
    points ``z`` (layout version 3, either scale form): the offset is ``z * -scale``, exact in float32."""
    if steps is None:
        s = scales.view(np.float16).astype(np.float32)
    else:
        s = scales.astype(np.float32) * steps.view(np.float16).astype(np.float32)[:, :1]
    if offsets is None:
        return s, None
    if offsets.dtype == np.uint8:
        return s, offsets.astype(np.float32) * -s
    if steps is None:
        return s, offsets.view(np.float16).astype(np.float32)
    return s, offsets.astype(np.float32) * steps.view(np.float16).astype(np.float32)[:, 1:2]


def dequant_rows(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, bits: int, group: int,
                 steps: np.ndarray | None = None) -> np.ndarray:
    """float32 rows from codes and their group scales / offsets (stored form, see ``group_values``): a few
    vectorised numpy ops."""
    rows, cols = codes.shape
    ng = scales.shape[1]
    pad = ng * group - cols
    c = codes if pad == 0 else np.concatenate([codes, np.zeros((rows, pad), np.uint8)], axis=1)
    c = c.reshape(rows, ng, group).astype(np.float32)
    s, m = group_values(scales, offsets, steps)
    if m is None:
        out = (c - np.float32(1 << (bits - 1))) * s[:, :, None]
    else:
        out = c * s[:, :, None] + m[:, :, None]
    return out.reshape(rows, ng * group)[:, :cols]


def tensor_choices(version: str, quantization: dict[str, Any], per_tensor: dict[str, Any], name: str
                   ) -> tuple[int, int, bool, int, bool]:
    """(bits, group_size, symmetric, scale_bits, integer zeros) of matrix ``name`` from the header's
    ``quantization`` and ``tensors`` entries; version-1 files have only per-tensor bits (the rest is global,
    scales f16); integer zeros (``"zero_point": "int"``, asymmetric, ``W.zeros``) are version 3's."""
    info = per_tensor.get(name, {})
    src = quantization if version == "1" else info
    bits, group, scheme = info.get("bits", quantization.get("bits", 4)), src["group_size"], src["scheme"]
    scale_bits = 16 if version == "1" else info.get("scale_bits", 16)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group, scale_bits)) or \
            scheme not in ("sym", "asym"):
        raise ValueError(f"bits {bits!r}, group_size {group!r}, scale_bits {scale_bits!r} must be integers and "
                         f"scheme {scheme!r} 'sym' or 'asym'")
    zp = info.get("zero_point", "float") if version not in ("1", "2") else "float"
    if zp not in ("float", "int") or (zp == "int" and scheme == "sym"):
        raise ValueError(f"zero_point {zp!r} must be 'float' or 'int' (asymmetric matrices only)")
    return bits, group, scheme == "sym", scale_bits, zp == "int"


def offsets_part(s8: bool, zint: bool) -> tuple[str, str, type]:
    """(part suffix, safetensors dtype, numpy dtype) of an asymmetric matrix's offsets: integer zeros
    ``zeros`` U8 (bit-packed, see ``offsets_shape``), 8-bit offset codes ``offsets`` I8, or f16 ``offsets``."""
    return ("zeros", "U8", np.uint8) if zint else ("offsets", "I8", np.int8) if s8 else ("offsets", "F16", np.uint16)


def offsets_shape(rows: int, groups: int, bits: int, zint: bool) -> tuple[int, int]:
    """Stored shape of the offsets part: [rows, groups], or for integer zeros their ``bits``-wide codes packed
    per row as ``pack`` packs codes: [rows, row_bytes(groups, bits)]."""
    return (rows, row_bytes(groups, bits)) if zint else (rows, groups)


Quantiser = Callable[[np.ndarray, QuantSpec, ThreadPoolExecutor], GroupQuant]
