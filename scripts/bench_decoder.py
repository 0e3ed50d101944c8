#!/usr/bin/env python3
"""Decoder benchmark on the real Qwen2.5-Coder-0.5B (bf16 HF checkpoint), peers in the same run.

Prefill: 512 prompt tokens -> next-token logits (best of 3). Decode: 64 new tokens, one at a time, KV cache.
Ours: numpy (float32 maths on the weights as stored) and torch on the CPU (float32), 2 threads;
peer: transformers float32 on the CPU with 2 threads. With CUDA: torch-CUDA bf16 vs transformers'
eager generate on the same GPU. Prints tokens/s and ratios (ours / transformers; higher is better).

Second table (``--llama``, default on): decoding straight from stored formats against llama.cpp
(llama-cpp-python, 2 threads) on the same weights: our numpy decoder on the bf16 folder vs llama.cpp on the
F16 GGUF, our default int4 folder vs llama-quantize's Q4_0 of the same weights, and the real Q4_K_M file
in both.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats.open import open_model  # noqa: E402
from qconvert.decoder import make_decoder  # noqa: E402
from qconvert.testing.fetch import fetch_real_model  # noqa: E402
from qconvert.text import encode  # noqa: E402

PREFILL, DECODE, REPEAT = 512, 64, 3


def prompt_tokens(src) -> list[int]:
    text = (ROOT / "qconvert" / "data" / "verify.txt").read_text() * 8
    return encode(src.tokenizer, text)[:PREFILL]


def bench_ours(hf: Path, backend: str, device: str = "cpu", dtype: str = "float32") -> tuple[float, float, list[int]]:
    src = open_model(str(hf))
    ids = prompt_tokens(src)
    dec = make_decoder(src, backend, device, dtype)
    dec.logits(ids[:16])  # warm-up
    best = float("inf")
    for _ in range(REPEAT):  # best of REPEAT prefills: this machine's timings are noisy
        cache = dec.new_cache(PREFILL + DECODE)
        t0 = time.perf_counter()
        nxt = int(np.argmax(dec.forward(np.asarray(ids), cache, last_only=True)[-1]))
        best = min(best, time.perf_counter() - t0)
    full = float("inf")
    for _ in range(REPEAT):  # prefill with logits at every position (what `qconvert logits` computes)
        t0 = time.perf_counter()
        dec.forward(np.asarray(ids), dec.new_cache(PREFILL))
        full = min(full, time.perf_counter() - t0)
    cache = dec.new_cache(PREFILL + DECODE)
    nxt = int(np.argmax(dec.forward(np.asarray(ids), cache, last_only=True)[-1]))
    t1 = time.perf_counter()
    out = [nxt]
    for _ in range(DECODE - 1):
        nxt = int(np.argmax(dec.forward(np.asarray([nxt]), cache, last_only=True)[-1]))
        out.append(nxt)
    t2 = time.perf_counter()
    src.close()
    return PREFILL / best, PREFILL / full, (DECODE - 1) / (t2 - t1), out


def bench_transformers(hf: Path, ids: list[int], device: str = "cpu") -> tuple[float, float, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=dt).to(device).eval()
    x = torch.tensor([ids], device=device)
    with torch.no_grad():
        model(x[:, :16])  # warm-up
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        best = float("inf")
        for _ in range(REPEAT):
            sync()
            t0 = time.perf_counter()
            out = model(x, use_cache=True, logits_to_keep=1)
            sync()
            t1 = time.perf_counter()
            best = min(best, t1 - t0)
        full = float("inf")
        for _ in range(REPEAT):
            sync()
            t0 = time.perf_counter()
            model(x, use_cache=True)
            sync()
            full = min(full, time.perf_counter() - t0)
        out = model(x, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[0, -1].argmax()
        toks = [int(nxt)]
        if device == "cuda":  # the GPU peer is transformers' own eager generate
            gen = model.generate(x, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False)
            sync()
            t2 = time.perf_counter()
            total = t2 - t1
            return PREFILL / best, PREFILL / full, DECODE / max(total - best, 1e-9), gen[0, len(ids):].tolist()
        for _ in range(DECODE - 1):
            out = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[0, -1].argmax()
            toks.append(int(nxt))
        t2 = time.perf_counter()
    return PREFILL / best, PREFILL / full, (DECODE - 1) / (t2 - t1), toks


def bench_llama(gguf: Path, ids: list[int]) -> tuple[float, float, list[int]]:
    """llama.cpp on a GGUF: prefill tokens/s (next-token logits, best of REPEAT) and greedy decode tokens/s."""
    from qconvert.testing.peers import open_llama

    # without weight repacking: llama-cpp-python 0.3.36's AMX path segfaults on this CPU (qconvert/testing/peers.py)
    llm = open_llama(gguf, n_ctx=PREFILL + DECODE + 16, n_batch=PREFILL, n_ubatch=PREFILL,
                     n_threads=2, n_threads_batch=2, verbose=False)
    try:
        llm.eval(ids[:16])  # warm-up
        best = float("inf")
        for _ in range(REPEAT):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - t0)
        def last() -> int:  # argmax of the last evaluated position's logits (llama.cpp keeps only those)
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        nxt = last()
        out = [nxt]
        t1 = time.perf_counter()
        for _ in range(DECODE - 1):
            llm.eval([nxt])
            nxt = last()
            out.append(nxt)
        t2 = time.perf_counter()
    finally:
        llm.close()
    return PREFILL / best, (DECODE - 1) / (t2 - t1), out


def stored_formats(hf: Path, work: Path) -> None:
    """Decode from each stored format against llama.cpp on the same weights; prints the second table."""
    from qconvert.testing.peers import llama_quantize

    qc = str(Path(sys.executable).parent / "qconvert")
    f16, q40, int4 = work / "f16.gguf", work / "q4_0.gguf", work / "int4"
    if not f16.exists():
        subprocess.run([qc, "hf-to-gguf", str(hf), str(f16), "--outtype", "f16", "--quiet"], check=True)
    if not q40.exists():
        llama_quantize(f16, q40, "Q4_0")
    if not int4.exists():
        subprocess.run([qc, "quantize", str(hf), str(int4), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    q4km = fetch_real_model()
    with open_model(str(hf)) as src:
        ids = prompt_tokens(src)
    pairs = [("bf16 folder / F16 GGUF", hf, f16), ("int4 default / llama-quantize Q4_0", int4, q40),
             ("real Q4_K_M file (both)", q4km, q4km)]
    print(f"\ndecoding from stored formats, {PREFILL}-token prompt, {DECODE} decoded tokens, 2 threads (tokens/s)")
    print(f"{'weights (ours / llama.cpp)':<36} {'ours prefill':>12} {'ours decode':>11} {'llama prefill':>13} "
          f"{'llama decode':>12} {'decode x':>9}")
    for name, ours, peer in pairs:
        p, _, d, _ = bench_ours(ours, "numpy")
        lp, ld, _ = bench_llama(peer, ids)
        print(f"{name:<36} {p:12.1f} {d:11.2f} {lp:13.1f} {ld:12.2f} {d / ld:9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hf", type=Path, help="HF folder of the real model (default: gguf-to-hf of the fetched GGUF)")
    ap.add_argument("--cuda", action="store_true", help="also run torch-CUDA vs transformers on CUDA")
    ap.add_argument("--no-llama", dest="llama", action="store_false", help="skip the stored-formats table")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip the first table")
    ap.add_argument("--work", type=Path, help="folder for the F16 / Q4_0 GGUFs and the int4 folder (kept)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    hf = args.hf
    if hf is None:
        hf = Path(tempfile.mkdtemp(prefix="qc-bench-")) / "hf-bf16"
        subprocess.run([str(Path(sys.executable).parent / "qconvert"), "gguf-to-hf", str(fetch_real_model()), str(hf),
                        "--quiet"], check=True)
    if args.llama:
        work = args.work or Path(tempfile.mkdtemp(prefix="qc-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        stored_formats(hf, work)
    if not args.transformers:
        return
    with open_model(str(hf)) as src:
        ids = prompt_tokens(src)
    peer = bench_transformers(hf, ids)
    rows = [("numpy", bench_ours(hf, "numpy")), ("torch-cpu fp32", bench_ours(hf, "torch"))]
    print(f"\nreal Qwen2.5-Coder-0.5B, {PREFILL}-token prefill, {DECODE} decoded tokens, 2 CPU threads")
    print("prefill: next-token logits only; prefill-all: logits at all 512 positions (tokens/s, best of 3)")
    print(f"{'backend':<17} {'prefill':>8} {'prefill-all':>12} {'decode':>7} {'prefill x':>10} {'prefill-all x':>14} "
          f"{'decode x':>9} {'same tokens':>12}")
    print(f"{'transformers':<17} {peer[0]:8.1f} {peer[1]:12.1f} {peer[2]:7.2f} {1:10.2f} {1:14.2f} {1:9.2f} {'-':>12}")
    for name, (p, pa, d, toks) in rows:
        print(f"{name:<17} {p:8.1f} {pa:12.1f} {d:7.2f} {p / peer[0]:10.2f} {pa / peer[1]:14.2f} {d / peer[2]:9.2f} "
              f"{str(toks == peer[3]):>12}")
    if args.cuda and torch.cuda.is_available():
        gp = bench_transformers(hf, ids, "cuda")
        p, pa, d, toks = bench_ours(hf, "torch", "cuda", "bfloat16")
        print(f"{'transformers cuda':<17} {gp[0]:8.1f} {gp[1]:12.1f} {gp[2]:7.2f}")
        print(f"{'torch-cuda bf16':<17} {p:8.1f} {pa:12.1f} {d:7.2f} {p / gp[0]:10.2f} {pa / gp[1]:14.2f} {d / gp[2]:9.2f}")


if __name__ == "__main__":
    main()
