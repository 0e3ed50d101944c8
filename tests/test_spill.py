"""SpillDict: GPTQ results kept on disk, and the sweep of spills left by killed runs."""
import os
import subprocess
import sys

import numpy as np

from qconvert.quant.groupwise import quantize
from qconvert.quant.spill import SpillDict, sweep_spills


def test_spill_round_trip_and_cleanup(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    g = quantize(a, 4, 32, False, "rtn")
    with SpillDict(near=tmp_path / "out") as d:
        d["a"], d["g"] = a, g
        assert d.dir.parent == tmp_path and len(list(d.dir.iterdir())) >= 2
        assert np.array_equal(d["a"], a) and np.array_equal(d["g"].q, g.q) and np.array_equal(d["g"].scales, g.scales)
        assert "a" in d and len(d) == 2 and d.get("x") is None
        where = d.dir
    assert not where.exists()


def test_stale_spills_of_dead_processes_are_swept(tmp_path):
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(p.stdout)
    stale = tmp_path / f".qconvert-spill-{dead}-abc"
    live = tmp_path / f".qconvert-spill-{os.getpid()}-def"
    other = tmp_path / ".qconvert-spill-x-1"
    for f in (stale, live, other):
        f.mkdir()
        (f / "1.npy").write_bytes(b"x" * 10)
    sweep_spills(tmp_path)
    assert not stale.exists() and live.exists() and other.exists()
    with SpillDict(near=tmp_path / "out") as d:  # a new spill sweeps too
        stale.mkdir()
        d["a"] = np.zeros(3, np.float32)
        assert not stale.exists()
