"""Fixed texts for calibration and evaluation, taken from the running Python's standard library.

Quantisation quality is measured on source code a coder model sees every day; calibration (GPTQ)
and evaluation use disjoint module lists so a method is never scored on the text it was fitted to.
The modules are read from ``sysconfig``'s stdlib folder, so figures are reproducible for one Python
version (the benchmark prints the version and a hash of the token ids).
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

from formats.errors import QConvertError

CALIB_MODULES = ("json/decoder.py", "json/encoder.py", "argparse.py", "csv.py", "shlex.py", "fractions.py",
                 "string.py", "bisect.py", "calendar.py", "contextlib.py")
EVAL_MODULES = ("textwrap.py", "heapq.py", "functools.py", "dataclasses.py", "pathlib.py", "statistics.py",
                "configparser.py", "difflib.py")


def stdlib_text(modules: tuple[str, ...]) -> str:
    """The concatenated source of ``modules`` (paths relative to the stdlib folder)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for m in modules:
        p = root / m
        if not p.is_file():
            raise QConvertError(f"standard-library module {p} not found; pass a text file instead (--calib FILE)")
        parts.append(p.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def windows(tokens: list[int], n: int, ctx: int) -> list[np.ndarray]:
    """``n`` consecutive, non-overlapping windows of ``ctx`` tokens (fewer if the text is short)."""
    out = [np.asarray(tokens[i * ctx:(i + 1) * ctx], np.int64) for i in range(n)]
    out = [w for w in out if len(w) == ctx]
    if not out:
        raise QConvertError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}; use a longer text")
    return out


def tokens_digest(ws: list[np.ndarray]) -> str:
    """Short hash of token windows, printed next to figures so runs can be matched."""
    h = hashlib.sha256()
    for w in ws:
        h.update(np.asarray(w, np.int64).tobytes())
    return h.hexdigest()[:12]
