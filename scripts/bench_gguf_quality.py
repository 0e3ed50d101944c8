"""GGUF quality at equal size, judged by llama.cpp: llama-quantize (without / with llama-imatrix's importance
matrix) against qconvert (its own imatrix; GPTQ onto the GGML blocks, at the default settings and, as
``ours-gptq-ep``, with ``--damp 0.1 --propagate 0.5``), per file type.

Every file is evaluated in llama.cpp: ``llama-perplexity --kl-divergence`` against the F16 GGUF's logits on the
same evaluation tokens (16 x 512 of CPython stdlib source, disjoint from the calibration text), giving mean KL,
same-top-token rate and PPL; plus size, bits per weight and the time to make the file (imatrix time counted
separately). The llama.cpp tools (llama-quantize, llama-imatrix, llama-perplexity) are built once from the
llama-cpp-python sdist (qconvert.peers.llama_tool).

    python scripts/bench_gguf_quality.py --f16 /tmp/real/f16.gguf --hf /tmp/real/hf-bf16 --types q4_0 iq4_xs q3_k_m

Note: the real 0.5B's weights were dequantised from Q4_K_M, so K-quant types re-land on their own grid; Q4_0,
Q4_1, Q5_0, Q3_K_M and IQ4_XS are the fair comparisons there.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qconvert.corpus import CALIB_MODULES, EVAL_MODULES, stdlib_text  # noqa: E402
from qconvert.quant.mixtures import MIXTURES  # noqa: E402
from qconvert.testing.peers import llama_tool  # noqa: E402

QC = str(Path(sys.executable).parent / "qconvert")
# GPTQ variants: extra quantize flags. ours-gptq-ep: stronger dampening plus half the error-propagation change
GPTQ_VARIANTS = {"ours-gptq": [], "ours-gptq-ep": ["--damp", "0.1", "--propagate", "0.5"]}
# our mixture name -> llama-quantize's type name
LLAMA_NAME = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q3_k_m": "Q3_K_M", "q4_k_m": "Q4_K_M",
              "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q2_k": "Q2_K", "iq4_xs": "IQ4_XS",
              "iq4_nl": "IQ4_NL", "iq1_s": "IQ1_S", "iq1_m": "IQ1_M", "iq2_xxs": "IQ2_XXS", "iq2_xs": "IQ2_XS",
              "iq2_s": "IQ2_S", "iq2_m": "IQ2_M", "iq3_xxs": "IQ3_XXS", "iq3_xs": "IQ3_XS", "iq3_s": "IQ3_S",
              "iq3_m": "IQ3_M"}


def ours_mixture(t: str) -> str:
    """Our name of llama-quantize's file type ``t`` (its Q4_0 file is our q4_0_mix)."""
    return t if t in MIXTURES else f"{t}_mix"


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def kl_eval(model: Path, base: Path, text: Path, chunks: int, ctx: int, log: Path) -> dict[str, float]:
    """llama-perplexity --kl-divergence of ``model`` against the saved F16 logits ``base``."""
    timed([str(llama_tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks",
           str(chunks), "-t", "2", "--kl-divergence-base", str(base), "--kl-divergence"], log)
    out = log.read_text(errors="replace")

    def grab(pat: str) -> float:
        m = re.search(pat, out)
        if not m:
            sys.exit(f"no {pat!r} in {log}")
        return float(m.group(1))
    return {"kl": grab(r"Mean\s+KLD:\s+([\d.eE+-]+)"), "top1": grab(r"Same top p:\s+([\d.]+)"),
            "ppl": grab(r"Mean PPL\(Q\)\s+:\s+([\d.]+)")}


def gguf_bpw(path: Path) -> tuple[float, int]:
    """Bits per weight of the quantised 2-D tensors and the file size."""
    from formats.gguf.header import read_header
    n = b = 0
    for t in read_header(path)[1]:
        if len(t.shape) > 1 and t.type not in ("F32",):
            n += int(__import__("numpy").prod(t.shape))
            b += t.nbytes
    return 8 * b / n, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--f16", type=Path, required=True, help="F16 GGUF of the model (the KL reference)")
    ap.add_argument("--hf", type=Path, help="HF folder of the model for GPTQ (default: the F16 GGUF)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qconvert-bench-gguf"))
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_1", "q5_0", "q3_k_m", "iq4_xs"])
    ap.add_argument("--variants", nargs="+", default=["llama", "llama-imatrix", "ours-imatrix", "ours-gptq"],
                    choices=["llama", "llama-imatrix", "ours-imatrix", *GPTQ_VARIANTS])
    ap.add_argument("--chunks", type=int, default=16, help="evaluation chunks")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-chunks", type=int, default=16, help="imatrix calibration chunks of --ctx tokens")
    ap.add_argument("--reuse", action="store_true", help="keep files already in --work")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    calib, evalt = w / "calib.txt", w / "eval.txt"
    calib.write_text(stdlib_text(CALIB_MODULES))
    evalt.write_text(stdlib_text(EVAL_MODULES))
    base = w / "f16-logits.bin"
    if not (args.reuse and base.exists()):
        timed([str(llama_tool("llama-perplexity")), "-m", str(args.f16), "-f", str(evalt), "-c", str(args.ctx),
               "--chunks", str(args.chunks), "-t", "2", "--kl-divergence-base", str(base)], w / "f16.log")
    im_llama, im_ours = w / "imatrix-llama.gguf", w / "imatrix-ours.gguf"
    t_im = {}
    if not (args.reuse and im_llama.exists()):
        t_im["llama"] = timed([str(llama_tool("llama-imatrix")), "-m", str(args.f16), "-f", str(calib), "-c",
                               str(args.ctx), "--chunks", str(args.calib_chunks), "-t", "2", "-o", str(im_llama)],
                              w / "imatrix-llama.log")
    if not (args.reuse and im_ours.exists()):
        t_im["ours"] = timed([QC, "imatrix", str(args.f16), "--calib", str(calib), "-o", str(im_ours), "--ctx",
                              str(args.ctx), "--chunks", str(args.calib_chunks), "--force", "--quiet"],
                             w / "imatrix-ours.log")
    for k, v in t_im.items():
        print(f"imatrix ({k}): {v:.1f}s", flush=True)
    rows = []
    for t in args.types:
        for var in args.variants:
            out = w / f"{t}-{var}.gguf"
            if not (args.reuse and out.exists()):
                if var.startswith("llama"):
                    cmd = [str(llama_tool("llama-quantize"))] + (["--imatrix", str(im_llama)] if var == "llama-imatrix"
                                                                 else []) + [str(args.f16), str(out), LLAMA_NAME[t], "2"]
                elif var == "ours-imatrix":
                    cmd = [QC, "hf-to-gguf", str(args.f16), str(out), "--outtype", ours_mixture(t), "--imatrix",
                           str(im_ours), "--force", "--quiet"]
                else:
                    cmd = [QC, "quantize", str(args.hf or args.f16), str(out), "--format", "gguf", "--type",
                           ours_mixture(t), "--method", "gptq", "--imatrix", str(im_ours), "--force", "--quiet"]
                    cmd += GPTQ_VARIANTS[var]
                dt = timed(cmd, w / f"{t}-{var}.log")
            else:
                dt = float("nan")
            bpw, size = gguf_bpw(out)
            r = kl_eval(out, base, evalt, args.chunks, args.ctx, w / f"{t}-{var}.kl.log")
            rows.append((t, var, size, bpw, r["kl"], r["top1"], r["ppl"], dt))
            print(f"{t:<7} {var:<14} {size / 2**20:8.1f} MiB {bpw:5.2f} bpw  KL {r['kl']:.5f}  top-1 {r['top1']:.2f}%  "
                  f"PPL {r['ppl']:.4f}  {dt:6.1f}s", flush=True)
    print(f"\n{args.f16.name}: llama.cpp KL vs F16 on {args.chunks} x {args.ctx} eval tokens "
          f"(calibration {args.calib_chunks} x {args.ctx}, disjoint)")
    print(f"{'type':<7} {'variant':<14} {'MiB':>8} {'bpw':>5} {'mean KL':>9} {'KL x':>6} {'top-1':>7} {'PPL':>8} {'time':>7}")
    for t, var, size, bpw, kl, top1, ppl, dt in rows:
        ref = next((r[4] for r in rows if r[0] == t and r[1] == "llama-imatrix"), None)
        ratio = f"{kl / ref:6.2f}" if ref else "     -"
        print(f"{t:<7} {var:<14} {size / 2**20:8.1f} {bpw:5.2f} {kl:9.5f} {ratio} {top1:6.2f}% {ppl:8.4f} {dt:6.1f}s")
    print("KL x: relative to llama-quantize with llama-imatrix's importance matrix")


if __name__ == "__main__":
    main()
