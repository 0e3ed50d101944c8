"""Safe outputs: write under a temporary name next to the target, fsync, rename on success, never clobber.

A killed or failed conversion leaves either nothing or the old output: the data goes to ``.NAME.tmp-PID``
beside the target, is flushed to disk (``fsync`` of every file, then of the folder), and only then renamed
over the target (one ``rename``, atomic on POSIX). Temporaries of dead processes are removed by the next run
that writes the same target. A full disk (ENOSPC / EDQUOT / EFBIG) becomes one QConvertError naming the target.
"""
from __future__ import annotations

import errno
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


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fsync_path(p: Path) -> None:
    """Flush a written file, or a folder and every file in it, to disk."""
    p = Path(p)
    if p.is_dir():
        for c in p.iterdir():
            if c.is_file() and not c.is_symlink():
                fsync_path(c)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_stale(path: Path) -> None:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` leftovers of ``path`` whose process is gone (a killed run)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for c in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = c.name[len(path.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not path.exists() and not path.is_symlink():
            os.replace(c, path)  # killed between moving the old output aside and renaming the new one in
        elif c.is_dir() and not c.is_symlink():
            shutil.rmtree(c, ignore_errors=True)
        else:
            c.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system can't."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _disk_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise QConvertError(f"{target}: no space left on the device while writing ({e.strerror}); nothing was "
                                "written there: free some space or choose another output folder") from None
        raise


@contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    with atomic_files([path], force) as tmps:
        yield tmps[0]


@contextmanager
def atomic_files(paths: list[Path], force: bool = False) -> Iterator[list[Path]]:
    """Like ``atomic_file`` for several files written together (a split GGUF): every target is checked first,
    and the files are renamed into place only when all were written; on error every temporary is deleted."""
    paths = [Path(p) for p in paths]
    for p in paths:
        check_target(p, force)
        sweep_stale(p)
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    try:
        with _disk_errors(paths[0]):
            yield tmps
            for p in paths:
                if p.is_dir():
                    raise QConvertError(f"{p} is a folder; choose a file name for the output")
            for t in tmps:
                fsync_path(t)
            for t, p in zip(tmps, paths):
                os.replace(t, p)
            fsync_path(paths[0].parent)
    finally:
        for t in tmps:
            if t.exists():
                t.unlink()


@contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    check_target(path, force)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _disk_errors(path):
            yield tmp
            fsync_path(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                if _exchange(tmp, path):  # one atomic swap: the old folder is now at tmp
                    old = tmp
                else:  # two renames; a kill between them is repaired by sweep_stale (the old folder comes back)
                    os.replace(path, old)
                    os.replace(tmp, path)
                fsync_path(path.parent)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            else:
                os.replace(tmp, path)
                fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
