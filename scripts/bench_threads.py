#!/usr/bin/env python3
"""Prefill and decode speed against the thread count, ours and llama.cpp's, on the same files in the same run.

For each file and each ``--threads`` count: a ``--prompt``-token prefill (tokens/s to the next token's logits),
then ``--decode`` greedy tokens, one at a time (tokens/s). Rounds alternate the counts (1, 2, 1, 2, ...) so that
a noisy machine slows every count alike; the median round is printed, with each count's decode speed-up over
the first count. By default llama.cpp runs too (llama-cpp-python, the same threads, each run in a fresh
process so that its thread pool never competes with ours), in both of its modes: ``repack`` is its default
(weights repacked into its CPU extra buffer types: AMX / AVX-512 int8 paths), ``plain`` has repacking off
(qconvert.testing.peers.open_llama); a mode that crashes on a file is reported as such. Ours decodes on
llama.cpp's 8-bit activations as `qconvert generate` does (``--activations q8``; ``float``: the float32
products of logits / verify; both: two rows). Ratios are our first row over llama.cpp's at the same threads.

    python scripts/bench_threads.py                       # the real 0.5B Q4_K_M, 1 and 2 threads
    python scripts/bench_threads.py --model 1.5b --rounds 5
    python scripts/bench_threads.py --gguf a.gguf b.gguf --threads 2 --llama-modes repack
    python scripts/bench_threads.py --activations q8 float --llama-modes
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

MODES = ("repack", "plain")


def prompt(n: int) -> np.ndarray:
    """``n`` fixed token ids of ordinary text range (the speed does not depend on which)."""
    return (np.arange(n) * 7919 % 20000 + 1000).astype(np.int64)


def ours(dec, ids: np.ndarray, n: int, t: int) -> tuple[float, float]:
    """Prefill and decode tokens/s of our decoder on ``t`` threads."""
    threads.set_count(t)
    cache = dec.new_cache(len(ids) + n + 1)
    t0 = time.perf_counter()
    nxt = int(np.argmax(dec.forward(ids, cache, last_only=True)[-1]))
    t1 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(dec.forward(np.asarray([nxt]), cache, last_only=True)[-1]))
    return len(ids) / (t1 - t0), n / (time.perf_counter() - t1)


def llama(path: Path, ids: np.ndarray, n: int, t: int, repack: bool) -> tuple[float, float]:
    """Prefill and decode tokens/s of llama.cpp on ``t`` threads."""
    from qconvert.testing.peers import open_llama

    llm = open_llama(path, extra_bufts=repack, n_ctx=len(ids) + n + 16, n_batch=len(ids), n_ubatch=len(ids),
                     n_threads=t, n_threads_batch=t, verbose=False)
    try:
        llm.eval(ids[:8].tolist())  # warm-up: weights paged in, repacked
        llm.reset()
        logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # noqa: E731
        t0 = time.perf_counter()
        llm.eval(ids.tolist())
        nxt = int(np.argmax(logits()))
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([nxt])
            nxt = int(np.argmax(logits()))
        return len(ids) / (t1 - t0), n / (time.perf_counter() - t1)
    finally:
        llm.close()


def llama_fresh(path: Path, args: argparse.Namespace, t: int, mode: str) -> tuple[float, float] | None:
    """``llama`` in a child process (this script with ``--llama-run``); None when llama.cpp crashed."""
    r = subprocess.run([sys.executable, __file__, "--llama-run", str(path), "--llama-modes", mode, "--threads",
                        str(t), "--prompt", str(args.prompt), "--decode", str(args.decode)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    p, d = r.stdout.split()[-2:]
    return float(p), float(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(MODELS), default="0.5b", help="fetched real model (default file)")
    ap.add_argument("--gguf", type=Path, nargs="+", help="GGUF files to run instead")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--llama-modes", nargs="*", choices=MODES, default=list(MODES), help="none: ours only")
    ap.add_argument("--activations", nargs="+", choices=("float", "q8"), default=["float", "q8"],
                    help="our decoding products: float32 (generate's default) and / or llama.cpp's 8-bit activations")
    args = ap.parse_args()
    if args.llama_run:
        repack = args.llama_modes[0] == "repack"
        print(*llama(args.llama_run, prompt(args.prompt), args.decode, args.threads[0], repack))
        return
    files = args.gguf or [fetch_real_model(model=args.model)]
    ids = prompt(args.prompt)
    print(f"tokens/s: prefill of a {args.prompt}-token prompt, then {args.decode} decoded tokens; median of "
          f"{args.rounds} alternating rounds")
    for f in files:
        src = open_model(str(f))
        dec = make_decoder(src)
        ours(dec, ids[:16], 4, args.threads[0])  # warm-up: pages mapped in
        mine = [f"ours {a}" for a in args.activations]
        names = mine + [f"llama.cpp {m}" for m in args.llama_modes]
        runs: dict[str, dict[int, list]] = {k: {t: [] for t in args.threads} for k in names}
        for _ in range(args.rounds):
            for t in args.threads:
                for a in args.activations:
                    dec.activations = a
                    runs[f"ours {a}"][t].append(ours(dec, ids, args.decode, t))
                for m in args.llama_modes:
                    runs[f"llama.cpp {m}"][t].append(llama_fresh(f, args, t, m))
        src.close()
        print(f"\n{f.name}")
        print(f"{'':<18} {'threads':>7} {'prefill':>8} {'decode':>8} {'decode x' + str(args.threads[0]) + 't':>11} "
              f"{'prefill ours/it':>15} {'decode ours/it':>14}")
        med = {}
        for k in names:
            for t in args.threads:
                got = [r for r in runs[k][t] if r is not None]
                med[k, t] = tuple(statistics.median(r[j] for r in got) for j in (0, 1)) if got else None
        for k in names:
            for t in args.threads:
                m, base = med[k, t], med[k, args.threads[0]]
                if m is None:
                    print(f"{k:<18} {t:7d} {'crashed':>8}")
                    continue
                o = med[mine[0], t]
                print(f"{k:<18} {t:7d} {m[0]:8.1f} {m[1]:8.2f} {m[1] / base[1]:11.2f} {o[0] / m[0]:15.2f} "
                      f"{o[1] / m[1]:14.2f}")


if __name__ == "__main__":
    main()
