"""Export an int4 folder as a quantised HF checkpoint that the serving stacks load: GPTQ (v1, GPTQModel's
``dynamic`` for per-module bits), AutoAWQ GEMM, compressed-tensors pack-quantized (one config group per
distinct scheme). The layouts are formats/hf/quantized_read.py's ``LAYOUTS``; this module packs the other way.

Codes are kept. Each format means ``w = s * (q - z)`` with f16 scales ``s`` and integer zeros ``z``:

- symmetric int4 groups (``s * (q - 2^(b-1))``) are that with ``z = 2^(b-1)``: exact, up to the f16 rounding
  of 8-bit scale codes (``scale_bits`` 8: scale = row step x code, a float32 product);
- integer-zero groups (``--zero-point int``, layout version 3 ``W.zeros``) are exactly that: their scales are
  exact f16 (8-bit scale codes on row steps of 3 significant bits), so every value is kept;
- asymmetric groups (``s * q + m``, a float offset) need an integer zero: ``z = round(-m / s)``, clipped to
  what the format stores, which moves the group's values by ``s * (z + m / s)`` (at most half a step). That
  error is measured and reported; ``qconvert verify SRC OUT`` gives its KL.

1-D tensors, the embedding and an untied head are written as F16 (dequantised; the loaders quantise Linear
layers only). What a format cannot hold is refused before anything is written, naming the matrices; with
``widen`` a matrix whose width the format lacks is stored at the next width it has, exactly (codes
re-centred: ``q' = q - z + 2^(B-1)``, ``z' = 2^(B-1)``, same scales), or, where there is none (AWQ above 4
bits), left unquantised in F16 and listed in ``modules_to_not_convert``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from formats.container.safetensors_io import SafetensorsWriter
from formats.errors import QConvertError
from formats.files.atomic import atomic_dir
from formats.files.progress import bar
from formats.hf.quantized_read import LAYOUTS, Layout
from formats.int4.layout import pack, unpack
from formats.int4.read import StoredMatrix, stored_matrices
from formats.model.names import canonical_names, canonical_shape
from formats.model.source import Source
from formats.model.tensor import stream_converted

TARGETS = ("gptq", "awq", "compressed-tensors")
BITS = {"gptq": (2, 3, 4, 8), "awq": (4,), "compressed-tensors": (2, 3, 4, 5, 6, 7, 8)}
HEADS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class ExportStats:
    """What an export did, for its summary line."""

    exact: int = 0
    scales_rounded: int = 0
    zeros_rerounded: int = 0
    widened: dict[str, int] = field(default_factory=dict)  # "5->8": matrices stored at a wider width
    dense: list[str] = field(default_factory=list)  # quantised in the int4 folder, left unquantised (F16)
    sq_err: float = 0.0   # squared change of the re-rounded matrices' weights
    sq_ref: float = 0.0   # squared weights of those matrices
    dequantised: list[str] = field(default_factory=list)  # quantised in the int4 folder, written as F16

    def summary(self, to: str, n: int) -> str:
        """One line: how many matrices kept their values, which changed and by how much."""
        rel = np.sqrt(self.sq_err / self.sq_ref) if self.sq_ref else 0.0
        parts = [f"{to}: {n} matrices; {self.exact} exact"]
        if self.scales_rounded:
            parts.append(f"{self.scales_rounded} with 8-bit scale codes rounded to f16 scales (<= 1/2 f16 ulp each)")
        if self.zeros_rerounded:
            parts.append(f"{self.zeros_rerounded} asymmetric with offsets re-rounded to integer zero points the format "
                         f"stores (relative RMS change of those weights {rel:.2%}; `qconvert verify` gives the KL)")
        if self.widened:
            parts.append(", ".join(f"{v} widened {k} bits (exact)" for k, v in sorted(self.widened.items())))
        if self.dense:
            parts.append(f"{len(self.dense)} left unquantised as F16 in modules_to_not_convert (no such width; values "
                         f"rounded to f16, `qconvert verify` gives the KL)")
        if self.dequantised:
            parts.append(f"{', '.join(self.dequantised)} written as F16 (the loaders quantise Linear layers only)")
        return "; ".join(parts)


def _module(name: str) -> str:
    return name[: -len(".weight")]


@dataclass
class ExportPlan:
    """What ``check_exportable`` decided: the matrices written quantised, each with the width it is stored at,
    and those left unquantised (F16) for want of a width."""

    mats: dict[str, StoredMatrix]
    width: dict[str, int]
    dense: list[str] = field(default_factory=list)


def _wider(bits: int, to: str) -> int | None:
    """The narrowest width of ``to`` that holds ``bits``-bit codes exactly once re-centred (>= bits + 1)."""
    return next((b for b in BITS[to] if b > bits), None)


def check_exportable(src: Source, to: str, widen: bool = False) -> ExportPlan:
    """The matrices to write and how; QConvertError naming every matrix ``to`` cannot hold (``widen``: those
    are widened, or left unquantised where no width is wider)."""
    if to not in TARGETS:
        raise QConvertError(f"--to {to!r} is not a format qconvert exports; choose one of {', '.join(TARGETS)}")
    if src.kind != "int4":
        raise QConvertError(f"{src.path}: export reads an int4 folder; quantise first, e.g. `qconvert quantize "
                            f"{src.path} OUT --group-size 128 --mix uniform`")
    mats = {n: m for n, m in stored_matrices(src).items() if n not in HEADS}
    bad = [n for n, m in mats.items() if m.bits not in BITS[to]]
    if bad and not widen:
        widths = sorted({mats[n].bits for n in bad})
        raise QConvertError(f"{to} holds {'/'.join(map(str, BITS[to]))}-bit codes, but {len(bad)} matrices are "
                            f"{'/'.join(map(str, widths))}-bit ({', '.join(_module(n) for n in bad[:3])}"
                            f"{f' +{len(bad) - 3} more' if len(bad) > 3 else ''}); add --widen (wider codes, exact"
                            f"{'; AWQ keeps 5-8-bit matrices in F16' if to == 'awq' else ''}), re-quantise with "
                            f"`qconvert quantize --mix uniform --bits 4`, or export --to compressed-tensors (2-8 bits)")
    width = {n: m.bits if n not in bad else _wider(m.bits, to) for n, m in mats.items()}
    dense = [n for n in mats if width[n] is None]
    plan = ExportPlan({n: m for n, m in mats.items() if n not in dense},
                      {n: b for n, b in width.items() if b is not None}, dense)
    if to == "awq":
        groups = {m.group_size for m in plan.mats.values()}
        if len(groups) > 1:
            raise QConvertError(f"awq has one group size per model; this folder mixes {sorted(groups)}")
        odd = [n for n, m in plan.mats.items() if m.rows % 8]
        if odd:
            raise QConvertError(f"awq packs 8 outputs per int32; {_module(odd[0])} has {plan.mats[odd[0]].rows}")
    return plan


def integers(m: StoredMatrix, zmin: int, zmax: int, stats: ExportStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes q [rows, cols] uint8, zeros z [rows, groups] int64, f16 scales [rows, groups]) meaning
    ``s * (q - z)`` for one int4 matrix; counts what changed in ``stats``."""

    qw = m.qweight.raw_rows(0, m.rows).reshape(m.rows, -1)
    ng = -(-m.cols // m.group_size)
    q = qw[:, :m.cols].copy() if m.v1 and m.bits != 4 else unpack(qw, m.bits, m.cols)
    s, off = m.values(0, m.rows)
    s16 = s.astype(np.float16)
    rounded = not np.array_equal(s16.astype(np.float32), s)
    if off is None or m.zint:
        stats.scales_rounded += rounded
        stats.exact += not rounded
        if off is None:
            return q, np.full((m.rows, ng), 1 << (m.bits - 1), np.int64), s16
        z = unpack(m.offsets.raw_rows(0, m.rows).reshape(m.rows, -1), m.bits, ng).astype(np.int64)
        if z.min(initial=zmin) < zmin or z.max(initial=zmax) > zmax:
            raise QConvertError(f"{m.name}: integer zeros outside {zmin}..{zmax}, which this format stores; the "
                                "int4 folder is damaged, re-run `qconvert quantize --zero-point int`")
        return q, z, s16
    safe = np.where(s == 0, 1.0, s)
    zf = -off / safe
    z = np.clip(np.rint(zf), zmin, zmax).astype(np.int64)
    if np.array_equal(z.astype(np.float32), zf) and not rounded:
        stats.exact += 1
        return q, z, s16
    col_g = np.minimum(np.arange(m.cols) // m.group_size, ng - 1)
    before = q.astype(np.float32) * s[:, col_g] + off[:, col_g]
    q2 = np.clip(np.rint(q + (z - zf)[:, col_g]), 0, (1 << m.bits) - 1).astype(np.uint8)
    after = (q2.astype(np.float32) - z[:, col_g]) * s16.astype(np.float32)[:, col_g]
    stats.zeros_rerounded += 1
    stats.sq_err += float(np.square(after - before, dtype=np.float64).sum())
    stats.sq_ref += float(np.square(before, dtype=np.float64).sum())
    return q2, z, s16


def _words(values: np.ndarray, bits: int) -> np.ndarray:
    """Rows of b-bit values -> rows of little-endian int32 words (a bit stream, zero-padded)."""
    b = pack(np.ascontiguousarray(values, dtype=np.uint8), bits)
    pad = -b.shape[1] % 4
    if pad:
        b = np.concatenate([b, np.zeros((b.shape[0], pad), np.uint8)], axis=1)
    return np.ascontiguousarray(b).view("<i4")


def _out_order(a: np.ndarray, order: tuple[int, ...] | None) -> np.ndarray:
    """Columns of [k, out] rearranged so that word nibble j holds column order[j] of its 8 (AWQ)."""
    if order is None:
        return a
    idx = (np.arange(a.shape[1] // 8)[:, None] * 8 + np.array(order)[None, :]).reshape(-1)
    return a[:, idx]


def packed_parts(m: StoredMatrix, lay: Layout, stats: ExportStats, bits: int | None = None
                 ) -> list[tuple[str, np.ndarray]]:
    """The stored parts (suffix, array) of one matrix in layout ``lay``, its codes ``bits`` wide (default: as
    stored; wider: re-centred, exact)."""
    b = bits or m.bits
    maxq = (1 << m.bits) - 1
    zmin, zmax = (1, maxq + 1) if lay.zero_minus_one else (0, maxq)
    q, z, s16 = integers(m, zmin, zmax, stats)
    if b != m.bits:  # q - z kept: codes and zeros move to the middle of the wider range
        col_g = np.minimum(np.arange(m.cols) // m.group_size, z.shape[1] - 1)
        q = (q.astype(np.int64) - z[:, col_g] + (1 << (b - 1))).astype(np.uint8)
        z = np.full_like(z, 1 << (b - 1))
        stats.widened[f"{m.bits}->{b}"] = stats.widened.get(f"{m.bits}->{b}", 0) + 1
        maxq = (1 << b) - 1
    zs = z - 1 if lay.zero_minus_one else z
    sym = m.sym or b != m.bits
    if lay.codes_along == "row":  # compressed-tensors
        parts = [("weight_packed", _words(q, b)), ("weight_scale", s16)]
        if not sym:
            parts.append(("weight_zero_point", np.ascontiguousarray(_words(zs.T.astype(np.uint8), b).T)))
        return parts + [("weight_shape", np.array([m.rows, m.cols], np.int64))]
    if lay.codes_along == "in":  # GPTQ
        return [("qweight", np.ascontiguousarray(_words(q, b).T)),
                ("qzeros", _words((zs.T & maxq).astype(np.uint8), b)),
                ("scales", np.ascontiguousarray(s16.T)),
                ("g_idx", (np.arange(m.cols) // m.group_size).astype(np.int32))]
    return [("qweight", _words(_out_order(np.ascontiguousarray(q.T), lay.nibble_order), b)),  # AWQ
            ("qzeros", _words(_out_order(np.ascontiguousarray(zs.T.astype(np.uint8)), lay.nibble_order), b)),
            ("scales", np.ascontiguousarray(s16.T))]


def part_shapes(m: StoredMatrix, lay: Layout, bits: int | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(suffix, safetensors dtype, shape) of each stored part, in ``packed_parts`` order."""
    rows, cols, b = m.rows, m.cols, bits or m.bits
    sym = m.sym or b != m.bits
    ng, w = -(-cols // m.group_size), (lambda n: -(-n * b // 32))
    if lay.codes_along == "row":
        out = [("weight_packed", "I32", (rows, w(cols))), ("weight_scale", "F16", (rows, ng))]
        if not sym:
            out.append(("weight_zero_point", "I32", (w(rows), ng)))
        return out + [("weight_shape", "I64", (2,))]
    if lay.codes_along == "in":
        return [("qweight", "I32", (w(cols), rows)), ("qzeros", "I32", (ng, w(rows))), ("scales", "F16", (ng, rows)),
                ("g_idx", "I32", (cols,))]
    return [("qweight", "I32", (cols, w(rows))), ("qzeros", "I32", (ng, w(rows))), ("scales", "F16", (ng, rows))]


def quantization_config(to: str, plan: ExportPlan) -> dict[str, Any]:
    """config.json's ``quantization_config`` for the exported matrices."""
    from collections import Counter

    schemes = {n: (plan.width[n], m.group_size, m.sym or plan.width[n] != m.bits) for n, m in plan.mats.items()}
    base = Counter(schemes.values()).most_common(1)[0][0] if schemes else (4, 128, True)
    if to == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": base[1], "zero_point": True, "version": "gemm",
                "modules_to_not_convert": [_module(n) for n in plan.dense] or None}
    if to == "gptq":
        dynamic = {"+:^" + _module(n).replace(".", r"\.") + "$": {"bits": b, "group_size": g, "sym": sy}
                   for n, (b, g, sy) in schemes.items() if (b, g, sy) != base}
        q = {"quant_method": "gptq", "bits": base[0], "group_size": base[1], "desc_act": False, "sym": base[2],
             "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq",
             "meta": {"quantizer": ["qconvert"]}}
        return {**q, "dynamic": dynamic} if dynamic else q
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for n, sc in schemes.items():
        groups.setdefault(sc, []).append(_module(n))
    cg = {}
    for i, ((b, g, sy), mods) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        cg[f"group_{i}"] = {"targets": ["Linear"] if len(groups) == 1 else mods, "format": "pack-quantized",
                            "weights": {"num_bits": b, "type": "int", "symmetric": sy, "strategy": "group",
                                        "group_size": g, "dynamic": False}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": cg, "ignore": ["lm_head"]}


def write_export(src: Source, out: Path, to: str, force: bool = False, progress: bool = True,
                 max_shard_bytes: int = 4 << 30, floats: Source | None = None, widen: bool = False) -> str:
    """Write int4 Source ``src`` as a ``to`` checkpoint (gptq | awq | compressed-tensors) in folder ``out``;
    returns the summary line. Nothing is written when a matrix cannot be held (QConvertError first).
    ``floats``: where the tensors written as F16 come from (default ``src``; the model ``src`` was quantised
    from keeps the embedding and head as they were)."""
    xp = check_exportable(src, to, widen)
    mats = xp.mats
    lay = LAYOUTS[to]
    cfg = src.config
    plan: list[tuple[str, str, tuple[int, ...], str]] = []  # (stored name, dtype, shape, canonical)
    for n in canonical_names(cfg):
        if n in mats:
            plan += [(f"{_module(n)}.{sfx}", dt, shp, n) for sfx, dt, shp in part_shapes(mats[n], lay, xp.width[n])]
        else:
            plan.append((n, "F16", canonical_shape(n, cfg), n))
    sizes = {"I32": 4, "I64": 8, "F16": 2}
    shards: list[list[tuple[str, str, tuple[int, ...], str]]] = [[]]
    size = 0
    for item in plan:
        nb = sizes[item[1]] * int(np.prod(item[2]))
        if shards[-1] and size + nb > max_shard_bytes and item[3] != shards[-1][-1][3]:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nb
    fnames = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stats = ExportStats(dense=list(xp.dense))
    fsrc = floats or src
    stats.dequantised = [n for n in HEADS if fsrc.tensors.get(n) is not None and fsrc.tensors[n].quant]
    total = sum(sizes[dt] * int(np.prod(shp)) for _, dt, shp, _ in plan)
    with atomic_dir(Path(out), force) as tmp, bar(total, f"exporting {to}", progress) as pb:
        for fname, shard in zip(fnames, shards):
            with open(tmp / fname, "wb") as f:
                w = SafetensorsWriter(f, [(a, b, c) for a, b, c, _ in shard], metadata={"format": "pt"})
                done: set[str] = set()
                for _, dt, shp, n in shard:
                    if n in done:
                        continue
                    done.add(n)
                    if n in mats:
                        for _, arr in packed_parts(mats[n], lay, stats, xp.width[n]):
                            w.write(arr)
                            pb.update(arr.nbytes)
                    else:  # an unquantised module keeps the int4 values; the rest come from ``floats``
                        for chunk in stream_converted((src if n in xp.dense else fsrc).tensors[n], "F16"):
                            w.write(chunk)
                            pb.update(chunk.nbytes)
        if len(shards) > 1:
            wm = {a: fname for fname, shard in zip(fnames, shards) for a, _, _, _ in shard}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
        c = cfg.replace(dtype="float16").to_hf_dict()
        c["quantization_config"] = quantization_config(to, xp)
        _json(tmp / "config.json", c)
        if src.generation_config:
            _json(tmp / "generation_config.json", src.generation_config)
        for fname, obj in src.tokenizer.to_hf_files().items():
            _json(tmp / fname, obj)
    return stats.summary(to, len(mats))


def _json(p: Path, obj: Any) -> None:
    p.write_text(json.dumps(obj, indent=None if p.name == "tokenizer.json" else 2, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    os.chmod(p, 0o644)
