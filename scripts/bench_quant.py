#!/usr/bin/env python3
"""Quantisation benchmark on the real Qwen2.5-Coder-0.5B: our int4 vs llama.cpp's Q4_0 / Q4_K_M.

Every model is evaluated by the numpy reference decoder (weights dequantised exactly, float32 maths)
on the same windows of CPython standard-library source (qconvert.corpus.EVAL_MODULES, disjoint from
the GPTQ calibration modules): mean KL divergence vs the bf16 model, top-1 agreement, perplexity.
So the table compares weight quantisation alone (llama.cpp's own runtime would also round activations
to 8 bits). llama.cpp's files are made by llama-quantize (through llama-cpp-python, no imatrix) from
a BF16 GGUF of the same weights. Bits per weight count the quantised matrices, the head excluded;
size is the whole file / directory. Time: our `qconvert quantize` vs llama-quantize, same machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats.gguf.header import read_header  # noqa: E402
from formats.open import open_model  # noqa: E402
from qconvert.corpus import EVAL_MODULES, stdlib_text, tokens_digest, windows  # noqa: E402
from qconvert.decoder import make_decoder  # noqa: E402
from qconvert.testing.fetch import fetch_real_model  # noqa: E402
from qconvert.testing.peers import llama_quantize  # noqa: E402
from qconvert.text import encode  # noqa: E402
from qconvert.verify import log_softmax  # noqa: E402

QC = str(Path(sys.executable).parent / "qconvert")
# int4 variants: tag -> quantize flags. Uniform plans with f16 scales (the version-1 layout's choices) per
# group size and method, and the default plan (--mix roles, 32-wide groups, 8-bit scale codes).
INT4 = {f"g{g}-{m}": ["--group-size", str(g), "--method", m, "--mix", "uniform", "--scale-bits", "16"]
        for m in ("rtn", "search", "gptq") for g in (32, 64, 128)}
INT4.update({"mix-search": [], "mix-gptq": ["--method", "gptq"],  # the default plan; then with integer zeros
             "mix-search-zint": ["--zero-point", "int"], "mix-gptq-zint": ["--method", "gptq", "--zero-point", "int"]})


def run(*args: str) -> float:
    """Run the qconvert CLI quietly; seconds taken."""
    t0 = time.perf_counter()
    subprocess.run([QC, *args, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def reference(hf: Path, ws: list[np.ndarray], store: Path) -> np.memmap:
    """bf16 model logits of every window, kept on disk (float32 [n, ctx, vocab])."""
    with open_model(str(hf)) as src:
        dec = make_decoder(src, "numpy")
        ref = np.lib.format.open_memmap(store, "w+", np.float32, (len(ws), len(ws[0]), src.config.vocab_size))
        for i, w in enumerate(ws):
            ref[i] = dec.logits(w)
    ref.flush()
    return ref


def evaluate(model: Path, ref: np.memmap, ws: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean KL vs ref, top-1 agreement, perplexity) of ``model`` on the windows."""
    kls, agree, nll, n = [], 0, 0.0, 0
    with open_model(str(model)) as src:
        dec = make_decoder(src, "numpy")
        for i, w in enumerate(ws):
            lq = log_softmax(dec.logits(w))
            lp = log_softmax(np.asarray(ref[i]))
            kls.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            nll += float(-lq[np.arange(len(w) - 1), w[1:]].sum())
            n += len(w)
    return float(np.mean(kls)), agree / n, float(np.exp(nll / (n - len(ws))))


def gguf_bpw(path: Path) -> float:
    """Bits per weight over the quantised matrices of a GGUF, the output head excluded."""
    head = {"output.weight", "token_embd.weight"}
    ts = [t for t in read_header(path)[1] if t.type not in ("F32", "F16", "BF16") and t.name not in head]
    return 8 * sum(t.nbytes for t in ts) / sum(int(np.prod(t.shape)) for t in ts)


def int4_stats(d: Path) -> tuple[float, int]:
    """(bits per weight without the head, directory bytes) of an int4 folder, from its header."""
    import json

    from formats.container.safetensors_io import read_header as st_header
    header, _ = st_header(d / "model.int4.safetensors")
    qinfo = json.loads(header["__metadata__"]["tensors"])
    cfgd = json.loads((d / "config.json").read_text())
    head = "model.embed_tokens.weight" if cfgd.get("tie_word_embeddings") else "lm_head.weight"
    nb = npar = 0
    for name, info in qinfo.items():
        if name == head:
            continue
        npar += int(np.prod(info["shape"]))
        for part in ("qweight", "scales", "offsets", "zeros", "steps"):
            if f"{name}.{part}" in header:
                a, b = header[f"{name}.{part}"]["data_offsets"]
                nb += b - a
    return 8 * nb / npar, sum(p.stat().st_size for p in d.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, help="bf16 HF folder of the real model (default: gguf-to-hf of the fetched GGUF)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qconvert-bench-quant"), help="folder for the files made")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window")
    ap.add_argument("--only", nargs="*", help="int4 variants to run, e.g. mix-search g64-gptq (default: all: "
                    + " ".join(INT4) + ")")
    ap.add_argument("--reuse", action="store_true", help="evaluate outputs already in --work instead of remaking them")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = args.hf or work / "hf-bf16"
    if not (hf / "config.json").exists():
        run("gguf-to-hf", str(fetch_real_model()), str(hf), "--dtype", "bf16", "--force")
    with open_model(str(hf)) as src:
        ws = windows(encode(src.tokenizer, stdlib_text(EVAL_MODULES)), args.windows, args.ctx)
    print(f"eval: {len(ws)} x {args.ctx} tokens of CPython {sysconfig.get_python_version()} stdlib "
          f"({', '.join(EVAL_MODULES)}), token ids {tokens_digest(ws)}", flush=True)
    t0 = time.perf_counter()
    store = work / "ref-logits.npy"
    ref = np.load(store, mmap_mode="r") if args.reuse and store.exists() else None
    if ref is None or ref.shape[:2] != (len(ws), args.ctx):  # windows are deterministic: same shape, same tokens
        ref = reference(hf, ws, store)
    print(f"reference logits in {time.perf_counter() - t0:.0f}s", flush=True)

    rows = []
    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        run("hf-to-gguf", str(hf), str(bf16), "--outtype", "bf16")
    for ftype in ("Q4_0", "Q4_K_M"):
        out = work / f"llama-{ftype}.gguf"
        dt = float("nan")
        if not (args.reuse and out.exists()):
            t0 = time.perf_counter()
            llama_quantize(bf16, out, ftype)
            dt = time.perf_counter() - t0
        rows.append((f"llama.cpp {ftype}", gguf_bpw(out), out.stat().st_size, dt, *evaluate(out, ref, ws)))
        print(rows[-1], flush=True)
    for tag, flags in INT4.items():
        if args.only and tag not in args.only:
            continue
        out = work / f"int4-{tag}"
        dt = float("nan")
        if not (args.reuse and (out / "config.json").exists()):
            dt = run("quantize", str(hf), str(out), *flags, "--force")
        bpw, size = int4_stats(out)
        rows.append((f"int4 {tag}", bpw, size, dt, *evaluate(out, ref, ws)))
        print(rows[-1], flush=True)

    q40 = rows[0]
    print(f"\nreal Qwen2.5-Coder-0.5B vs bf16, {len(ws)} x {args.ctx} stdlib tokens, numpy reference decoder")
    print(f"{'model':<24} {'bpw':>5} {'MiB':>7} {'size x':>7} {'time s':>7} {'mean KL':>8} {'KL x':>6} "
          f"{'top-1':>6} {'ppl':>7}")
    for name, bpw, size, dt, kl, top1, ppl in rows:
        print(f"{name:<24} {bpw:5.2f} {size / 2**20:7.1f} {size / q40[2]:7.2f} {dt:7.1f} {kl:8.4f} "
              f"{kl / q40[4]:6.2f} {100 * top1:5.1f}% {ppl:7.3f}")
    print("bpw: quantised matrices, head excluded; size x and KL x: relative to llama.cpp Q4_0; "
          "time: qconvert quantize vs llama-quantize (from the BF16 GGUF)")


if __name__ == "__main__":
    main()
