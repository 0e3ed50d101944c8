"""Lazy tensors: what every source hands out, read by row ranges so sinks can stream.

A tensor of shape (rows, n) — 1-D tensors are one row — stored as type ``stype`` (F32/F16/BF16 or a
GGML block type). ``raw_rows`` returns the stored bytes of a row range; ``rows`` decodes them to
float32. Sinks convert chunk by chunk, so memory stays at a few MB per chunk.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from formats.ggml import codec
from formats.ggml.dtypes import row_nbytes
from formats.model.stored import PackedMatrix

CHUNK_VALUES = 1 << 20  # values per conversion chunk


@dataclass
class LazyTensor:
    """A tensor that reads its rows on demand through ``reader(start_row, stop_row) -> raw bytes``."""

    name: str
    shape: tuple[int, ...]
    stype: str
    reader: Callable[[int, int], np.ndarray]
    quant: str | None = None  # e.g. "int4 g128 asym": a quantised tensor whose reader dequantises to stype
    stored_nbytes: int | None = None  # bytes on disk when that differs from the decoded size
    mapper: Callable[[], np.ndarray] | None = None  # the stored bytes [n_rows, row bytes] as a view of a mapping
    packer: Callable[[], Any] | None = None  # a quantised tensor's stored form as a codecs.PackedMatrix

    @property
    def n_rows(self) -> int:
        """Rows (product of all but the last dimension; 1 for a 1-D tensor)."""
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def row_len(self) -> int:
        """Values per row (the last dimension)."""
        return int(self.shape[-1])

    @property
    def nbytes(self) -> int:
        """Stored size in bytes."""
        if self.stored_nbytes is not None:
            return self.stored_nbytes
        return self.n_rows * row_nbytes(self.stype, self.row_len)

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        """Stored bytes of rows [start, stop) as a flat uint8 array."""
        return self.reader(start, stop)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, shape (stop - start, row_len)."""
        return codec.to_f32(self.raw_rows(start, stop), self.stype).reshape(stop - start, self.row_len)

    def packed_view(self) -> np.ndarray:
        """Stored bytes [n_rows, row bytes] (uint8): a view of the mapped file when the source maps, else read."""
        if self.mapper is not None:
            return self.mapper()
        return self.raw_rows(0, self.n_rows).reshape(self.n_rows, -1)

    def packed(self) -> Any:
        """The tensor as a ``qconvert.decoder.products.PackedMatrix`` over its stored bytes: memory-mapped where the
        source allows (nothing is read until used), otherwise read once in its stored form (never float32
        unless stored so). The decoders multiply by it natively."""

        if self.packer is not None:
            return self.packer()
        return PackedMatrix.ggml(self.stype, self.packed_view(), self.row_len)

    def numpy(self) -> np.ndarray:
        """The whole tensor as float32 in its shape (materialises it: use for small tensors / tests)."""
        return self.rows(0, self.n_rows).reshape(self.shape)


def row_chunks(t: LazyTensor, chunk_values: int = CHUNK_VALUES) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk_values`` values each covering the tensor."""
    step = max(1, chunk_values // max(1, t.row_len))
    return [(s, min(s + step, t.n_rows)) for s in range(0, t.n_rows, step)]


def stream_converted(t: LazyTensor, dst: str, pool: ThreadPoolExecutor | None = None,
                     imatrix: np.ndarray | None = None, reference: bool = False) -> Iterator[np.ndarray]:
    """Yield the tensor's data as raw ``dst`` bytes, chunk by chunk, in order (``imatrix``: importance of the
    columns, for the encoders that use one; ``reference``: ggml's reference quantisers, codec.from_f32).

    With a thread pool, up to two chunks ahead are converted while the caller writes the current one.
    """
    return pipelined(lambda r: codec.convert(t.raw_rows(*r), t.stype, dst, imatrix=imatrix,
                                                   reference=reference), row_chunks(t), pool)


def pipelined(work: Callable[[tuple[int, int]], np.ndarray], ranges: list[tuple[int, int]],
              pool: ThreadPoolExecutor | None = None) -> Iterator[np.ndarray]:
    """Yield ``work(r)`` for each row range in order; with a pool, up to two ranges are computed ahead."""
    if pool is None or len(ranges) == 1:
        for r in ranges:
            yield work(r)
        return
    pending = [pool.submit(work, r) for r in ranges[:2]]
    for i in range(len(ranges)):
        done = pending.pop(0)
        if i + 2 < len(ranges):
            pending.append(pool.submit(work, ranges[i + 2]))
        yield done.result()
