"""Importance-matrix files, as llama.cpp's ``llama-imatrix`` writes them and ``llama-quantize --imatrix`` reads them.

An importance matrix holds, for every 2-D weight that multiplies activations (GGUF tensor names), the sum of
the squared input activations of each input column over the calibration tokens, and how many tokens were
summed. Stacked MoE experts keep one row of sums and one count per expert (each expert sees only the tokens
routed to it). The weight an encoder gives column j is ``sums[j] / count`` (1 where the count is 0).

Two layouts are read:

* GGUF (current llama-imatrix): ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings),
  ``imatrix.chunk_count`` / ``imatrix.chunk_size`` (u32), and per entry two F32 tensors,
  ``NAME.in_sum2`` [n_mat, n_cols] and ``NAME.counts`` [n_mat, 1].
* legacy ``.dat``: int32 entry count; per entry int32 name length, the name, int32 ncall, int32 n_values
  and n_values float32 already divided by the token count and multiplied by ncall; then optionally
  int32 chunk count, int32 length and the dataset name.

``write_imatrix`` writes the GGUF layout (atomically).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.errors import QConvertError
from formats.files.atomic import atomic_file
from formats.gguf.header import read_header

MAX_LEGACY_ENTRIES = 1 << 20
MAX_NAME = 1 << 10


@dataclass
class ImatrixEntry:
    """Sums of squared inputs [n_mat, n_cols] (float32) and token counts [n_mat] of one weight."""
    sums: np.ndarray
    counts: np.ndarray

    def weights(self) -> np.ndarray:
        """Per-column importance [n_mat, n_cols]: sums / count as llama-quantize computes it (float32
        division; a matrix no token reached gets weights 1)."""
        out = np.ones_like(self.sums, dtype=np.float32)
        for j, c in enumerate(self.counts):
            if c > 0:
                out[j] = self.sums[j] / np.float32(c)
        return out


@dataclass
class Imatrix:
    """An importance matrix: {GGUF tensor name: ImatrixEntry} plus llama-imatrix's metadata."""
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def weights(self, gguf_name: str, n_cols: int, n_mat: int = 1) -> np.ndarray | None:
        """Importance weights [n_mat, n_cols] of one tensor, or None when the file has no entry for it.
        A size that does not fit the tensor is an error (llama-quantize refuses it too)."""
        e = self.entries.get(gguf_name)
        if e is None:
            return None
        if e.sums.shape != (n_mat, n_cols):
            raise QConvertError(f"imatrix entry {gguf_name}: {e.sums.size} values for a tensor of {n_mat} x {n_cols} "
                                "columns; it was computed for another model")
        return e.weights()


def read_imatrix(path: str | Path) -> Imatrix:
    """Read an importance matrix (GGUF or legacy ``.dat``; detected from the magic). Values must be finite."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QConvertError(f"cannot read the imatrix {path}: {e.strerror}") from None
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not im.entries:
        raise QConvertError(f"{path}: the imatrix holds no entries")
    for name, e in im.entries.items():
        if not np.all(np.isfinite(e.sums)):
            raise QConvertError(f"{path}: imatrix entry {name} holds non-finite values; recompute it")
    return im


def _read_gguf(path: Path) -> Imatrix:
    kv, tensors = read_header(path)
    if kv.get("general.type", "imatrix") != "imatrix":
        raise QConvertError(f"{path}: a GGUF of general.type {kv['general.type']!r}, not an imatrix")
    sums, counts = {}, {}
    raw = np.memmap(path, np.uint8, mode="r") if tensors else None
    for t in tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.type != "F32":
                    raise QConvertError(f"{path}: {t.name} is {t.type}; imatrix sums and counts must be F32")
                into[t.name[:-len(suffix)]] = np.array(raw[t.offset:t.offset + t.nbytes].view(np.float32)).reshape(
                    t.shape if len(t.shape) > 1 else (1, -1))
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise QConvertError(f"{path}: imatrix entry {odd} has sums without counts or counts without sums")
    entries = {}
    for name, s in sums.items():
        c = np.rint(counts[name].reshape(-1)).astype(np.int64)
        if s.size % max(1, c.size) or s.shape[0] != c.size:
            raise QConvertError(f"{path}: imatrix entry {name}: {s.size} sums do not split into {c.size} matrices")
        entries[name] = ImatrixEntry(s.astype(np.float32).reshape(c.size, -1), c)
    ds = kv.get("imatrix.datasets", [])
    return Imatrix(entries, [str(d) for d in ds] if isinstance(ds, list) else [], int(kv.get("imatrix.chunk_count", 0)),
                   int(kv.get("imatrix.chunk_size", 0)))


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise QConvertError(f"{path}: not an imatrix (GGUF or legacy .dat): the file ends inside {what} "
                                f"at byte {pos}")
        pos += n
        return data[pos - n:pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n = i32("the entry count")
    if not 0 < n <= MAX_LEGACY_ENTRIES:
        raise QConvertError(f"{path}: not an imatrix (GGUF or legacy .dat): {n} entries")
    entries = {}
    for i in range(n):
        ln = i32(f"entry {i}")
        if not 0 < ln <= MAX_NAME:
            raise QConvertError(f"{path}: entry {i} has a name of {ln} bytes")
        name = take(ln, f"entry {i}'s name").decode("utf-8", "replace")
        ncall, nval = i32(f"{name}'s call count"), i32(f"{name}'s value count")
        if nval < 1:
            raise QConvertError(f"{path}: imatrix entry {name} has {nval} values")
        vals = np.frombuffer(take(4 * nval, f"{name}'s values"), np.float32)
        # legacy values are (sums / tokens) * ncall: weights() divides by ncall again
        entries[name] = ImatrixEntry(vals.reshape(1, -1).copy(), np.array([ncall], np.int64))
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        chunks = i32("the chunk count")
        if pos + 4 <= len(data):
            ln = i32("the dataset name")
            if 0 < ln <= len(data) - pos:
                datasets.append(take(ln, "the dataset name").decode("utf-8", "replace"))
    for e in entries.values():  # as llama-quantize: ncall 0 means the values are used as they are
        if e.counts[0] <= 0:
            e.counts[0] = 1
    return Imatrix(entries, datasets, chunks, 0, legacy=True)


def write_imatrix(im: Imatrix, out: Path, force: bool = False) -> None:
    """Write ``im`` in llama-imatrix's GGUF layout (entries in name order), atomically."""
    import gguf

    with atomic_file(Path(out), force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="", use_temp_file=False)
        w.kv_data[0].clear()  # no general.architecture: an imatrix is not a model
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", list(im.datasets))
        w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
        for name in sorted(im.entries):
            e = im.entries[name]
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, np.float32))
            w.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
