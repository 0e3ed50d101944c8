"""The family benchmark (scripts/bench_family.py) on narrow copies of the proxies, as CI runs it.

Each narrow copy keeps the traits that break converters (qconvert/testing/proxy.py ``narrowed``): 72b's 8 kv heads,
eps 1e-5 and a 29568-style feed-forward width (a multiple of 128, not of 256), 57b-a14b's 64 experts + shared
expert, 0.5b's tied head and 896-style hidden size, 7b-instruct's YaRN, 7b-instruct-1m's dual chunk attention
config and rope theta 1e7, 7b's vocab 152064. Every check of every system must pass its bound (f16 / q8_0 /
q4_k_m in llama.cpp vs transformers, int4 folder vs its GGUF, gguf-to-hf bit-exact with an equal config).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_family", ROOT / "scripts" / "bench_family.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.heavy
@pytest.mark.parametrize("shape", ["0.5b", "72b", "57b-a14b", "7b-instruct", "7b-instruct-1m"])
def test_family_narrow(shape, tmp_path):
    bench = _bench()
    rows = bench.System(shape, tmp_path / shape, narrow=True, tokens=64, progress=False).run()
    assert [r["check"] for r in rows] == list(bench.CHECKS)
    failed = [r for r in rows if not r["pass"]]
    assert not failed, failed
    q4 = next(r for r in rows if r["check"] == "q4_k_m")
    assert q4["types_equal"] and q4["kl"] > 0  # quantised: a real, nonzero divergence that equals the peer's
