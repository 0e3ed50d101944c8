"""The project's C libraries, loaded through ctypes, each with its signatures declared in one table.

Each package with C kernels builds one extension module ``<package>._kernels`` from the sources that
pyproject.toml's ``ext-modules`` lists (the one list: scripts/fuzz.py's sanitizer build reads it too, and
tests/test_structure.py checks it). ``QCONVERT_NATIVE_DIR`` names a folder of replacement builds,
``<package>._kernels.so`` (scripts/fuzz.py --asan). A library that is not built gives None (its callers
fall back to numpy); a built library that lacks a declared symbol is an error, never a silent fallback.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
Signatures = dict[str, tuple[list, object]]


def library_path(module: str) -> str | None:
    """Where the shared library of extension ``module`` (e.g. "formats.ggml._kernels") is, or None."""
    override = os.environ.get("QCONVERT_NATIVE_DIR")
    if override:
        p = Path(override) / f"{module}.so"
        return str(p) if p.is_file() else None
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None and spec.origin else None


def load(module: str, signatures: Signatures) -> ctypes.CDLL | None:
    """The library of ``module`` with ``signatures`` ({symbol: (argtypes, restype)}) declared, or None when
    it is not built."""
    path = library_path(module)
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)  # AttributeError: a stale build; reinstall (pip install -e .)
        fn.argtypes, fn.restype = args, res
    return lib
