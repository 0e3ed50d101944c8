#!/usr/bin/env python3
"""Conversion benchmark on the real Qwen2.5-Coder-0.5B, peers measured in the same run.

1. qconvert hf-to-gguf --outtype f16   vs  llama.cpp convert_hf_to_gguf.py --outtype f16  (same HF bf16 input)
2. qconvert gguf-to-hf (bf16)          vs  transformers from_pretrained(..., gguf_file=...)
Wall time and peak RSS of each process (os.wait4). Prints ratios (ours / peer; lower is better).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qconvert.testing.fetch import fetch_real_model  # noqa: E402
from qconvert.testing.peers import llama_convert_cmd  # noqa: E402

QC = str(Path(sys.executable).parent / "qconvert")


def measure_rusage(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Like measure, but reaps the child with wait4 to get its own peak RSS."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read() if p.stdout else ""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed with status {p.returncode}")
    return wall, ru.ru_maxrss / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    gguf = fetch_real_model()
    work = args.work or Path(tempfile.mkdtemp(prefix="qc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf-bf16"
    if not (hf / "config.json").is_file():
        subprocess.run([QC, "gguf-to-hf", str(gguf), str(hf), "--force", "--quiet"], check=True)
    rows = []

    ours = measure_rusage([QC, "hf-to-gguf", str(hf), str(work / "ours-f16.gguf"), "--outtype", "f16", "--force", "--quiet"])
    cmd, env = llama_convert_cmd(hf, work / "llama-f16.gguf", "f16")
    peer = measure_rusage(cmd, env)
    rows.append(("hf-to-gguf f16 vs convert_hf_to_gguf.py", ours, peer))

    out_hf = work / "ours-hf"
    ours = measure_rusage([QC, "gguf-to-hf", str(gguf), str(out_hf), "--force", "--quiet"])
    code = ("import time, torch; from transformers import AutoModelForCausalLM; t=time.perf_counter(); "
            f"AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}); "
            "print(time.perf_counter()-t)")
    peer = measure_rusage([sys.executable, "-c", code])
    rows.append(("gguf-to-hf vs transformers gguf_file load", ours, peer))

    print(f"\n{'benchmark (real Qwen2.5-Coder-0.5B)':<44} {'ours s':>7} {'peer s':>7} {'time x':>7} "
          f"{'ours MB':>8} {'peer MB':>8} {'RSS x':>6}")
    for name, (tw, rw, _), (tp, rp, _) in rows:
        print(f"{name:<44} {tw:7.2f} {tp:7.2f} {tw / tp:7.2f} {rw:8.0f} {rp:8.0f} {rw / rp:6.2f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
