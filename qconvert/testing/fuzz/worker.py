"""One fuzz worker process: reads case requests (JSON lines) on stdin, runs each case in-process through the
reader and, when the reader accepts it, through a conversion and the decoder, and writes one result line per
case on the result pipe. A crash, hang or runaway allocation ends only this process; the harness restarts it.

Result kinds: ``clean`` (one QConvertError), ``accepted`` (converted, and the output equals what the input
claims), ``mismatch`` (accepted but the output differs), ``traceback`` (any other exception), ``memory``
(MemoryError). Each result carries the case's peak RSS (VmHWM, reset before the case) and its time.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from formats.errors import QConvertError

TOKENS = [1, 17, 256, 300, 302]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _same_tensors(a: Any, b: Any) -> str | None:
    """None when every tensor of source ``b`` equals ``a``'s bit for bit (as float32), else the first difference."""
    for n, t in a.tensors.items():
        x = t.rows(0, t.n_rows)
        y = b.tensors[n].rows(0, b.tensors[n].n_rows)
        if x.shape != y.shape or not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            return f"tensor {n} differs after conversion"
    return None


def _logits(src: Any) -> str | None:
    from qconvert.decoder import make_decoder
    toks = [t for t in TOKENS if t < src.config.vocab_size]
    out = make_decoder(src, "numpy").logits(toks)
    if out.shape != (len(toks), src.config.vocab_size):
        return f"logits shape {out.shape}"
    return None


def run_case(reader: str, loc: Path, tmp: Path) -> tuple[str, str]:
    """Run one case; (kind, detail)."""
    from formats.gguf.read import open_gguf
    from formats.gguf.write import write_gguf
    from formats.hf.read import open_hf
    from formats.hf.write import write_hf
    from formats.open import open_model

    try:
        if reader == "template":
            from qconvert.text import render_chat
            with open_model(str(loc)) as src:
                a = render_chat(src.tokenizer, MESSAGES)
                b = render_chat(src.tokenizer, MESSAGES)
            return ("accepted", "") if isinstance(a, str) and a == b else ("mismatch", "render not deterministic")
        with open_model(str(loc)) as src:
            if reader == "tokenizer":
                from qconvert.text import encode
                ids = encode(src.tokenizer, "Hello <|im_start|>world\n")
                if any(not 0 <= i < len(src.tokenizer.tokens) for i in ids):
                    return "mismatch", f"token id outside the vocabulary: {ids}"
            if src.kind == "gguf" and os.path.getsize(loc) > 64 << 20:
                return "accepted", "real header: metadata only"
            if src.kind == "gguf":
                out = tmp / "out-hf"
                write_hf(src, out, dtype="f32", force=True, progress=False)
                with open_hf(str(out)) as back:
                    bad = _same_tensors(src, back) or _same_config(src, back)
            else:
                out = tmp / "out.gguf"
                write_gguf(src, out, "f32", force=True, progress=False)
                with open_gguf(out) as back:
                    bad = _same_tensors(src, back) or _same_config(src, back)
                    if not bad and back.tokenizer.tokens[:src.tokenizer.n_real] != src.tokenizer.tokens[:src.tokenizer.n_real]:
                        bad = "tokens differ after conversion"
            bad = bad or _logits(src)
        return ("mismatch", bad) if bad else ("accepted", "")
    except QConvertError as e:
        msg = str(e)
        return ("clean", msg[:300]) if msg and "\n" not in msg else ("traceback", f"multi-line error: {msg[:300]}")
    except MemoryError:
        return "memory", "MemoryError"


def _same_config(a: Any, b: Any) -> str | None:
    da, db = a.config.to_hf_dict(), b.config.to_hf_dict()
    for k in set(da) | set(db):
        if k in ("torch_dtype", "dtype", "_name_or_path", "bos_token_id", "eos_token_id"):
            continue  # GGUF carries one bos / eos id, the tokenizer's: compared below
        if da.get(k) != db.get(k) and not (isinstance(da.get(k), float) and np.isclose(da[k], db.get(k), rtol=1e-6)):
            return f"config {k}: {da.get(k)!r} became {db.get(k)!r}"
    ta, tb = a.tokenizer, b.tokenizer
    if (ta.bos_id, ta.eos_id, ta.pad_id, ta.chat_template) != (tb.bos_id, tb.eos_id, tb.pad_id, tb.chat_template):
        return "tokenizer special ids or chat template differ after conversion"
    return None


def main() -> None:
    """Serve cases until stdin closes."""
    from qconvert.testing.fuzz.mutate import make_case
    from qconvert.testing.fuzz.seeds import make_seeds

    res = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the readers print goes to the log, not the result pipe
    seeds = make_seeds(Path(os.environ["QCONVERT_FUZZ_SEEDS"]))
    limit = int(os.environ.get("QCONVERT_FUZZ_AS", 0))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = Path(tempfile.mkdtemp(prefix="fuzzw-"))
    for line in sys.stdin:
        req = json.loads(line)
        work = base / "case"
        t0 = time.monotonic()
        _peak_rss_reset()
        loc, label = make_case(req["reader"], seeds, req["seed"], req["index"], work)
        try:
            kind, detail = run_case(req["reader"], loc, base / "case")
        except MemoryError:
            kind, detail = "memory", "MemoryError"
        except Exception:  # noqa: BLE001 - a finding: report it, keep serving
            kind, detail = "traceback", traceback.format_exc(limit=-4)[-1500:]
        res.write(json.dumps({"index": req["index"], "kind": kind, "label": label, "detail": detail,
                              "rss": _peak_rss(), "secs": time.monotonic() - t0}) + "\n")


if __name__ == "__main__":
    main()
