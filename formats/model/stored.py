"""Stored matrices as the readers hand them out: descriptions of bytes, no maths.

``PackedMatrix`` is one weight matrix W [rows, cols] in the bytes it is stored in (numpy arrays that may be
read-only views of a memory-mapped file; never copied): F32, F16, BF16, the GGML block types of ``KERNEL_TYPES``
(Q4_0 .. Q6_K, the i-quants, TQ1_0 / TQ2_0, MXFP4) or integer codes of 2-8 bits in groups (formats/int4/layout.py:
f16 scales or 8-bit scale codes on per-row steps, symmetric or not, float offsets or integer zeros). Products and
dequantisation over it are the decoder's (qconvert/decoder/products.py).

``CodeMatrix`` is a quantised matrix whose integer codes can be read a row range at a time (an int4 folder's,
a GPTQ / AWQ / compressed-tensors checkpoint's), so writers can repack them into GGML blocks or export them
(formats/int4/to_gguf.py, formats/hf/quantized_write.py).
"""
from __future__ import annotations

import numpy as np

from formats.ggml.dtypes import row_nbytes

KERNEL_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0",
                "TQ2_0", "MXFP4")
"""The GGML storage types a ``PackedMatrix`` describes (the decoder's C kernels run each of them: the i-quants,
ternary and MXFP4 types through formats/ggml/iq_blocks.h)."""
UNALIGNED_TYPES = ("MXFP4",)
"""Block types without an f16 field to align (17-byte blocks: a row may sit at an odd address)."""


class CodeMatrix:
    """A quantised matrix whose integer codes may be repacked into GGML blocks. Subclasses give ``sym``,
    ``read(start, stop)`` (packed codes, f16 scales, f16 offsets or None, as formats/int4/layout.py stores them) and
    may say ``rounded`` (scales / offsets rounded to f16 on the way) or a ``map_reason`` (never mappable)."""

    ROUNDING = "scales / offsets rounded to f16"  # what ``rounded`` means, for the summary line

    def __init__(self, name: str, rows: int, cols: int, bits: int, group_size: int):
        self.name, self.rows, self.cols, self.bits, self.group_size = name, rows, cols, bits, group_size

    @property
    def sym(self) -> bool:
        raise NotImplementedError

    @property
    def rounded(self) -> bool:
        """True when the f16 block scales / offsets round the stored values."""
        return False

    def map_reason(self) -> str | None:
        """Why the codes cannot be repacked whatever the type (None: they can)."""
        return None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        raise NotImplementedError


def _rows_view(a: np.ndarray) -> np.ndarray:
    """A 2-D array whose rows are contiguous (any row stride), without copying when it already is one."""
    return a if a.ndim == 2 and a.strides[1] == a.itemsize else np.ascontiguousarray(a).reshape(a.shape[0], -1)


def _aligned(a: np.ndarray) -> np.ndarray:
    """C-contiguous and aligned to its item size (the C kernels load uint16 scales directly): a copy only when
    the stored bytes sit at an odd address (an f16 tensor after an odd-sized one in a safetensors file)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.aligned else a.copy()


class PackedMatrix:
    """W [rows, cols] in its stored bytes. Build with ``PackedMatrix.ggml`` or ``PackedMatrix.int_codes``."""

    def __init__(self, rows: int, cols: int, stype: str, ggml_type: str | None, data: np.ndarray | None = None,
                 qweight: np.ndarray | None = None, scales: np.ndarray | None = None,
                 offsets: np.ndarray | None = None, steps: np.ndarray | None = None, bits: int = 0,
                 group: int = 0, version: int = 2):
        self.rows, self.cols, self.stype = int(rows), int(cols), stype
        self.ggml_type = ggml_type
        self.data, self.qweight, self.scales, self.offsets, self.steps = data, qweight, scales, offsets, steps
        self.bits, self.group, self.version = int(bits), int(group), int(version)
        self.col_perm: np.ndarray | None = None  # stored column j is column col_perm[j] (act-order checkpoints)

    # ---- constructors ----
    @classmethod
    def ggml(cls, stype: str, data: np.ndarray, cols: int) -> "PackedMatrix":
        """A matrix of type ``stype`` (F32, F16, BF16 or a ``gguf.GGMLQuantizationType`` block name) whose
        bytes are ``data`` (uint8 [rows, row_bytes], or any array holding those bytes row by row)."""
        if stype not in KERNEL_TYPES:
            raise ValueError(f"storage type {stype} is not supported (known: {', '.join(KERNEL_TYPES)})")
        rb = row_nbytes(stype, int(cols))
        d = data if data.ndim >= 1 and data.strides[-1] == data.itemsize else np.ascontiguousarray(data)
        d = d.view(np.uint8)
        if d.ndim != 2 or d.shape[1] != rb:
            if d.size % rb:
                raise ValueError(f"{d.size} bytes are not whole rows of {cols} {stype} values ({rb} bytes)")
            d = d.reshape(-1, rb)
        d = _rows_view(d)
        item = 1 if stype in UNALIGNED_TYPES else {"F32": 4, "F16": 2, "BF16": 2}.get(stype, 2)  # f16 scales
        if d.ctypes.data % item or d.strides[0] % item:  # e.g. F16 after an odd-sized U8 tensor in safetensors
            d = d.copy()
        return cls(d.shape[0], cols, stype, stype, data=d)

    @classmethod
    def int_codes(cls, qweight: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
                  steps: np.ndarray | None, bits: int, group: int, cols: int, version: int = 2,
                  zeros: bool = False) -> "PackedMatrix":
        """formats/int4/layout.py codes: ``qweight`` uint8 [rows, ceil(cols * bits / 8)] (version 1, bits != 4:
        [rows, cols], one code per byte); ``scales`` / ``offsets`` [rows, ceil(cols / group)] as stored (f16 as
        uint16 when ``steps`` is None; else uint8 scales when asymmetric, int8 when symmetric, int8 offsets);
        ``steps`` [rows, 2] f16 as uint16 or None; ``offsets`` None = symmetric. ``zeros``: ``offsets`` are
        integer zero points z (layout version 3, ``W.zeros``), ``bits`` wide and bit-packed per row as the codes
        ([rows, ceil(groups * bits / 8)] uint8), the offset being ``z * -scale``; uint8 offsets are how every
        reader here tells zeros from offsets."""
        if not 2 <= bits <= 8 or group < 1:
            raise ValueError(f"int codes of {bits} bits in groups of {group} are not supported")
        q = _rows_view(np.asarray(qweight).view(np.uint8))
        ng = -(-cols // group)
        one_per_byte = version == 1 and bits != 4
        need = cols if one_per_byte else -(-cols * bits // 8)
        s8 = steps is not None
        sc_dt = (np.uint8 if offsets is not None else np.int8) if s8 else np.uint16
        sc = _aligned(np.asarray(scales).view(sc_dt).reshape(q.shape[0], ng))
        of = None if offsets is None else _aligned(
            np.asarray(offsets).view(np.uint8 if zeros else np.int8 if s8 else np.uint16).reshape(
                q.shape[0], -(-ng * bits // 8) if zeros else ng))
        st = None if steps is None else _aligned(np.asarray(steps).view(np.uint16).reshape(q.shape[0], 2))
        if q.shape[1] < need:
            raise ValueError(f"qweight rows have {q.shape[1]} bytes; {cols} codes of {bits} bits need {need}")
        label = f"int{bits} g{group} {'asym' if of is not None else 'sym'}" + (" s8" if s8 else "") + \
            (" zint" if zeros and of is not None else "")
        return cls(q.shape[0], cols, label, None, qweight=q, scales=sc, offsets=of, steps=st, bits=bits,
                   group=group, version=version)

    # ---- properties ----
    @property
    def is_int(self) -> bool:
        """True for int codes (formats/int4/layout.py), False for F32 / F16 / BF16 / GGML blocks."""
        return self.ggml_type is None

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The stored arrays (e.g. to release a mapped matrix's pages)."""
        if not self.is_int:
            return (self.data,)
        return tuple(a for a in (self.qweight, self.scales, self.offsets, self.steps) if a is not None)

    @property
    def flags(self) -> int:
        """The C kernels' ``flags``: 1 = version-1 codes one per byte, 2 = uint8 integer zeros as offsets."""
        return int(self.version == 1 and self.bits != 4) | (2 if self.offsets is not None and
                                                            self.offsets.dtype == np.uint8 else 0)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the matrix (codes, scales, offsets and steps for int codes)."""
        return int(sum(a.nbytes for a in self.arrays()))

    def __repr__(self) -> str:
        return f"PackedMatrix({self.rows}x{self.cols} {self.stype}, {self.nbytes} bytes)"

    def permuted(self, col_perm: np.ndarray) -> "PackedMatrix":
        """This matrix with its stored columns declared to be columns ``col_perm`` of W (codes whose groups are
        runs of columns only in some order, as GPTQ act-order's): products permute x, dequant un-permutes."""
        self.col_perm = np.asarray(col_perm, dtype=np.int64)
        return self

    def subset(self, idx: np.ndarray) -> "PackedMatrix":
        """The rows ``idx`` as their own (small, copied) PackedMatrix."""
        if not self.is_int:
            sub = PackedMatrix(len(idx), self.cols, self.stype, self.ggml_type, data=self.data[idx])
        else:
            pick = (lambda a: None if a is None else a[idx])
            sub = PackedMatrix(len(idx), self.cols, self.stype, None, qweight=self.qweight[idx],
                               scales=pick(self.scales), offsets=pick(self.offsets), steps=pick(self.steps),
                               bits=self.bits, group=self.group, version=self.version)
        sub.col_perm = self.col_perm
        return sub
