#!/usr/bin/env python3
"""Decode speed against the thread count, ours and llama.cpp's, on the same files in the same run.

For each file and each ``--threads`` count: a ``--prompt``-token prefill, then ``--decode`` greedy tokens, one
at a time (tokens/s of the decode). Rounds alternate the counts (1, 2, 1, 2, ...) so that a noisy machine
slows every count alike; the median round is printed, with each count's speed-up over the first count and,
by default also llama.cpp's (llama-cpp-python, the same threads, weight repacking off as
qconvert.testing.peers.open_llama runs it; each run in a fresh process, so that its thread pool never
competes with ours) and our decode over theirs.

    python scripts/bench_threads.py                       # the real 0.5B Q4_K_M, 1 and 2 threads
    python scripts/bench_threads.py --model 1.5b --threads 1 2 --rounds 5
    python scripts/bench_threads.py --gguf a.gguf b.gguf
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats import threads  # noqa: E402
from formats.open import open_model  # noqa: E402
from qconvert.decoder import make_decoder  # noqa: E402
from qconvert.testing.fetch import MODELS, fetch_real_model  # noqa: E402


def prompt(n: int) -> np.ndarray:
    """``n`` fixed token ids of ordinary text range (the speed does not depend on which)."""
    return (np.arange(n) * 7919 % 20000 + 1000).astype(np.int64)


def ours(dec, ids: np.ndarray, n: int, t: int) -> float:
    threads.set_count(t)
    cache = dec.new_cache(len(ids) + n + 1)
    nxt = int(np.argmax(dec.forward(ids, cache, last_only=True)[-1]))
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(dec.forward(np.asarray([nxt]), cache, last_only=True)[-1]))
    return n / (time.perf_counter() - t0)


def llama(path: Path, ids: np.ndarray, n: int, t: int) -> float:
    from qconvert.testing.peers import open_llama

    llm = open_llama(path, n_ctx=len(ids) + n + 16, n_batch=len(ids), n_ubatch=len(ids), n_threads=t,
                     n_threads_batch=t, verbose=False)
    try:
        llm.eval(ids.tolist())
        logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # noqa: E731
        nxt = int(np.argmax(logits()))
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([nxt])
            nxt = int(np.argmax(logits()))
        return n / (time.perf_counter() - t0)
    finally:
        llm.close()


def llama_fresh(path: Path, args: argparse.Namespace, t: int) -> float:
    """``llama`` in a child process (this script with ``--llama-run``): its decode tokens/s."""
    r = subprocess.run([sys.executable, __file__, "--llama-run", str(path), "--threads", str(t), "--prompt",
                        str(args.prompt), "--decode", str(args.decode)], capture_output=True, text=True, check=True)
    return float(r.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(MODELS), default="0.5b", help="fetched real model (default file)")
    ap.add_argument("--gguf", type=Path, nargs="+", help="GGUF files to run instead")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--no-llama", dest="llama", action="store_false")
    args = ap.parse_args()
    if args.llama_run:
        print(llama(args.llama_run, prompt(args.prompt), args.decode, args.threads[0]))
        return
    files = args.gguf or [fetch_real_model(model=args.model)]
    ids = prompt(args.prompt)
    print(f"decode tokens/s after a {args.prompt}-token prompt, {args.decode} tokens, median of {args.rounds} "
          f"alternating rounds")
    for f in files:
        src = open_model(str(f))
        dec = make_decoder(src)
        ours(dec, ids[:16], 4, args.threads[0])  # warm-up: pages mapped in
        runs: dict[str, dict[int, list[float]]] = {"ours": {t: [] for t in args.threads}}
        if args.llama:
            runs["llama.cpp"] = {t: [] for t in args.threads}
        for _ in range(args.rounds):
            for t in args.threads:
                runs["ours"][t].append(ours(dec, ids, args.decode, t))
                if args.llama:
                    runs["llama.cpp"][t].append(llama_fresh(f, args, t))
        src.close()
        med = {k: {t: statistics.median(v) for t, v in r.items()} for k, r in runs.items()}
        t0 = args.threads[0]
        print(f"\n{f.name}")
        print(f"{'threads':>7} " + " ".join(f"{k:>10} {'x' + str(t0) + 't':>6}" for k in med)
              + (f" {'ours / llama':>12}" if args.llama else ""))
        for t in args.threads:
            row = " ".join(f"{med[k][t]:10.2f} {med[k][t] / med[k][t0]:6.2f}" for k in med)
            extra = f" {med['ours'][t] / med['llama.cpp'][t]:12.2f}" if args.llama else ""
            print(f"{t:7d} {row}{extra}")


if __name__ == "__main__":
    main()
