"""A fast, validating GGUF header parser (metadata + tensor table); tensor data stays on disk.

The ``gguf`` package's GGUFReader builds numpy views for every metadata item, which takes tens of
seconds on a 150k-token vocabulary; this reads the same header in well under a second. Every field is
checked before it is used (docs/security.md): counts and lengths are bounded by the bytes left in the
file (CVE-2024-25664..25668, CVE-2024-23605 / -21802: wrapping n_kv / n_tensors / string / array
lengths), value and tensor types must be known, keys and tensor names unique, ``general.alignment`` a
non-zero power of two stored as UINT32, n_dims 1-4 with every dimension in int64 range and their product
checked (CVE-2025-53630 / CVE-2026-27940: size sums that wrap; Python integers never wrap), rows whole
blocks, offsets aligned, in order, non-overlapping and inside the file. Known metadata keys must have
the value type llama.cpp expects. Each failure is one QConvertError naming the file, the field and its
byte offset.
"""
from __future__ import annotations

import mmap
import os
import re
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
           VT.FLOAT32: "<f", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d", VT.BOOL: "<B"}
_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
       VT.FLOAT32: "<f4", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8", VT.BOOL: "<u1"}
MAX_DIMS = 4                # GGML_MAX_DIMS
MAX_NAME = 63               # GGML_MAX_NAME - 1 (the C string's terminator)
MAX_ELEMENTS = 1 << 23      # array values in all the metadata: bounds the Python objects a header can make
MAX_STRING = 64 << 20       # one string (the largest real ones: a tokenizer.json of ~10 MB stored as a string)
MAX_TEXT = 128 << 20        # all strings of a header together
_INT64_MAX = (1 << 63) - 1
_INTS = {VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64}
_FLOATS = {VT.FLOAT32, VT.FLOAT64}
# value types of the metadata keys qconvert reads (llama.cpp refuses the same keys with other types)
_KEY_TYPES: list[tuple[re.Pattern, str]] = [(re.compile(p), t) for p, t in [
    (r"general\.alignment", "u32"),
    (r"general\.(architecture|name|type|file_type_name)|tokenizer\.(ggml\.(model|pre)|chat_template)"
     r"|[a-z0-9_]+\.rope\.scaling\.type", "str"),
    (r"split\.(no|count|tensors\.count)|general\.(file_type|quantization_version)|tokenizer\.ggml\."
     r"(bos|eos|padding|unknown|eot|sep|mask)_token_id|[a-z0-9_]+\.(context_length|embedding_length|block_count|"
     r"feed_forward_length|vocab_size|attention\.head_count(_kv)?|expert_(count|used_count|feed_forward_length|"
     r"shared_feed_forward_length)|rope\.scaling\.original_context_length|dual_chunk_attention\.[a-z_]+|"
     r"hf\.(sliding_window|max_window_layers))", "int"),
    (r"[a-z0-9_]+\.(rope\.freq_base|attention\.layer_norm_rms_epsilon|rope\.scaling\.(factor|attn_factor|yarn_beta_"
     r"(fast|slow))|hf\.rope_scaling\.(attention_factor|mscale|mscale_all_dim))", "float"),
    (r"tokenizer\.ggml\.add_(bos|eos)_token|[a-z0-9_]+\.(expert_weights_norm|hf\.use_sliding_window|hf\.rope_scaling"
     r"\.truncate)", "bool"),
    (r"tokenizer\.ggml\.(tokens|merges)", "str[]"),
    (r"tokenizer\.ggml\.token_type", "int[]"),
    (r"tokenizer\.ggml\.scores", "float[]"),
]]
_TYPE_OK = {"u32": lambda t, s: t == VT.UINT32, "str": lambda t, s: t == VT.STRING,
            "int": lambda t, s: t in _INTS, "float": lambda t, s: t in _FLOATS, "bool": lambda t, s: t == VT.BOOL,
            "str[]": lambda t, s: t == VT.ARRAY and s == VT.STRING, "int[]": lambda t, s: t == VT.ARRAY and s in _INTS,
            "float[]": lambda t, s: t == VT.ARRAY and s in _FLOATS}


@dataclass
class GGUFTensorInfo:
    """One entry of the tensor table; ``shape`` in numpy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type: str
    offset: int  # absolute file offset of the data
    nbytes: int


class _Bad(Exception):
    """A validation failure inside the parser: (field, byte offset, problem)."""

    def __init__(self, field: str, at: int, problem: str):
        super().__init__(field, at, problem)
        self.field, self.at, self.problem = field, at, problem


class _Buf:
    """A cursor over the mapped file; every read is bounds-checked first."""

    def __init__(self, data: Any, size: int):
        self.d, self.p, self.size = data, 0, size
        self.elements = 0  # array values read so far (each becomes a Python object)
        self.text = 0  # string bytes read so far

    def need(self, n: int, field: str) -> None:
        if n < 0 or n > self.size - self.p:
            raise _Bad(field, self.p, f"needs {n} bytes but only {self.size - self.p} are left in the file "
                                      "(truncated or a lying length)")

    def unpack(self, fmt: str, field: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, field)
        v = struct.unpack_from(fmt, self.d, self.p)[0]
        self.p += n
        return v

    def string(self, field: str, strict: bool = False) -> str:
        at = self.p
        n = self.unpack("<Q", field + " length")
        self.need(n, field)
        self.text += n
        if n > MAX_STRING or self.text > MAX_TEXT:
            raise _Bad(field, at, f"a string of {n} bytes: over {MAX_STRING >> 20} MiB, or over {MAX_TEXT >> 20} MiB "
                       "of strings in all; no real GGUF header holds that much text")
        raw = bytes(self.d[self.p:self.p + n])
        self.p += n
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise _Bad(field, at, "is not valid UTF-8") from None


def _value(b: _Buf, vt: int, field: str) -> tuple[Any, int]:
    """Read one value of type ``vt``; returns (value, array element type or -1)."""
    if vt == VT.STRING:
        return b.string(field), -1
    if vt != VT.ARRAY:
        v = b.unpack(_SCALAR[VT(vt)], field)
        return (bool(v) if vt == VT.BOOL else v), -1
    at = b.p
    sub = b.unpack("<I", field + " element type")
    if sub not in _SCALAR and sub != VT.STRING:
        raise _Bad(field, at, f"array element type {sub} is not a GGUF value type"
                   + (" (nested arrays are not supported, as in llama.cpp)" if sub == VT.ARRAY else ""))
    n = b.unpack("<Q", field + " array length")
    b.elements += n
    if b.elements > MAX_ELEMENTS:
        raise _Bad(field, at + 4, f"array of {n} values: the metadata would hold over {MAX_ELEMENTS} values in all "
                   "(real vocabularies have under 300k tokens)")
    if sub == VT.STRING:
        b.need(8 * n, field + f" array of {n} strings")  # each string has at least its 8-byte length
        return [b.string(f"{field}[{i}]") for i in range(n)], sub
    dt = np.dtype(_NP[VT(sub)])
    b.need(n * dt.itemsize, field + f" array of {n} values")
    arr = np.frombuffer(b.d, dtype=dt, count=n, offset=b.p)
    b.p += n * dt.itemsize
    out = arr.tolist()
    return ([bool(x) for x in out] if sub == VT.BOOL else out), sub


def read_header(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    """Parse and validate a GGUF file's metadata and tensor table; QConvertError (one line naming the file,
    the field and its byte offset) for anything truncated, corrupt or out of range."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise QConvertError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes at least); the "
                                    "file is truncated or not a GGUF, download or convert it again")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                try:
                    return _parse(_Buf(mm, size), path)
                except _Bad as e:
                    raise QConvertError(f"{path}: {e.field} at byte {e.at}: {e.problem}; the file is damaged or "
                                        "not a valid GGUF, download or convert it again") from None
    except OSError as e:
        raise QConvertError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(b: _Buf, path: str) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    if struct.unpack_from("<I", b.d, 0)[0] != GGUF_MAGIC:
        raise QConvertError(f"{path}: not a GGUF file (bad magic); pass a .gguf file")
    b.p = 4
    version = b.unpack("<I", "version")
    if version not in (2, 3):
        hint = " (a big-endian GGUF: convert it on a little-endian machine)" if version in (2 << 24, 3 << 24) else ""
        raise QConvertError(f"{path}: unsupported GGUF version {version}{hint}; versions 2 and 3 are supported")
    at = b.p
    n_tensors, n_kv = b.unpack("<Q", "tensor count"), b.unpack("<Q", "metadata count")
    left = b.size - b.p
    if n_kv * 13 > left:  # key length 8 + type 4 + at least 1 byte of value
        raise _Bad("metadata count", at + 8, f"{n_kv} entries cannot fit in the {left} bytes left")
    if n_tensors * 32 > left:  # name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8
        raise _Bad("tensor count", at, f"{n_tensors} tensors cannot fit in the {left} bytes left")
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        at = b.p
        key = b.string(f"metadata key {i}", strict=True)
        if not key:
            raise _Bad(f"metadata key {i}", at, "is empty")
        if key in kv:
            raise _Bad(f"metadata key {key!r}", at, "appears twice")
        tat = b.p
        vt = b.unpack("<I", f"type of {key!r}")
        if vt not in _SCALAR and vt not in (VT.STRING, VT.ARRAY):
            raise _Bad(f"type of {key!r}", tat, f"{vt} is not a GGUF value type (0-12)")
        kv[key], sub = _value(b, vt, f"value of {key!r}")
        _check_key_type(key, vt, sub, tat)
    align = kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if align <= 0 or align & (align - 1):
        raise _Bad("general.alignment", 0, f"{align} is not a non-zero power of two")
    infos, names = [], set()
    for i in range(n_tensors):
        at = b.p
        name = b.string(f"tensor {i} name", strict=True)
        if not name or len(name.encode()) > MAX_NAME or name in names:
            why = "is empty" if not name else "appears twice" if name in names else f"is longer than {MAX_NAME} bytes"
            raise _Bad(f"tensor {i} name {name[:80]!r}", at, why)
        names.add(name)
        infos.append(_tensor_info(b, name))
    data_start = -(-b.p // align) * align
    end = 0
    for ti in infos:
        rel = ti.offset
        if rel % align:
            raise _Bad(f"tensor {ti.name!r} offset", data_start, f"{rel} is not a multiple of the alignment {align}")
        if rel < end:
            raise _Bad(f"tensor {ti.name!r} offset", data_start, f"{rel} overlaps the previous tensor (ends at {end}); "
                       "tensors must be in file order without overlap")
        end = rel + ti.nbytes
        ti.offset = data_start + rel
        if ti.offset + ti.nbytes > b.size:
            raise QConvertError(f"{path}: tensor {ti.name} ends at byte {ti.offset + ti.nbytes} but the file has "
                                f"{b.size} bytes; the file is truncated, download or convert it again")
    return kv, infos


def _check_key_type(key: str, vt: int, sub: int, at: int) -> None:
    for pat, want in _KEY_TYPES:
        if pat.fullmatch(key):
            if not _TYPE_OK[want](vt, sub):
                got = VT(vt).name + (f"[{VT(sub).name}]" if vt == VT.ARRAY else "")
                raise _Bad(f"type of {key!r}", at, f"is {got}, llama.cpp expects {want}")
            return


def _tensor_info(b: _Buf, name: str) -> GGUFTensorInfo:
    at = b.p
    nd = b.unpack("<I", f"tensor {name!r} n_dims")
    if not 1 <= nd <= MAX_DIMS:
        raise _Bad(f"tensor {name!r} n_dims", at, f"{nd} is not in 1..{MAX_DIMS}")
    dims, n = [], 1
    for k in range(nd):
        dat = b.p
        d = b.unpack("<Q", f"tensor {name!r} dimension {k}")
        if d > _INT64_MAX:
            raise _Bad(f"tensor {name!r} dimension {k}", dat, f"{d} is negative as int64")
        n *= d
        if n > _INT64_MAX:
            raise _Bad(f"tensor {name!r} dimension {k}", dat, "the element count overflows int64")
        dims.append(d)
    tat = b.p
    t = b.unpack("<I", f"tensor {name!r} type")
    try:
        gq = GQ(t)
        block, tsize = GGML_QUANT_SIZES[gq]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {name!r} type", tat, f"{t} is not a known GGML type") from None
    if dims[0] % block:
        raise _Bad(f"tensor {name!r} type", tat, f"rows of {dims[0]} values are not whole {gq.name} blocks of {block}")
    nbytes = n // block * tsize
    if nbytes > _INT64_MAX:
        raise _Bad(f"tensor {name!r} size", tat, "the byte count overflows int64")
    off = b.unpack("<Q", f"tensor {name!r} offset")
    return GGUFTensorInfo(name, tuple(reversed(dims)), gq.name, off, nbytes)
