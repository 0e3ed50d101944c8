"""GGUF reading: a lazy Source over any GGUF file, plain or split (every type the gguf package decodes).

Tensors are memory-mapped and read by row range under their canonical HF names; Qwen2-MoE's stacked
``ffn_*_exps`` are split per expert. The header is parsed by formats/gguf/header.py (validated before use).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from formats.errors import QConvertError
from formats.files.mapped import MappedFile, pread_exact
from formats.ggml.dtypes import row_nbytes
from formats.gguf.split import read_parts
from formats.model.config import ModelConfig
from formats.model.names import canonical_shape, gguf_to_hf
from formats.model.source import Source
from formats.model.tensor import LazyTensor
from formats.model.tokenizer import TokenizerData

if TYPE_CHECKING:
    pass


def open_gguf(path: str | Path) -> Source:
    """Open a GGUF file, plain or the first part of a split one, as a Source (canonical HF names; stacked
    experts split per expert)."""
    path = Path(path)
    if not path.is_file():
        raise QConvertError(f"{path}: no such file; pass a .gguf file")
    kv, parts = read_parts(path)
    tok = TokenizerData.from_gguf_kv(kv, str(path))
    by_name = {t.name: t for _, infos in parts for t in infos}
    if "token_embd.weight" not in by_name:
        raise QConvertError(f"{path}: no token_embd.weight; not a Qwen2 GGUF")
    vocab = by_name["token_embd.weight"].shape[0]
    cfg = ModelConfig.from_gguf_kv(kv, vocab, tied="output.weight" not in by_name, where=str(path))
    fds = [os.open(p, os.O_RDONLY) for p, _ in parts]
    mapping: dict[int, MappedFile] = {}  # made on first use (the decoders); conversions pread

    def viewer(k: int) -> Callable[[int, int], np.ndarray]:
        def view(offset: int, nbytes: int) -> np.ndarray:
            if k not in mapping:
                mapping[k] = MappedFile(str(parts[k][0]))
            return mapping[k].view(offset, nbytes)
        return view

    def close() -> None:
        for fd in fds:
            os.close(fd)
        for m in mapping.values():
            m.close()
    src = Source(config=cfg, tokenizer=tok, tensors={}, path=str(path), kind="gguf", closers=[close])
    src.parts = len(parts)
    for k, (ppath, infos) in enumerate(parts):
        for ti in infos:
            try:
                names = gguf_to_hf(ti.name, cfg.num_experts)
            except KeyError:
                src.close()
                raise QConvertError(f"{ppath}: unknown tensor {ti.name!r} for {cfg.arch}; the file is not a plain "
                                    "Qwen2 / Qwen2-MoE model") from None
            want = canonical_shape(names[0], cfg)
            per = int(np.prod(want))
            if int(np.prod(ti.shape)) != per * len(names):
                src.close()
                raise QConvertError(f"{ppath}: tensor {ti.name} has shape {list(ti.shape)}, config implies "
                                    f"{len(names)} x {list(want)}")
            rb = row_nbytes(ti.type, want[-1])
            rows_per = per // want[-1]
            for e, name in enumerate(names):
                base = ti.offset + e * rows_per * rb
                src.tensors[name] = LazyTensor(name, want, ti.type, _reader(fds[k], base, rb, str(ppath), ti.name),
                                               mapper=_mapper(viewer(k), base, rows_per, rb))
    src.check_complete()
    return src


def _reader(fd: int, base: int, row_bytes: int, path: str, what: str):
    def read(start: int, stop: int) -> np.ndarray:
        return pread_exact(fd, (stop - start) * row_bytes, base + start * row_bytes, path, f"tensor {what}")
    return read


def _mapper(view: Callable[[int, int], np.ndarray], base: int, rows: int, row_bytes: int):
    return lambda: view(base, rows * row_bytes).reshape(rows, row_bytes)
