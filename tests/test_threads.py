"""formats/threads.py: the thread count follows affinity and the cgroup CPU quota; splits cover every row once,
so results do not depend on the thread count."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from formats import threads


@pytest.fixture(autouse=True)
def _default_count():
    yield
    threads.set_count(None)


def test_cgroup_quota_caps_the_count(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert threads._quota(v2) == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert threads._quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._quota(v1) == 1
    assert threads.available(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._quota(v1) is None
    assert threads.available(v1) == len(os.sched_getaffinity(0))


def test_override_and_environment(monkeypatch):
    monkeypatch.setenv("QCONVERT_THREADS", "3")
    assert threads.count() == 3
    threads.set_count(5)
    assert threads.count() == 5
    threads.set_count(None)
    monkeypatch.delenv("QCONVERT_THREADS")
    assert threads.count() == threads.available()
    with pytest.raises(ValueError):
        threads.set_count(0)


def test_count_reads_the_cgroup_once(monkeypatch):
    """The decoder asks count() for every product: the affinity and quota are read once per process."""
    reads = []
    monkeypatch.delenv("QCONVERT_THREADS", raising=False)
    monkeypatch.setattr(threads, "_detected", None)
    monkeypatch.setattr(threads, "available", lambda: reads.append(1) or 2)
    assert [threads.count() for _ in range(100)] == [2] * 100
    assert len(reads) == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_affinity_gives_one_thread_under_taskset():
    code = "from formats import threads; print(threads.count())"
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "QCONVERT_THREADS"})
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
def test_split_covers_every_row_once_and_products_do_not_depend_on_it(n_threads):
    from formats.model.stored import PackedMatrix
    from qconvert.decoder import products

    threads.set_count(n_threads)
    seen = np.zeros(1000, np.int64)

    def mark(a: int, b: int) -> None:
        seen[a:b] += 1

    threads.split(mark, 1000, min_rows=7)
    assert (seen == 1).all()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 256)).astype(np.float32)
    m = PackedMatrix.ggml("F32", w.view(np.uint8).reshape(512, -1), 256)
    x = rng.standard_normal((40, 256)).astype(np.float32)
    threads.set_count(1)
    ref = products.matmul(m, x)
    threads.set_count(n_threads)
    assert np.array_equal(products.matmul(m, x), ref)
    assert np.array_equal(products.dequant(m), w)


@pytest.mark.parametrize("t", ["F16", "Q8_0", "Q4_K", "IQ2_XXS", "IQ4_XS"])
def test_decode_products_do_not_depend_on_the_thread_count(t):
    """The C dot kernels' row split (_dot_par.c) over 1, 2, 3, 8 and 13 threads (more than the CPUs: nobody
    spins) gives the one-thread product bit for bit, for decoding widths T = 1 and 5."""
    from gguf import GGMLQuantizationType as GQ
    from gguf.constants import GGML_QUANT_SIZES

    from formats.ggml import codec
    from formats.model.stored import PackedMatrix
    from qconvert.decoder import products

    if not codec.available():
        pytest.skip("needs the compiled kernels")
    rows, cols = 701, 512
    rng = np.random.default_rng(1)
    if t == "F16":
        raw = rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    else:  # random blocks with moderate f16 scales in front (d at byte 0 in every type here; Q4_K's dmin at 2)
        bv, bb = GGML_QUANT_SIZES[GQ[t]]
        raw = rng.integers(0, 256, (rows * cols // bv, bb), dtype=np.uint8)
        raw[:, :4] = rng.uniform(0.01, 0.5, (len(raw), 2)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    m = PackedMatrix.ggml(t, raw, cols)
    for T in (1, 5):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        threads.set_count(1)
        ref = products.matmul(m, x)
        assert np.isfinite(ref).all() and np.abs(ref).max() > 0
        for n in (2, 3, 8, 13):
            threads.set_count(n)
            got = products.matmul(m, x)
            assert got.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes(), (t, T, n)


def test_logits_are_bit_identical_for_any_thread_count(tiny, tmp_path):
    """``qconvert logits --threads N`` for N = 1, 2, 3, 8: the same float32 logits, bit for bit, for a decoding
    width (the C kernels) and a prefill width (BLAS on dequantised blocks), on a Q8_0 GGUF and the f32 HF folder."""
    from conftest import ROOT, qconvert

    ref = tiny("tied")
    gg = tmp_path / "q8.gguf"
    qconvert("hf-to-gguf", str(ref), str(gg), "--outtype", "q8_0")
    text = str(ROOT / "tests" / "data" / "sample.txt")
    for src in (ref, gg):
        for ctx in ("6", "40"):
            outs = []
            for n in ("1", "2", "3", "8"):
                out = tmp_path / f"{src.name}-{ctx}-{n}.npz"
                qconvert("logits", str(src), "--text", text, "--ctx", ctx, "--threads", n, "--out", str(out))
                outs.append(np.load(out)["logits"])
            assert np.isfinite(outs[0]).all() and outs[0].std() > 0
            for o in outs[1:]:
                assert o.view(np.uint32).tobytes() == outs[0].view(np.uint32).tobytes(), (src.name, ctx)
