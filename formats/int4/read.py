"""qconvert's int4 layout (docs/int4-format.md): the lazy reader. Everything the header says is checked before
any byte is used; matrices dequantise row ranges on the fly, or hand the decoders their stored parts
(formats/model/stored.py PackedMatrix)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from formats.container.safetensors_io import SafetensorsFile
from formats.errors import QConvertError
from formats.files import jsonio
from formats.int4.layout import (FILENAME, FORMAT, PLAIN_VERSION, VERSION, dequant_rows, group_values, offsets_part,
                                 offsets_shape, pack, row_bytes, tensor_choices, unpack, unpack_v1)
from formats.model.config import ModelConfig
from formats.model.names import canonical_names, canonical_shape
from formats.model.source import Source
from formats.model.stored import CodeMatrix, PackedMatrix
from formats.model.tensor import LazyTensor
from formats.model.tokenizer import TokenizerData


def open_int4(d: Path) -> Source:
    """Open an int4 folder as a Source; matrices dequantise row ranges on the fly (float32).

    Everything the header says is checked before any byte is used: format and version, each matrix's bits /
    group size / scheme / scale precision, and the dtype and shape of every stored part."""

    d = Path(d)
    raw_cfg = jsonio.load(d / "config.json", "config")
    cfg = ModelConfig.from_hf_dict(raw_cfg, str(d / "config.json"))
    f = SafetensorsFile(d / FILENAME)
    try:
        src = _open_checked(d, f, cfg, raw_cfg)
    except BaseException:
        f.close()
        raise
    src.check_complete()
    return src


def _open_checked(d: Path, f: SafetensorsFile, cfg: ModelConfig, raw_cfg: dict[str, Any]) -> Source:

    where = d / FILENAME
    meta = f.header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise QConvertError(f"{where}: not a {FORMAT} file; write it with `qconvert quantize --format int4`")
    if meta.get("version") not in ("1", PLAIN_VERSION, VERSION):
        raise QConvertError(f"{where}: int4 layout version {str(meta.get('version'))[:20]} is not supported (this "
                            f"qconvert reads versions 1 to {VERSION}); upgrade qconvert")
    if "quantization" not in meta:
        raise QConvertError(f"{where}: __metadata__ has no quantization entry; re-run `qconvert quantize`")
    q = jsonio.loads(meta["quantization"], f"{where} __metadata__.quantization", "metadata")
    version = meta["version"]
    per = jsonio.loads(meta.get("tensors", "{}"), f"{where} __metadata__.tensors", "metadata")
    src = Source(config=cfg, tokenizer=TokenizerData.from_hf_dir(d, raw_cfg), tensors={}, path=str(d), kind="int4",
                 closers=[f.close])
    if (d / "generation_config.json").is_file():
        src.generation_config = jsonio.load(d / "generation_config.json", "config")
    expected = set()
    for n in canonical_names(cfg):
        shape = canonical_shape(n, cfg)
        if n in f.header:
            _part(f, n, n, ("F32", "F16", "BF16"), shape)
            expected.add(n)
            src.tensors[n] = f.tensor(n)
            continue
        try:
            b, g, sy, scale_bits, zint = tensor_choices(version, q, per, n)
            if not (2 <= b <= 8 and 1 <= g <= 1 << 16 and scale_bits in (8, 16)):
                raise ValueError(f"bits {b}, group size {g}, scale bits {scale_bits} out of range")
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as e:
            raise QConvertError(f"{where}: broken int4 metadata for {n} ({e}); re-run `qconvert quantize`") from None
        if len(shape) != 2:
            raise QConvertError(f"{where}: {n} is 1-D and must be stored as F32, not quantised")
        s8 = scale_bits == 8
        rows, cols = shape
        ng = -(-cols // g)
        rb = row_bytes(cols, b) if version != "1" or b == 4 else cols
        qw = _part(f, f"{n}.qweight", n, ("U8",), (rows, rb))
        sc = _part(f, f"{n}.scales", n, (("I8" if sy else "U8") if s8 else "F16",), (rows, ng))
        osfx, odt, _ = offsets_part(s8, zint)
        of = _part(f, f"{n}.{osfx}", n, (odt,), offsets_shape(rows, ng, b, zint)) if not sy else None
        st = _part(f, f"{n}.steps", n, ("F16",), (rows, 2)) if s8 else None
        expected.update(f"{n}.{k}" for k, t in (("qweight", qw), ("scales", sc), (osfx, of), ("steps", st)) if t)
        reader = _reader(qw, sc, of, st, b, g, cols, unpack_v1 if version == "1" else unpack, zint)
        stored = sum(x.nbytes for x in (qw, sc, of, st) if x is not None)
        label = f"int{b} g{g} {'sym' if sy else 'asym'}" + (" s8" if s8 else "") + (" zint" if zint else "")
        src.tensors[n] = LazyTensor(n, shape, "F32", reader, quant=label, stored_nbytes=stored,
                                    packer=_packer(qw, sc, of, st, b, g, cols, int(version), zint))
    extra = sorted(set(f.header) - expected - {"__metadata__"})
    if extra:
        raise QConvertError(f"{where}: unexpected tensor {extra[0]!r} for this config; is config.json from the same "
                            "int4 folder?")
    return src


def _part(f: SafetensorsFile, name: str, canonical: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> LazyTensor:
    """Stored tensor ``name`` after checking it exists with one of ``dtypes`` and exactly ``shape``."""
    m = f.header.get(name)
    if m is None:
        raise QConvertError(f"{f.path}: tensor {name} is missing; the int4 folder is incomplete, re-run `qconvert quantize`")
    if m["dtype"] not in dtypes or tuple(m["shape"]) != tuple(shape):
        raise QConvertError(f"{f.path}: tensor {name} is {m['dtype']} {list(m['shape'])}, the header's choices imply "
                            f"{'/'.join(dtypes)} {list(shape)}; the file is damaged, re-run `qconvert quantize`")
    return f.tensor(name, canonical)


def _packer(qw: LazyTensor, sc: LazyTensor, of: LazyTensor | None, st: LazyTensor | None, bits: int, group: int,
            cols: int, version: int, zint: bool = False) -> Callable[[], Any]:
    """The matrix's stored parts as a PackedMatrix over the mapped file (the decoders' native form)."""
    def make() -> Any:

        s8 = st is not None
        scales = sc.packed_view().view(np.uint16 if not s8 else (np.int8 if of is None else np.uint8))
        offsets = None if of is None else of.packed_view().view(offsets_part(s8, zint)[2])
        steps = None if st is None else st.packed_view().view(np.uint16)
        return PackedMatrix.int_codes(qw.packed_view(), scales, offsets, steps, bits, group, cols, version, zint)
    return make


def _reader(qw: LazyTensor, sc: LazyTensor, of: LazyTensor | None, st: LazyTensor | None, bits: int, group: int,
            cols: int, unpacker: Callable[[np.ndarray, int, int], np.ndarray], zint: bool = False):
    def raw(t: LazyTensor, start: int, stop: int, dt) -> np.ndarray:
        return t.raw_rows(start, stop).view(dt).reshape(stop - start, -1)

    def read(start: int, stop: int) -> np.ndarray:
        codes = unpacker(raw(qw, start, stop, np.uint8), bits, cols)
        o = None if of is None else raw(of, start, stop, offsets_part(st is not None, zint)[2])
        if zint and o is not None:
            o = unpack(o, bits, -(-cols // group))
        if st is None:
            s, steps = raw(sc, start, stop, np.uint16), None
        else:
            s = raw(sc, start, stop, np.int8 if of is None else np.uint8)
            steps = raw(st, start, stop, np.uint16)
        return dequant_rows(codes, s, o, bits, group, steps).astype(np.float32).reshape(-1).view(np.uint8)
    return read


@dataclass
class StoredMatrix(CodeMatrix):
    """One quantised matrix of an int4 folder as stored: lazy qweight / scales / offsets and its parameters."""

    ROUNDING = "their 8-bit scale codes or integer-zero offsets rounded to f16"

    name: str
    rows: int
    cols: int
    bits: int
    group_size: int
    qweight: LazyTensor
    scales: LazyTensor
    offsets: LazyTensor | None
    steps: LazyTensor | None = None  # per-row f16 steps of 8-bit scale codes (layout version 2)
    v1: bool = False  # a version-1 file: codes of widths other than 4 are stored one per byte
    zint: bool = False  # ``offsets`` are uint8 integer zeros (version 3 ``W.zeros``): offset = z * -scale

    @property
    def sym(self) -> bool:
        """True for symmetric codes (no offsets)."""
        return self.offsets is None

    @property
    def rounded(self) -> bool:
        """8-bit scale codes (and their integer-zero offsets z * -scale) are rounded to f16 block values; f16
        scales are kept, and so are integer-zero offsets with them (their scales have 11 - bits significant bits)."""
        return self.steps is not None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(qweight uint8, scales f16 as uint16, offsets f16 as uint16 | None) of rows [start, stop); 8-bit
        scale codes are turned into f16 values (step x code, rounded to f16)."""
        n = stop - start
        q = self.qweight.raw_rows(start, stop).reshape(n, -1)
        if self.v1 and self.bits != 4:
            q = pack(q[:, :self.cols], self.bits)
        if self.steps is None and not self.zint:
            s = self.scales.raw_rows(start, stop).view(np.uint16).reshape(n, -1)
            o = self.offsets.raw_rows(start, stop).view(np.uint16).reshape(n, -1) if self.offsets is not None else None
            return q, s, o
        sf, mf = self.values(start, stop)
        s = sf.astype(np.float16).view(np.uint16)
        o = None if mf is None else mf.astype(np.float16).view(np.uint16)
        return q, s, o

    def values(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 scales and offsets [rows, groups] of rows [start, stop) (formats/int4/layout.py group_values)."""

        n, s8 = stop - start, self.steps is not None
        sc = self.scales.raw_rows(start, stop).view(np.uint16 if not s8 else np.int8 if self.sym else np.uint8)
        of = None if self.offsets is None else \
            self.offsets.raw_rows(start, stop).view(offsets_part(s8, self.zint)[2]).reshape(n, -1)
        if self.zint and of is not None:
            of = unpack(of, self.bits, -(-self.cols // self.group_size))
        st = self.steps.raw_rows(start, stop).view(np.uint16).reshape(n, 2) if s8 else None
        return group_values(sc.reshape(n, -1), of, st)


def stored_matrices(src: Source) -> dict[str, StoredMatrix]:
    """The quantised matrices of an int4 Source, read straight from its safetensors file.

    The file is opened once more (its handle is closed with ``src``).
    """

    if src.kind != "int4":
        raise QConvertError(f"{src.path}: not an int4 folder")
    f = SafetensorsFile(Path(src.path) / FILENAME)
    src.closers.append(f.close)
    meta = f.header.get("__metadata__") or {}
    out = {}
    try:
        q = json.loads(meta["quantization"])
        per = json.loads(meta.get("tensors", "{}"))
        version = meta.get("version")
        for n, t in src.tensors.items():
            if t.quant is None or f"{n}.qweight" not in f.header:
                continue
            rows, cols = t.shape
            bits, group, sym, scale_bits, zint = tensor_choices(version, q, per, n)
            out[n] = StoredMatrix(n, rows, cols, bits, group, f.tensor(f"{n}.qweight", n), f.tensor(f"{n}.scales", n),
                                  None if sym else f.tensor(f"{n}.{'zeros' if zint else 'offsets'}", n),
                                  f.tensor(f"{n}.steps", n) if scale_bits == 8 else None, version == "1", zint)
    except (KeyError, ValueError, TypeError) as e:
        raise QConvertError(f"{f.path}: broken int4 metadata ({e}); re-run `qconvert quantize`") from None
    return out
