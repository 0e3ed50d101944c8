"""A dict of quantisation results kept on disk, so GPTQ's output does not grow with the model in RAM.

GPTQ finishes a model layer by layer before the writer runs; its codes are one byte per weight (a 7B model:
6.5 GB), so they are stored in a temporary folder (beside the output, removed on close) as ``.npy`` files and
read back memory-mapped, one matrix at a time, when the writer asks.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def sweep_spills(folder: Path) -> None:
    """Remove ``.qconvert-spill-PID-*`` folders in ``folder`` whose process is gone (a run killed, e.g. by the
    out-of-memory killer, before it could clean up: a 7B model's spill is 6.5 GB)."""
    from formats.files.atomic import _alive

    for c in Path(folder).glob(".qconvert-spill-*-*"):
        pid = c.name[len(".qconvert-spill-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and c.is_dir() and not c.is_symlink():
            shutil.rmtree(c, ignore_errors=True)


class SpillDict:
    """Mapping name -> numpy array or dataclass of numpy arrays (e.g. GroupQuant), stored as .npy files."""

    def __init__(self, near: Path | None = None):
        self._where = Path(near).resolve().parent if near is not None else None
        self.dir: Path | None = None  # made on the first store
        self._meta: dict[str, Any] = {}
        self._n = 0

    def _save(self, key: str, a: np.ndarray) -> str:
        if self.dir is None:
            sweep_spills(self._where or Path(tempfile.gettempdir()))
            self.dir = Path(tempfile.mkdtemp(prefix=f".qconvert-spill-{os.getpid()}-", dir=self._where))
        self._n += 1
        path = self.dir / f"{self._n}.npy"
        np.save(path, np.ascontiguousarray(a))
        return str(path)

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            self._meta[name] = ("array", self._save(name, value))
            return
        fields = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            fields[f.name] = ("npy", self._save(name, v)) if isinstance(v, np.ndarray) else ("value", v)
        self._meta[name] = (type(value), fields)

    def __getitem__(self, name: str) -> Any:
        kind, data = self._meta[name]
        if kind == "array":
            return np.load(data, mmap_mode="r")
        return kind(**{k: np.load(v, mmap_mode="r") if how == "npy" else v for k, (how, v) in data.items()})

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._meta else default

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def __iter__(self):
        return iter(self._meta)

    def items(self):
        return ((k, self[k]) for k in self._meta)

    def close(self) -> None:
        """Delete the folder (arrays already handed out stay readable until unmapped)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SpillDict":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
