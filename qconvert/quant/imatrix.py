"""Computing an importance matrix with the reference decoder, counted as llama.cpp's ``llama-imatrix`` counts.

The calibration text is cut into windows of ``ctx`` tokens, each run from an empty cache (as llama-imatrix
runs its chunks). Every decoder-layer matrix records, per input column, the sum of the squared inputs it
multiplies and the number of tokens: q/k/v share one input and get three equal entries, as do gate/up;
each MoE expert counts only the tokens routed to it, in its row of the stacked ``ffn_*_exps`` entry. The
embedding (a lookup) and the output head are not recorded (llama-imatrix's default). Entries are named by
GGUF tensor, so the file is interchangeable with llama-imatrix's (formats/gguf/imatrix.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from formats.files.atomic import check_target
from formats.files.progress import bar
from formats.gguf.imatrix import Imatrix, ImatrixEntry, write_imatrix
from formats.model.names import hf_to_gguf
from formats.model.source import Source
from formats.open import open_model
from qconvert.corpus import CALIB_MODULES, stdlib_text, tokens_digest, windows
from qconvert.text import encode


class _Squares:
    """Wraps a decoder Matrix: accumulates the column sums of x^2 (float64) and the token count."""

    def __init__(self, mat):
        self.mat, self.sums, self.n = mat, np.zeros(mat.cols, np.float64), 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        self.sums += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        self.n += x.shape[0]
        return self.mat(x)

    def split(self, y: np.ndarray) -> list[np.ndarray]:
        return self.mat.split(y)


def compute_imatrix(src: Source, windows: list[np.ndarray], dataset: str = "",
                    on_window: Callable[[int, int], None] | None = None) -> Imatrix:
    """Importance matrix of ``src`` over token ``windows`` (each run from an empty cache).

    ``dataset`` is recorded as the file's ``imatrix.datasets``; ``on_window(done, total)`` reports progress.
    """
    from qconvert.decoder.numpy_backend import NumpyDecoder

    dec = NumpyDecoder(src, stream=True)
    cfg = dec.cfg
    rec: dict[str, _Squares] = {}
    for name, mat in list(dec.m.items()):
        if name.startswith("model.layers.") and mat.rows > 0:
            rec[name] = dec.m[name] = _Squares(mat)
    ctx = max(len(w) for w in windows)
    for k, w in enumerate(windows):
        dec.hidden(np.asarray(w), dec.new_cache(ctx))
        if on_window:
            on_window(k + 1, len(windows))
    fused = {}
    for n in dec.layers:
        fused[n.q] = (n.q, n.k, n.v)
        if not cfg.is_moe:
            fused[n.gate] = (n.gate, n.up)
    entries: dict[str, ImatrixEntry] = {}
    for name, r in rec.items():
        for member in fused.get(name, (name,)):
            gname, expert = hf_to_gguf(member)
            if expert is None:
                entries[gname] = ImatrixEntry(r.sums.astype(np.float32)[None, :], np.array([r.n], np.int64))
                continue
            e = entries.setdefault(gname, ImatrixEntry(np.zeros((cfg.num_experts, r.sums.size), np.float32),
                                                       np.zeros(cfg.num_experts, np.int64)))
            e.sums[expert], e.counts[expert] = r.sums, r.n
    return Imatrix(entries, [dataset] if dataset else [], len(windows), ctx)


def imatrix_file(location: str, out: Path, calib: Path | None = None, ctx: int = 512, chunks: int | None = None,
                 force: bool = False, progress: bool = True) -> str:
    """The importance matrix of a model over the calibration text (default: qconvert/corpus.py's standard-library
    modules), written in llama.cpp's imatrix GGUF layout; the summary line."""
    check_target(out, force)
    t0 = time.perf_counter()
    text = calib.read_text(encoding="utf-8", errors="replace") if calib else stdlib_text(CALIB_MODULES)
    with open_model(location) as s:
        ids = encode(s.tokenizer, text)
        ws = windows(ids, chunks or len(ids) // ctx, ctx)
        with bar(len(ws), "imatrix chunks", progress) as pb:
            im = compute_imatrix(s, ws, str(calib) if calib else "python-stdlib:" + ",".join(CALIB_MODULES),
                                 on_window=lambda k, n: pb.update(1))
    write_imatrix(im, out, force)
    return f"wrote {out}: {len(im.entries)} entries from {len(ws)} x {ctx} tokens (ids {tokens_digest(ws)}) " \
           f"in {time.perf_counter() - t0:.1f}s"
