"""The int4 writer (docs/int4-format.md): quantises a Source matrix by matrix, chunk by chunk, with the
quantiser it is given, and streams ``model.int4.safetensors`` plus config and tokenizer into a folder that
appears whole (formats/int4/layout.py: the stored form; formats/int4/read.py: the reader)."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from formats.container.safetensors_io import SafetensorsWriter
from formats.errors import QConvertError
from formats.files.atomic import atomic_dir
from formats.files.progress import bar
from formats.int4.layout import (FILENAME, FORMAT, PLAIN_VERSION, ZEROS_VERSION, Quantiser, QuantSpec, dequant_rows,
                                 offsets_part, offsets_shape, pack, row_bytes)
from formats.model.names import canonical_names, canonical_shape
from formats.model.source import Source
from formats.model.tensor import row_chunks, stream_converted


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
