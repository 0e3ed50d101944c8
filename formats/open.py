"""Open any supported model location as a Source: a .gguf file, an int4 folder, an HF folder, or a Hub repo id."""
from __future__ import annotations

from pathlib import Path

from formats.errors import QConvertError
from formats.model.source import Source


def open_model(location: str) -> Source:
    """Dispatch on what ``location`` is: GGUF file (by magic), HF folder, or ``org/name`` Hub id."""
    p = Path(location)
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from formats.gguf.read import open_gguf
            return open_gguf(p)
        raise QConvertError(f"{p}: not a GGUF file (bad magic) and not a model folder; pass a .gguf file or an HF folder")
    from formats.int4.layout import is_int4_dir
    from formats.int4.read import open_int4
    if p.is_dir() and is_int4_dir(p):
        return open_int4(p)
    from formats.hf.read import open_hf
    return open_hf(location)
