"""qconvert's int4 layout (docs/int4-format.md): a writer that streams, and a lazy reader.

One ``model.int4.safetensors`` holds, for every quantised matrix ``W`` [rows, cols], the tensors
``W.qweight`` (uint8 codes: two 4-bit codes per byte, low nibble first, for 4 bits; one code per byte
otherwise), ``W.scales`` (f16 [rows, groups]) and, when asymmetric, ``W.offsets`` (f16 [rows, groups]);
1-D tensors are stored as F32. The header's ``__metadata__`` carries the format name, version and the
quantisation choices so a reader repeats them.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from formats.config import ModelConfig
from formats.errors import QConvertError
from formats.names import canonical_names, canonical_shape
from formats.output import atomic_dir
from formats.progress import bar
from formats.safetensors_io import SafetensorsFile, SafetensorsWriter
from formats.source import Source
from formats.tensor import LazyTensor, row_chunks, stream_converted
from formats.tokenizer import TokenizerData

FORMAT, VERSION, FILENAME = "qconvert-int4", "1", "model.int4.safetensors"


def is_int4_dir(d: Path) -> bool:
    """True for a folder written by ``write_int4``."""
    return (Path(d) / FILENAME).is_file()


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, cols] -> stored bytes: 4-bit codes two per byte (low nibble = even column)."""
    if bits != 4:
        return q
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), np.uint8)], axis=1)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(b: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Stored bytes -> codes [rows, cols]."""
    if bits != 4:
        return b
    out = np.empty((b.shape[0], b.shape[1] * 2), np.uint8)
    out[:, 0::2] = b & 0x0F
    out[:, 1::2] = b >> 4
    return out[:, :cols]


def dequant_rows(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, bits: int, group: int) -> np.ndarray:
    """float32 rows from codes and f16 (raw uint16) scales / offsets: a few vectorised numpy ops."""
    rows, cols = codes.shape
    ng = scales.shape[1]
    pad = ng * group - cols
    c = codes if pad == 0 else np.concatenate([codes, np.zeros((rows, pad), np.uint8)], axis=1)
    c = c.reshape(rows, ng, group).astype(np.float32)
    s = scales.view(np.float16).astype(np.float32)[:, :, None]
    if offsets is None:
        out = (c - np.float32(1 << (bits - 1))) * s
    else:
        out = c * s + offsets.view(np.float16).astype(np.float32)[:, :, None]
    return out.reshape(rows, ng * group)[:, :cols]


def write_int4(src: Source, out: Path, bits: int = 4, group_size: int = 128, sym: bool = False,
               method: str = "search", force: bool = False, progress: bool = True, head_bits: int = 8,
               on_tensor: Callable[[str, float], None] | None = None,
               precomputed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantise every 2-D tensor of ``src`` group-wise and write the int4 folder. Returns a summary.

    The output head (``lm_head``, or the embedding of a tied model) gets ``head_bits`` (8 by default,
    as llama.cpp keeps its head at Q8_0/Q6_K). ``on_tensor(name, rel_rmse)`` is called after each matrix.
    ``precomputed`` maps tensor names to ready GroupQuant results (e.g. from GPTQ, ``method`` names it)
    with the same bits and group size; those matrices are stored as given.
    """
    from qconvert.quant.groupwise import GroupQuant, quantize  # the maths lives in qconvert/quant

    cfg = src.config
    names = canonical_names(cfg)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    plan, qinfo = [], {}
    for n in names:
        shape = canonical_shape(n, cfg)
        if len(shape) == 1 or shape[0] == 1 or n.endswith("mlp.gate.weight"):
            plan.append((n, "F32", shape))
            continue
        rows, cols = shape
        ng = -(-cols // group_size)
        b = head_bits if n == head else bits
        plan.append((f"{n}.qweight", "U8", (rows, (cols + 1) // 2 if b == 4 else cols)))
        plan.append((f"{n}.scales", "F16", (rows, ng)))
        if not sym:
            plan.append((f"{n}.offsets", "F16", (rows, ng)))
        qinfo[n] = {"shape": [rows, cols], "bits": b}
    meta = {"bits": bits, "head_bits": head_bits, "group_size": group_size, "scheme": "sym" if sym else "asym",
            "method": method}
    header_meta = {"format": FORMAT, "version": VERSION, "quantization": json.dumps(meta),
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
                scales, offsets, err, ref = [], [], 0.0, 0.0
                b = qinfo[n]["bits"]
                pre = (precomputed or {}).get(n)
                for r0, r1 in row_chunks(t, 1 << 22):
                    x = t.rows(r0, r1)
                    if pre is not None:
                        g = GroupQuant(pre.q[r0:r1], pre.scales[r0:r1],
                                       None if pre.offsets is None else pre.offsets[r0:r1], b, group_size)
                    else:
                        g = quantize(x, b, group_size, sym, "search" if method == "gptq" else method, pool)
                    w.write(pack(g.q, b))
                    scales.append(g.scales)
                    if g.offsets is not None:
                        offsets.append(g.offsets)
                    if g.sq_err is None:
                        g.sq_err = float(np.square(dequant_rows(g.q, g.scales, g.offsets, b, group_size) - x).sum())
                    err += g.sq_err
                    flat = x.reshape(-1)
                    ref += float(np.dot(flat, flat))
                    pb.update(x.nbytes)
                w.write(np.concatenate(scales))
                if offsets:
                    w.write(np.concatenate(offsets))
                rel = float(np.sqrt(err / max(ref, 1e-30)))
                stats["errors"][n] = rel
                if n != head:
                    stats["quantised_params"] += t.n_rows * t.row_len
                if on_tensor:
                    on_tensor(n, rel)
        stats["quantised_bytes"] = sum(int(np.prod(s)) * (1 if dt == "U8" else 2) for name, dt, s in plan
                                       if dt != "F32" and name.rsplit(".", 1)[0] != head)
        c = cfg.to_hf_dict()
        c["quantization_config"] = {"quant_method": FORMAT, "version": VERSION, **meta}
        _json(tmp / "config.json", c)
        if src.generation_config:
            _json(tmp / "generation_config.json", src.generation_config)
        for fname, obj in src.tokenizer.to_hf_files().items():
            _json(tmp / fname, obj)
    stats["bits_per_weight"] = 8 * stats["quantised_bytes"] / max(1, stats["quantised_params"])  # head excluded
    stats["head"] = (head, head_bits)
    stats["dir_bytes"] = sum(p.stat().st_size for p in Path(out).iterdir())
    return stats


def _json(p: Path, obj: Any) -> None:
    p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.chmod(p, 0o644)


def open_int4(d: Path) -> Source:
    """Open an int4 folder as a Source; matrices dequantise row ranges on the fly (float32)."""
    d = Path(d)
    raw_cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg = ModelConfig.from_hf_dict(raw_cfg, str(d / "config.json"))
    f = SafetensorsFile(d / FILENAME)
    meta = f.header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        f.close()
        raise QConvertError(f"{d / FILENAME}: not a {FORMAT} file; write it with `qconvert quantize --format int4`")
    if meta.get("version") != VERSION:
        f.close()
        raise QConvertError(f"{d / FILENAME}: int4 layout version {meta.get('version')} is not supported (this "
                            f"qconvert reads version {VERSION}); upgrade qconvert")
    q = json.loads(meta["quantization"])
    bits, group, sym = int(q["bits"]), int(q["group_size"]), q["scheme"] == "sym"
    src = Source(config=cfg, tokenizer=TokenizerData.from_hf_dir(d, raw_cfg), tensors={}, path=str(d), kind="int4",
                 closers=[f.close])
    if (d / "generation_config.json").is_file():
        src.generation_config = json.loads((d / "generation_config.json").read_text())
    per = json.loads(meta.get("tensors", "{}"))
    for n in canonical_names(cfg):
        if n in f.header:
            src.tensors[n] = f.tensor(n)
            continue
        qw, sc = f.tensor(f"{n}.qweight"), f.tensor(f"{n}.scales")
        of = f.tensor(f"{n}.offsets") if not sym else None
        shape = canonical_shape(n, cfg)
        b = int(per.get(n, {}).get("bits", bits))
        reader = _reader(qw, sc, of, b, group, shape[1])
        stored = qw.nbytes + sc.nbytes + (of.nbytes if of is not None else 0)
        label = f"int{b} g{group} {'sym' if sym else 'asym'}"
        src.tensors[n] = LazyTensor(n, shape, "F32", reader, quant=label, stored_nbytes=stored)
    src.check_complete()
    return src


def _reader(qw: LazyTensor, sc: LazyTensor, of: LazyTensor | None, bits: int, group: int, cols: int):
    def read(start: int, stop: int) -> np.ndarray:
        codes = unpack(qw.raw_rows(start, stop).reshape(stop - start, -1), bits, cols)
        s = sc.raw_rows(start, stop).view(np.uint16).reshape(stop - start, -1)
        o = of.raw_rows(start, stop).view(np.uint16).reshape(stop - start, -1) if of is not None else None
        return dequant_rows(codes, s, o, bits, group).astype(np.float32).reshape(-1).view(np.uint8)
    return read
