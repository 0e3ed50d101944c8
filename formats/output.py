"""Safe outputs: write under a temporary name next to the target, rename on success, never clobber."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from formats.errors import QConvertError


def check_target(path: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``; fail early when the parent folder is missing."""
    if path.exists() and not force:
        raise QConvertError(f"{path} already exists; pass --force to overwrite it or choose another output")
    if not path.parent.is_dir():
        raise QConvertError(f"output folder {path.parent} does not exist; create it first")


@contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    check_target(path, force)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.is_dir():
            raise QConvertError(f"{path} is a folder; choose a file name for the output")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_files(paths: list[Path], force: bool = False) -> Iterator[list[Path]]:
    """Like ``atomic_file`` for several files written together (a split GGUF): every target is checked first,
    and the files are renamed into place only when all were written; on error every temporary is deleted."""
    paths = [Path(p) for p in paths]
    for p in paths:
        check_target(p, force)
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    try:
        yield tmps
        for p in paths:
            if p.is_dir():
                raise QConvertError(f"{p} is a folder; choose a file name for the output")
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    finally:
        for t in tmps:
            if t.exists():
                t.unlink()


@contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    check_target(path, force)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
