"""Reading the JSON files of a model folder (config, tokenizer, index, int4 metadata) with limits.

A hostile JSON file must not exhaust memory or the stack: the file size is capped per kind of file, nesting
deeper than ``MAX_DEPTH`` is refused, and every failure is one QConvertError naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formats.errors import QConvertError

MAX_DEPTH = 64
LIMITS = {"config": 1 << 20, "tokenizer": 64 << 20, "index": 64 << 20, "metadata": 16 << 20}


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def loads(text: str | bytes, where: str, kind: str = "config", expect: type = dict) -> Any:
    """Parse JSON text from ``where`` (a file name for messages) within the limits of ``kind``; the result
    must be an instance of ``expect``."""
    if len(text) > LIMITS[kind]:
        raise QConvertError(f"{where}: {len(text)} bytes is larger than any real {kind} file "
                            f"({LIMITS[kind]} bytes at most); the file is damaged or not a {kind} file")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise QConvertError(f"{where}: JSON nested too deeply; the file is damaged") from None
    except (ValueError, TypeError) as e:
        raise QConvertError(f"{where}: not valid JSON ({e}); the file is damaged, download or write it again") from None
    if not _depth_ok(obj, MAX_DEPTH):
        raise QConvertError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels; the file is damaged")
    if not isinstance(obj, expect):
        raise QConvertError(f"{where}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                            f"got {type(obj).__name__}; the file is damaged")
    return obj


def load(path: str | Path, kind: str = "config", expect: type = dict) -> Any:
    """Read and parse the JSON file ``path`` (see ``loads``)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > LIMITS[kind]:
            return loads(b" " * (LIMITS[kind] + 1), str(p), kind, expect)  # one message for oversize files
        raw = p.read_bytes()
    except OSError as e:
        raise QConvertError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QConvertError(f"{p}: not UTF-8 text (byte {e.start}); the file is damaged") from None
    return loads(text, str(p), kind, expect)
