"""HF writing: a Source streamed into sharded safetensors + index, ``config.json``, ``generation_config.json``
and tokenizer files that transformers loads (the folder appears whole, or not at all)."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from formats.container.safetensors_io import SafetensorsWriter
from formats.errors import QConvertError
from formats.files.atomic import atomic_dir
from formats.files.progress import bar
from formats.ggml.dtypes import HF_DTYPES, TORCH_NAMES
from formats.model.names import canonical_names, canonical_shape
from formats.model.source import Source
from formats.model.tensor import stream_converted

DEFAULT_SHARD_BYTES = 4 << 30


def write_hf(src: Source, out: Path, dtype: str = "bf16", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
             force: bool = False, progress: bool = True) -> list[Path]:
    """Write ``src`` as an HF folder (sharded safetensors in ``dtype``: bf16|f16|f32). Returns the shard paths."""

    if dtype not in HF_DTYPES:
        raise QConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(HF_DTYPES)}")
    st = HF_DTYPES[dtype]
    cfg = src.config.replace(dtype=TORCH_NAMES[st])
    names = canonical_names(cfg)
    plan = [(n, st, canonical_shape(n, cfg)) for n in names]
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[st]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for item in plan:
        n = itemsize * _numel(item[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    total = sum(itemsize * _numel(s) for _, _, s in plan)
    fnames = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_dir(Path(out), force) as tmp, ThreadPoolExecutor(2) as pool, \
            bar(total, f"writing {Path(out).name}", progress) as pb:
        for fname, shard in zip(fnames, shards):
            with open(tmp / fname, "wb") as f:
                w = SafetensorsWriter(f, shard)
                for name, _, shape in shard:
                    for chunk in stream_converted(src.tensors[name], st, pool):
                        w.write(chunk)
                        pb.update(chunk.nbytes)
        if len(shards) > 1:
            wm = {name: fname for fname, shard in zip(fnames, shards) for name, _, _ in shard}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
        _write_json(tmp / "config.json", cfg.to_hf_dict())
        gen = dict(src.generation_config) or {}
        gen.setdefault("bos_token_id", cfg.bos_token_id if cfg.bos_token_id is not None else src.tokenizer.bos_id)
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else src.tokenizer.eos_id
        gen.setdefault("eos_token_id", eos)
        if src.tokenizer.pad_id is not None:
            gen.setdefault("pad_token_id", src.tokenizer.pad_id)
        gen.setdefault("do_sample", False)
        _write_json(tmp / "generation_config.json", gen)
        for fname, obj in src.tokenizer.to_hf_files().items():
            _write_json(tmp / fname, obj)
    return [Path(out) / f for f in fnames]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_json(p: Path, obj: Any) -> None:
    with open(p, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.chmod(p, 0o644)
