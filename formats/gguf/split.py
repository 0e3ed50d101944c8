"""Split GGUF files as llama.cpp writes and reads them (``llama-gguf-split``, ``convert_hf_to_gguf.py --split-*``).

A model of N parts is ``NAME-00001-of-0000N.gguf`` ... ``NAME-0000N-of-0000N.gguf``. The first part holds all the
metadata, then ``split.no`` (u16, 0-based), ``split.count`` (u16) and ``split.tensors.count`` (i32, the tensors of
all parts); later parts hold only those three keys. Tensors keep their order; each part has its own tensor table
and aligned data. A part is started when the next tensor would push the current part's data past the size limit
(padded tensor sizes, metadata not counted) or when the tensor limit is reached; a part is never empty.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from formats.errors import QConvertError
from formats.gguf.header import GGUFTensorInfo, read_header

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
_PART = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def part_path(out: Path, no: int, count: int) -> Path:
    """Path of part ``no`` (0-based) of ``count`` for an output named ``out`` (``dir/name.gguf``)."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return out.with_name(f"{stem}-{no + 1:05d}-of-{count:05d}.gguf")


def parse_size(text: str) -> int:
    """'200M' / '2G' (decimal, as llama-gguf-split counts: M = 1000^2 bytes, G = 1000^3) or a byte count."""
    t = str(text).strip().upper()
    mult = {"K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t)
    except ValueError:
        raise QConvertError(f"--split-max-size {text!r}: expected a size such as 200M or 2G") from None
    if n <= 0:
        raise QConvertError(f"--split-max-size {text!r}: the size must be positive")
    return n * mult


def plan_parts(nbytes: list[int], max_size: int | None = None, max_tensors: int | None = None,
               align: int = 32) -> list[list[int]]:
    """Indices of the tensors of each part, in order (one part when no limit is given)."""
    parts: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(nbytes):
        padded = -(-n // align) * align
        full = (max_size is not None and size + padded > max_size) or \
               (max_tensors is not None and len(parts[-1]) >= max_tensors)
        if parts[-1] and full:
            parts.append([])
            size = 0
        parts[-1].append(i)
        size += padded
    return parts


def split_kv(no: int, count: int, n_tensors: int) -> dict[str, tuple[str, int]]:
    """The split keys of part ``no`` with their GGUF value types."""
    return {SPLIT_NO: ("u16", no), SPLIT_COUNT: ("u16", count), SPLIT_TENSORS: ("i32", n_tensors)}


def read_parts(path: Path) -> tuple[dict[str, Any], list[tuple[Path, list[GGUFTensorInfo]]]]:
    """Metadata (the first part's) and each part's (path, tensor table) of a plain or split GGUF.

    ``path`` must be the plain file or the first part; every part is checked against ``split.*``.
    """
    path = Path(path)
    kv, infos = read_header(path)
    count = int(kv.get(SPLIT_COUNT, 0) or 0)
    m = _PART.match(path.name)
    if count <= 1:
        return kv, [(path, infos)]
    if int(kv.get(SPLIT_NO, 0)) != 0 or (m and int(m["no"]) != 1):
        first = path.with_name(f"{m['prefix']}-00001-of-{m['count']}.gguf") if m else "the -00001-of- part"
        raise QConvertError(f"{path} is part {int(kv.get(SPLIT_NO, 0)) + 1} of a split GGUF; pass the first part "
                            f"({first})")
    if not m:
        raise QConvertError(f"{path}: split.count is {count} but the name is not NAME-00001-of-{count:05d}.gguf; "
                            "rename the parts as llama.cpp names them")
    prefix = path.with_name(m["prefix"] + ".gguf")
    parts = [(path, infos)]
    for no in range(1, count):
        p = part_path(prefix, no, count)
        if not p.is_file():
            raise QConvertError(f"{path}: part {no + 1} of {count} is missing ({p}); put every part beside the first")
        pkv, pinfos = read_header(p)
        if int(pkv.get(SPLIT_NO, -1)) != no or int(pkv.get(SPLIT_COUNT, 0)) != count:
            raise QConvertError(f"{p}: split.no / split.count say part {int(pkv.get(SPLIT_NO, -1)) + 1} of "
                                f"{pkv.get(SPLIT_COUNT)}, expected {no + 1} of {count}; the parts come from different splits")
        parts.append((p, pinfos))
    total = sum(len(i) for _, i in parts)
    if SPLIT_TENSORS in kv and int(kv[SPLIT_TENSORS]) != total:
        raise QConvertError(f"{path}: split.tensors.count is {kv[SPLIT_TENSORS]} but the {count} parts hold {total} "
                            "tensors; a part is from another split, split the model again")
    return kv, parts
