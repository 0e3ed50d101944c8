"""qconvert's int4 layout (docs/int4-format.md): the stored form and a writer that streams (the lazy reader:
formats/int4_read.py).

One ``model.int4.safetensors`` holds, for every quantised matrix ``W`` [rows, cols], the tensors
``W.qweight`` (uint8 codes: two 4-bit codes per byte, low nibble first, for 4 bits; one code per byte
otherwise), ``W.scales`` and, when asymmetric, ``W.offsets`` ([rows, groups]: f16, or 8-bit codes with
per-row f16 steps ``W.steps`` [rows, 2]) or integer zeros ``W.zeros`` (bit-packed, version 3), each matrix
with its own bits / group size;
1-D tensors are stored as F32. The header's ``__metadata__`` carries the format name, version and the
quantisation choices so a reader repeats them.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from formats import kernels
from formats.errors import QConvertError
from formats.names import canonical_names, canonical_shape
from formats.output import atomic_dir
from formats.progress import bar
from formats.safetensors_io import SafetensorsWriter
from formats.source import Source
from formats.tensor import row_chunks, stream_converted

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
        code = 8 * -(-cols * self.bits // 8)  # codes are bit-packed (formats/int4.py: pack)
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
    if use_c and (out := kernels.pack_bits(q, bits)) is not None:
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
    if use_c and (out := kernels.unpack_bits(b, bits, cols)) is not None:
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


def write_int4(src: Source, out: Path, specs: dict[str, QuantSpec], quantizer: Quantiser, method: str = "search",
               force: bool = False, progress: bool = True, on_tensor: Callable[[str, float], None] | None = None,
               precomputed: dict[str, Any] | None = None, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantise every matrix of ``src`` group-wise as ``specs`` says and write the int4 folder; a summary back.

    ``specs`` maps every 2-D tensor name (router gates excepted: they stay F32 with the 1-D tensors) to a
    ``QuantSpec`` (``qconvert.quant.recipes.plan`` makes one); ``quantizer(rows, spec, pool)`` turns float32
    rows into their codes (the maths lives in qconvert/quant; this module only stores). ``on_tensor(name,
    rel_rmse)`` is called after each matrix. ``precomputed`` maps names to ready GroupQuant results (e.g. from
    GPTQ, ``method`` names it) in their spec; those are stored as given. ``summary`` (the recipe: base bits,
    group size, mix, ...) goes into the header's ``quantization`` entry.
    """
    cfg = src.config
    names = canonical_names(cfg)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    plan, qinfo = [], {}
    for n in names:
        shape = canonical_shape(n, cfg)
        if len(shape) == 1 or shape[0] == 1 or n.endswith("mlp.gate.weight"):
            plan.append((n, "F32", shape))
            continue
        if n not in specs:
            raise QConvertError(f"no quantisation spec for {n}; this is a bug in the caller of write_int4")
        rows, cols = shape
        sp = specs[n]
        ng = -(-cols // sp.group_size)
        plan.append((f"{n}.qweight", "U8", (rows, row_bytes(cols, sp.bits))))
        s8 = sp.scale_bits == 8
        plan.append((f"{n}.scales", ("I8" if sp.sym else "U8") if s8 else "F16", (rows, ng)))
        zint = sp.zero_int and not sp.sym
        if not sp.sym:
            sfx, dt, _ = offsets_part(s8, zint)
            plan.append((f"{n}.{sfx}", dt, offsets_shape(rows, ng, sp.bits, zint)))
        if s8:
            plan.append((f"{n}.steps", "F16", (rows, 2)))
        qinfo[n] = {"shape": [rows, cols], "bits": sp.bits, "group_size": sp.group_size,
                    "scheme": "sym" if sp.sym else "asym", "scale_bits": sp.scale_bits}
        if zint:
            qinfo[n]["zero_point"] = "int"
    meta = {**(summary or {}), "method": method}
    version = ZEROS_VERSION if any(i.get("zero_point") == "int" for i in qinfo.values()) else PLAIN_VERSION
    header_meta = {"format": FORMAT, "version": version, "quantization": json.dumps(meta),
                   "tensors": json.dumps(qinfo)}
    stats = {"quantised_params": 0, "quantised_bytes": 0, "errors": {}}
    total = sum(int(np.prod(canonical_shape(n, cfg))) for n in names)
    with atomic_dir(Path(out), force) as tmp, ThreadPoolExecutor(2) as pool, bar(total * 4, "quantising", progress) as pb:
        with open(tmp / FILENAME, "wb") as f:
            w = SafetensorsWriter(f, plan, metadata=header_meta)
            for n in names:
                t = src.tensors[n]
                if n not in qinfo:
                    for chunk in stream_converted(t, "F32", pool):
                        w.write(chunk)
                    pb.update(t.n_rows * t.row_len * 4)
                    continue
                sp = specs[n]
                parts, err, ref = [], 0.0, 0.0
                pre = (precomputed or {}).get(n)
                for r0, r1 in row_chunks(t, 1 << 22):
                    x = t.rows(r0, r1)
                    if pre is not None:
                        g = pre.rows(r0, r1)
                    else:
                        g = quantizer(x, sp, pool)
                    w.write(pack(g.q, sp.bits))
                    parts.append(g)
                    if g.sq_err is None:
                        g.sq_err = float(np.square(dequant_rows(g.q, g.scales, g.offsets, sp.bits, sp.group_size,
                                                                g.steps) - x).sum())
                    err += g.sq_err
                    flat = x.reshape(-1)
                    ref += float(np.dot(flat, flat))
                    pb.update(x.nbytes)
                w.write(np.concatenate([g.scales for g in parts]))
                if not sp.sym:
                    offs = np.concatenate([g.offsets for g in parts])
                    if (offs.dtype == np.uint8) != (sp.zero_int and not sp.sym):
                        raise QConvertError(f"{n}: the quantiser's offsets do not match its spec ({sp.label()}); "
                                            "this is a bug in the quantiser")
                    w.write(pack(offs, sp.bits) if offs.dtype == np.uint8 else offs)
                if sp.scale_bits == 8:
                    w.write(np.concatenate([g.steps for g in parts]))
                rel = float(np.sqrt(err / max(ref, 1e-30)))
                stats["errors"][n] = rel
                if n != head:
                    stats["quantised_params"] += t.n_rows * t.row_len
                if on_tensor:
                    on_tensor(n, rel)
        stats["quantised_bytes"] = sum(int(np.prod(s)) * (2 if dt == "F16" else 1) for name, dt, s in plan
                                       if dt != "F32" and name.rsplit(".", 1)[0] != head)
        c = cfg.to_hf_dict()
        c["quantization_config"] = {"quant_method": FORMAT, "version": version, **meta}
        _json(tmp / "config.json", c)
        if src.generation_config:
            _json(tmp / "generation_config.json", src.generation_config)
        for fname, obj in src.tokenizer.to_hf_files().items():
            _json(tmp / fname, obj)
    stats["bits_per_weight"] = 8 * stats["quantised_bytes"] / max(1, stats["quantised_params"])  # head excluded
    stats["head"] = (head, specs[head].bits if head in specs else None)
    stats["dir_bytes"] = sum(p.stat().st_size for p in Path(out).iterdir())
    return stats


def _json(p: Path, obj: Any) -> None:
    big = p.name == "tokenizer.json"  # megabytes: the C encoder only runs without indent
    p.write_text(json.dumps(obj, indent=None if big else 2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.chmod(p, 0o644)
