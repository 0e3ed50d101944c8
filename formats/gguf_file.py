"""A fast GGUF header parser (metadata + tensor table); tensor data stays on disk.

The ``gguf`` package's GGUFReader builds numpy views for every metadata item, which takes tens of
seconds on a 150k-token vocabulary; this reads the same header in well under a second, using the
``gguf`` package's constants for value and tensor types. Errors name the file and the fix.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as GQ
from gguf import GGUFValueType as VT
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

from formats.errors import QConvertError

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d", VT.BOOL: "<?"}
_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
       VT.FLOAT32: "<f4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8", VT.BOOL: "?"}


@dataclass
class GGUFTensorInfo:
    """One entry of the tensor table; ``shape`` in numpy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type: str
    offset: int  # absolute file offset of the data
    nbytes: int


class _Buf:
    def __init__(self, data: bytes, path: str):
        self.d, self.p, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise EOFError
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.p + size > len(self.d):
            raise EOFError
        v = struct.unpack_from(fmt, self.d, self.p)[0]
        self.p += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.take(n).decode("utf-8", errors="replace")


def _value(b: _Buf, vt: int) -> Any:
    vt = VT(vt)
    if vt == VT.STRING:
        return b.string()
    if vt == VT.ARRAY:
        sub = VT(b.unpack("<I"))
        n = b.unpack("<Q")
        if sub == VT.STRING:
            out = []
            d, p = b.d, b.p
            for _ in range(n):
                (ln,) = struct.unpack_from("<Q", d, p)
                p += 8
                out.append(d[p:p + ln].decode("utf-8", errors="replace"))
                p += ln
            if p > len(d):
                raise EOFError
            b.p = p
            return out
        if sub == VT.ARRAY:
            return [_value(b, VT.ARRAY) for _ in range(n)]
        dt = np.dtype(_NP[sub])
        arr = np.frombuffer(b.take(n * dt.itemsize), dtype=dt)
        return arr.tolist()
    return b.unpack(_SCALAR[vt])


def read_header(path: str | Path, max_header: int = 1 << 30) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse a GGUF file's metadata and tensor table. Raises QConvertError for truncated/corrupt files."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(min(size, 64 << 20))
            b = _Buf(head, path)
            while True:
                try:
                    return _parse(b, size, path)
                except EOFError:
                    if len(b.d) >= size or len(b.d) >= max_header:
                        raise
                    b = _Buf(b.d + f.read(min(size, len(b.d) * 4) - len(b.d)), path)
    except OSError as e:
        raise QConvertError(f"{path}: cannot read ({e.strerror or e})") from None
    except EOFError:
        raise QConvertError(f"{path}: GGUF header is truncated; the file is incomplete, download or convert it again") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise QConvertError(f"{path}: corrupt GGUF header ({e}); the file is damaged, download or convert it again") from None


def _parse(b: _Buf, size: int, path: str) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    b.p = 0
    if len(b.d) < 4 or struct.unpack_from("<I", b.d, 0)[0] != GGUF_MAGIC:
        raise QConvertError(f"{path}: not a GGUF file (bad magic); pass a .gguf file")
    b.p = 4
    version = b.unpack("<I")
    if version not in (2, 3):
        raise QConvertError(f"{path}: unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors, n_kv = b.unpack("<Q"), b.unpack("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ValueError("implausible tensor/metadata counts")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = b.string()
        kv[key] = _value(b, b.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = b.string()
        nd = b.unpack("<I")
        dims = [b.unpack("<Q") for _ in range(nd)]
        t = GQ(b.unpack("<I")).name
        off = b.unpack("<Q")
        shape = tuple(reversed(dims))
        block, tsize = GGML_QUANT_SIZES[GQ[t]]
        n = int(np.prod(shape)) if shape else 1
        infos.append(GGUFTensorInfo(name, shape, t, off, n // block * tsize))
    align = int(kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = (b.p + align - 1) // align * align
    for ti in infos:
        ti.offset += data_start
        if ti.offset + ti.nbytes > size:
            raise QConvertError(f"{path}: tensor {ti.name} ends at byte {ti.offset + ti.nbytes} but the file has "
                                f"{size} bytes; the file is truncated, download or convert it again")
    return kv, infos
