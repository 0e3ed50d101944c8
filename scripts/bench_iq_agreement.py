#!/usr/bin/env python3
"""Our decoder on llama-quantize's i-quant files against llama.cpp on the same files, and generate's memory.

For each GGUF given: mean / p99 KL(llama.cpp || ours) of the next-token distributions over ``--tokens``
tokens of held-out text (qconvert.corpus.EVAL_MODULES, disjoint from the imatrix calibration text), and
top-1 agreement. llama.cpp runs as peers.llama_logits does (its plain CPU path: Q8 activations, F32 KV
cache); ours is the numpy decoder on the stored bytes (float32 activations). Then ``qconvert generate`` on
each file in a child process: its peak RSS (wait4's ru_maxrss, under a small launcher) against the file size.

    python scripts/bench_iquants.py --types iq1_m iq2_xxs iq3_s --work /tmp/bi05
    python scripts/bench_iq_agreement.py /tmp/bi05/iq1_m-llama.gguf /tmp/bi05/iq2_xxs-llama.gguf ...
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from formats.open import open_model  # noqa: E402
from qconvert.corpus import EVAL_MODULES, stdlib_text  # noqa: E402
from qconvert.decoder import make_decoder  # noqa: E402
from qconvert.testing.peers import kl_stats, llama_logits, llama_tokenize  # noqa: E402

QC = str(Path(sys.executable).parent / "qconvert")


# A child's ru_maxrss starts at its parent's resident size when it forks (before exec), so the command runs
# under a small launcher process whose own size is a few MB: the figure is the command's own peak.
LAUNCH = ("import os, sys; pid = os.fork()\n"
          "if pid == 0: os.execv(sys.argv[1], sys.argv[1:])\n"
          "_, st, ru = os.wait4(pid, 0); print(f'maxrss_kb={ru.ru_maxrss}', file=sys.stderr); "
          "sys.exit(os.waitstatus_to_exitcode(st))")


def peak_rss_mb(cmd: list[str]) -> tuple[float, str]:
    """Peak resident memory (MB) of ``cmd``, and its last output line."""
    r = subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True)
    lines = (r.stdout + r.stderr).strip().splitlines()
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {lines[-2:]}")
    kb = next(int(x.split("=")[1]) for x in reversed(lines) if x.startswith("maxrss_kb="))
    return kb / 1024, next((x for x in reversed(r.stdout.strip().splitlines()) if x.strip()), "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=256, help="held-out tokens scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generate makes in the memory run")
    args = ap.parse_args()
    print("| file | types | mean KL | p99 KL | top-1 | generate peak RSS | file size | RSS / file |")
    print("|---|---|---|---|---|---|---|---|")
    for g in args.gguf:
        toks = llama_tokenize(g, stdlib_text(EVAL_MODULES))[: args.tokens]
        ref = llama_logits(g, toks, n_threads=args.threads)
        with open_model(str(g)) as src:
            kinds = sorted({t.packed().stype for k, t in src.tensors.items() if k.endswith("proj.weight")})
            ours = make_decoder(src).logits(toks)
        s = kl_stats(ref, ours)
        rss, last = peak_rss_mb([QC, "generate", str(g), "--prompt", "def fib(n):", "--max-new-tokens",
                                 str(args.new_tokens), "--ignore-eos", "--threads", str(args.threads)])
        size = g.stat().st_size / 1e6
        print(f"| {g.name} | {' '.join(kinds)} | {s['mean_kl']:.2e} | {s['p99_kl']:.2e} | {s['top1']:.3f} | "
              f"{rss:.0f} MB | {size:.0f} MB | {rss / size:.2f} |", flush=True)
        print(f"  generate: {last}", file=sys.stderr)


if __name__ == "__main__":
    main()
