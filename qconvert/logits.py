"""Logits of a model on a text, streamed: the tokens a command evaluates, the model's logits a chunk at a time
(the decoder holds one layer of weights), and an .npz written chunk by chunk."""
from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from formats.errors import QConvertError
from formats.files.atomic import atomic_file, check_target
from formats.model.source import Source
from formats.open import open_model
from qconvert.decoder import make_decoder
from qconvert.text import encode

DEFAULT_TEXT = Path(__file__).parent / "data" / "verify.txt"


def tokens(src: Source, text: Path | None, token_ids: Path | None, ctx: int) -> list[int]:
    """The first ``ctx`` token ids of ``text`` (default: the built-in sample), or the ids of a JSON list."""
    if token_ids is not None:
        try:
            ids = json.loads(token_ids.read_text())
        except (OSError, ValueError) as e:
            raise QConvertError(f"{token_ids}: cannot read token ids ({e}); expected a JSON list of integers") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise QConvertError(f"{token_ids}: expected a JSON list of integers")
        bad = [i for i in ids if not 0 <= i < src.config.vocab_size]
        if bad:
            raise QConvertError(f"{token_ids}: token id {bad[0]} outside the vocabulary (0..{src.config.vocab_size - 1})")
    else:
        path = text or DEFAULT_TEXT
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QConvertError(f"{path}: cannot read text ({e})") from None
        ids = encode(src.tokenizer, body)
    if len(ids) < 2:
        raise QConvertError("need at least 2 tokens; give a longer --text")
    return ids[:ctx]


def logit_chunks(location: str, ids: list[int], backend: str, device: str, dtype: str) -> Iterator[np.ndarray]:
    """The model's logits for ``ids``, [≤128, vocab] float32 at a time; the decoder streams its weights
    layer by layer, so memory stays at about one layer whatever the model's size."""
    with open_model(location) as src:
        dec = make_decoder(src, backend, device, dtype, stream=True)
        for chunk in dec.logit_chunks(ids):
            yield np.asarray(chunk, dtype=np.float32)
        del dec


def write_npz_streamed(path: Path, ids: list[int], chunks: Iterator[np.ndarray]) -> tuple[int, int]:
    """An .npz with ``token_ids`` and ``logits`` whose logits are appended chunk by chunk (np.load reads it)."""
    first = next(chunks)
    n, vocab = len(ids), first.shape[1]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("token_ids.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(ids, dtype=np.int32))
        with z.open("logits.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, vocab)})
            for c in (first, *chunks):
                f.write(np.ascontiguousarray(c, dtype="<f4").tobytes())
    return n, vocab


def write_logits(location: str, out: Path, text: Path | None = None, token_ids: Path | None = None, ctx: int = 512,
                 force: bool = False, backend: str = "numpy", device: str = "cpu", dtype: str = "float32") -> str:
    """``token_ids`` and ``logits`` of a model on a text, written to an .npz; the summary line."""
    if text is not None and token_ids is not None:
        raise QConvertError("give either --text or --token-ids, not both")
    check_target(out, force)
    with open_model(location) as src:
        ids = tokens(src, text, token_ids, ctx)
    t0 = time.perf_counter()
    with atomic_file(out, force) as tmp:
        n, vocab = write_npz_streamed(tmp, ids, logit_chunks(location, ids, backend, device, dtype))
    return f"wrote {out}: {n} tokens x {vocab} logits ({backend}, {time.perf_counter() - t0:.1f}s)"
