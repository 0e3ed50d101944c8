"""Streaming safetensors I/O without torch: header parsing, row-range reads, streaming writes.

Conversions read with ``os.pread`` (no mmap), so only the rows being converted are ever in memory; the
decoders map the file instead (``LazyTensor.packed``, formats/files/mapped.py). Writes lay out
the header from a plan (name, dtype, shape) first, then append each tensor's bytes as they arrive.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from formats.errors import QConvertError
from formats.files.mapped import MappedFile, pread_exact
from formats.model.tensor import LazyTensor

ST_TYPES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}  # U8 / I8: int4 codes and scale codes
# (formats/int4/layout.py); I32 / I64: packed GPTQ / AWQ / compressed-tensors integers (formats/hf_quant*.py)


MAX_HEADER = 100_000_000  # the safetensors library's own limit
ALL_TYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # what the format defines


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return d


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (header dict, data start offset) of a .safetensors file after validating it as the safetensors
    library does: header length <= 100 MB and inside the file, a UTF-8 JSON object without duplicate keys,
    known dtypes, shape x itemsize == span, spans contiguous from 0 to the end of the file (no holes, overlaps
    or trailing bytes), ``__metadata__`` string -> string. QConvertError names the file, field and offset."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"the file has {len(raw)} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or n > size - 8:
                raise ValueError(f"header length {n} (byte 0) exceeds {'the file' if n > size - 8 else '100 MB'}")
            text = f.read(n)
        if not text.startswith(b"{"):
            raise ValueError("the header (byte 8) is not a JSON object")
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("the header (byte 8) is not a JSON object")
        _check_entries(header, size - 8 - n)
    except OSError as e:
        raise QConvertError(f"{path}: cannot read ({e.strerror or e})") from None
    except RecursionError:
        raise QConvertError(f"{path}: broken safetensors header (JSON nested too deeply); re-download or re-save "
                            "the checkpoint") from None
    except (ValueError, KeyError, TypeError) as e:
        raise QConvertError(f"{path}: broken safetensors header ({e}); re-download or re-save the checkpoint") from None
    return header, 8 + n


def _check_entries(header: dict[str, Any], data_len: int) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ must map strings to strings")
    spans = []
    for name, m in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(m, dict) or set(m) - {"dtype", "shape", "data_offsets"} or len(m) != 3:
            raise ValueError(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
        dt, shape, offs = m["dtype"], m["shape"], m["data_offsets"]
        if not isinstance(dt, str) or dt not in ALL_TYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dt!r}")
        ints = (lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in xs))
        if not ints(shape) or len(shape) > 8:
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of at most 8 non-negative integers")
        if not ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
            raise ValueError(f"tensor {name!r}: data_offsets {offs!r} are not [begin, end] with begin <= end")
        numel = 1
        for x in shape:
            numel *= x
        if numel * ALL_TYPES[dt] != offs[1] - offs[0]:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dt} needs {numel * ALL_TYPES[dt]} bytes, "
                             f"data_offsets span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            raise ValueError(f"tensor {name!r}: data starts at {b}, expected {end} "
                             f"({'a hole' if b > end else 'overlapping the previous tensor'})")
        end = e
    if end != data_len:
        raise ValueError(f"the tensors cover {end} data bytes but the file has {data_len} "
                         f"({'truncated' if end > data_len else 'trailing bytes'})")


class SafetensorsFile:
    """One .safetensors file opened for row-range reads."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.data_start = read_header(path)
        self.fd = os.open(path, os.O_RDONLY)
        self._map: MappedFile | None = None

    def mapped(self) -> MappedFile:
        """The file mapped read-only (made on first use)."""
        if self._map is None:
            self._map = MappedFile(str(self.path))
        return self._map

    def close(self) -> None:
        """Close the file descriptor and the mapping."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._map is not None:
            self._map.close()
            self._map = None

    def names(self) -> list[str]:
        """Tensor names in file order."""
        items = [(m["data_offsets"][0], k) for k, m in self.header.items() if k != "__metadata__"]
        return [k for _, k in sorted(items)]

    def tensor(self, name: str, canonical: str | None = None) -> LazyTensor:
        """A lazy view of tensor ``name``."""
        meta = self.header[name]
        dt = meta["dtype"]
        if dt not in ST_TYPES:
            raise QConvertError(f"{self.path}: tensor {name} has dtype {dt}; only F32/F16/BF16 checkpoints are supported")
        if dt in ("U8", "I8", "I32", "I64") and canonical is None:
            raise QConvertError(f"{self.path}: tensor {name} is {dt}; only F32/F16/BF16 checkpoints are supported")
        shape = tuple(int(x) for x in meta["shape"]) or (1,)
        begin = self.data_start + meta["data_offsets"][0]
        row_bytes = ST_TYPES[dt] * shape[-1]
        if int(np.prod(shape)) * ST_TYPES[dt] != meta["data_offsets"][1] - meta["data_offsets"][0]:
            raise QConvertError(f"{self.path}: tensor {name} size does not match its shape; the file is corrupt")

        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1

        def reader(start: int, stop: int) -> np.ndarray:
            return pread_exact(self.fd, (stop - start) * row_bytes, begin + start * row_bytes, str(self.path),
                               f"tensor {name}")

        def mapper() -> np.ndarray:
            return self.mapped().view(begin, n_rows * row_bytes).reshape(n_rows, row_bytes)

        return LazyTensor(canonical or name, shape, dt, reader,
                          stored_nbytes=meta["data_offsets"][1] - meta["data_offsets"][0], mapper=mapper)


class SafetensorsWriter:
    """Write one .safetensors file: ``plan`` fixes names/dtypes/shapes, then ``write`` streams the data."""

    def __init__(self, f: BinaryIO, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        off = 0
        self.sizes = {}
        for name, dt, shape in plan:
            n = int(np.prod(shape)) * ST_TYPES[dt]
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            self.sizes[name] = n
            off += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        self.f, self.total = f, off

    def write(self, data: np.ndarray) -> None:
        """Append raw bytes (tensors in plan order, each possibly in several chunks)."""
        self.f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
