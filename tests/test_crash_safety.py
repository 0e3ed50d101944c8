"""Interrupted and failed writes: SIGKILL at random moments leaves the old output intact (or none), never a
partial one, and the next successful run leaves no temporary behind; a full disk gives one clear error and
no output. QCONVERT_KILLS sets the kills per command (default 8; the closing figures used 20)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import qconvert

KILLS = int(os.environ.get("QCONVERT_KILLS", "8"))
EXE = str(Path(sys.executable).parent / "qconvert")


def _digest(p: Path) -> str:
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _valid(p: Path) -> bool:
    """The output opens and every tensor reads (a complete file)."""
    from formats.open import open_model
    with open_model(str(p)) as src:
        for t in src.tensors.values():
            t.rows(0, t.n_rows)
    return True


def _commands(tiny: Path, gguf: Path, work: Path) -> dict[str, tuple[list[str], Path]]:
    return {"hf-to-gguf": (["hf-to-gguf", str(tiny), str(work / "out.gguf"), "--outtype", "f32", "--force"],
                           work / "out.gguf"),
            "gguf-to-hf": (["gguf-to-hf", str(gguf), str(work / "out-hf"), "--dtype", "f32", "--force"], work / "out-hf"),
            "quantize": (["quantize", str(tiny), str(work / "out-int4"), "--method", "rtn", "--force"], work / "out-int4")}


@pytest.mark.parametrize("command", ["hf-to-gguf", "gguf-to-hf", "quantize"])
def test_sigkill_never_leaves_a_partial_output(tiny, tmp_path, command):
    src = tiny("untied_yarn")
    gguf = tmp_path / "src.gguf"
    qconvert("hf-to-gguf", str(src), str(gguf), "--outtype", "f32")
    work = tmp_path / "w"
    work.mkdir()
    args, out = _commands(src, gguf, work)[command]
    t0 = time.monotonic()
    qconvert(*args)  # the old output, which every kill must leave intact
    full = time.monotonic() - t0
    old = _digest(out)
    rng = np.random.default_rng(11)
    # the output is deterministic: "intact" = byte-identical to the complete output (old, or a finished new one)
    outcomes = {"intact": 0, "other complete output": 0, "killed mid-write": 0}
    for k in range(KILLS):
        p = subprocess.Popen([EXE, *args, "--quiet"] if command != "quantize" else [EXE, *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k % 2:  # any moment of the run, rename included
            time.sleep(float(rng.uniform(0.1, 1.3)) * full)
        else:  # a moment of the write itself: once the temporary exists
            t_end = time.monotonic() + 3 * full
            while not any(".tmp-" in x.name for x in work.iterdir()) and time.monotonic() < t_end and p.poll() is None:
                time.sleep(0.002)
            time.sleep(float(rng.uniform(0.0, 0.3)) * full)
        outcomes["killed mid-write"] += any(".tmp-" in x.name for x in work.iterdir())
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert out.exists(), f"kill {k}: the old output is gone"
        if _digest(out) == old:
            outcomes["intact"] += 1
        else:  # the rename happened before the kill: the new output must be whole
            assert _valid(out), f"kill {k}: a partial output"
            outcomes["other complete output"] += 1
            old = _digest(out)
    print(f"{command}: {KILLS} kills, {outcomes}")
    assert outcomes["killed mid-write"] >= KILLS // 4, f"too few kills hit the write itself: {outcomes}"
    stray = [p.name for p in work.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    qconvert(*args)  # the next successful run sweeps the dead runs' temporaries
    left = [p.name for p in work.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert left == [], f"temporaries left after a successful run: {left} (before it: {stray})"
    assert _valid(out)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only; skipped elsewhere)."""
    d = tmp_path / "full"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("command", ["hf-to-gguf", "gguf-to-hf", "quantize"])
def test_full_disk_is_one_clear_error(tiny, tmp_path, small_disk, command):
    src = tiny("untied_yarn")  # ~40 MB as f32: never fits in 3 MB
    gguf = tmp_path / "src.gguf"
    qconvert("hf-to-gguf", str(src), str(gguf), "--outtype", "f32")
    args, out = _commands(src, gguf, small_disk)[command]
    r = qconvert(*args, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines and lines[-1].startswith("error: ") and "no space left" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert list(small_disk.iterdir()) == [], f"left behind: {list(small_disk.iterdir())}"
    shutil.rmtree(tmp_path / "w", ignore_errors=True)


def test_kill_between_two_renames_is_repaired(tmp_path):
    """Without renameat2, replacing a folder takes two renames; a kill between them leaves only the old folder
    under its temporary name. The next run puts it back instead of deleting it."""
    from formats.files.atomic import atomic_dir, sweep_stale
    out = tmp_path / "model"
    aside = tmp_path / ".model.old-99999999"  # a dead process's
    aside.mkdir()
    (aside / "config.json").write_text("old")
    (tmp_path / ".model.tmp-99999999").mkdir()  # its half-written new folder
    sweep_stale(out)
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(out, force=True) as t:
        (t / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
