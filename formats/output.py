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
