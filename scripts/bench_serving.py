#!/usr/bin/env python3
"""GPTQ checkpoint -> GGUF on the real Qwen2.5-Coder-0.5B, peers measured in the same run.

A GPTQ v1 checkpoint (4-bit, symmetric, group 128: the layout of Qwen's own -GPTQ-Int4 releases) is made from
the bf16 HF folder with `qconvert export --to gptq --sym` (GPTQ codes on f16 scales). Then:

- ours: `qconvert hf-to-gguf GPTQ --outtype q4_0_mix` (llama-quantize's Q4_0 file: same types, same size) maps
  the codes onto Q4_0 blocks (no requantisation) and encodes the F16 embedding and head as that file does;
- llama.cpp: `convert_hf_to_gguf.py GPTQ --outtype f16` (dequantises) + `llama-quantize F16 Q4_0` (requantises),
  the only way llama.cpp's tools reach a 4-bit GGUF from it.

Wall time and peak RSS of each process, file sizes, and the KL of llama.cpp's logits on each GGUF against our
decoder on the GPTQ folder (how far each GGUF is from the checkpoint it came from). Prints ratios (ours / peer).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_convert import measure_rusage  # noqa: E402

from qconvert.testing.peers import kl_stats, llama_convert_cmd, llama_logits, llama_tokenize, llama_tool  # noqa: E402

QC = str(Path(sys.executable).parent / "qconvert")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hf", type=Path, required=True, help="bf16 HF folder of the real 0.5B (qconvert gguf-to-hf)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    gptq = w / "gptq"
    if not (gptq / "config.json").is_file():
        subprocess.run([QC, "export", str(args.hf), str(gptq), "--to", "gptq", "--sym", "--quiet", "--force"],
                       check=True)
    ours = measure_rusage([QC, "hf-to-gguf", str(gptq), str(w / "ours.gguf"), "--outtype", "q4_0_mix", "--force",
                           "--quiet"])
    print("ours:", ours[2].strip().splitlines()[0])
    cmd, env = llama_convert_cmd(gptq, w / "llama-f16.gguf", "f16")
    conv = measure_rusage(cmd, env)
    quant = measure_rusage([str(llama_tool("llama-quantize")), str(w / "llama-f16.gguf"), str(w / "llama-q4_0.gguf"),
                            "Q4_0", "2"])
    peer = (conv[0] + quant[0], max(conv[1], quant[1]))
    text = (ROOT / "qconvert" / "data" / "verify.txt").read_text()
    toks = llama_tokenize(w / "ours.gguf", text)[: args.tokens]
    from formats.open import open_model
    from qconvert.decoder import make_decoder
    with open_model(str(gptq)) as src:
        ref = make_decoder(src, "numpy").logits(toks)
    k_ours = kl_stats(ref, llama_logits(w / "ours.gguf", toks))
    k_peer = kl_stats(ref, llama_logits(w / "llama-q4_0.gguf", toks))
    mib = lambda p: p.stat().st_size / 2**20  # noqa: E731
    print(f"\nGPTQ 4-bit g128 sym -> Q4_0 GGUF, real 0.5B ({len(toks)} tokens of verify.txt for the KL)")
    print(f"{'':34s} {'ours':>10s} {'llama.cpp':>10s} {'ratio':>7s}")
    print(f"{'wall s (convert [+ quantize])':34s} {ours[0]:10.1f} {peer[0]:10.1f} {ours[0] / peer[0]:7.2f}")
    print(f"{'peak RSS MiB':34s} {ours[1]:10.0f} {peer[1]:10.0f} {ours[1] / peer[1]:7.2f}")
    print(f"{'GGUF MiB':34s} {mib(w / 'ours.gguf'):10.1f} {mib(w / 'llama-q4_0.gguf'):10.1f}")
    print(f"{'KL vs the GPTQ model (mean)':34s} {k_ours['mean_kl']:10.2e} {k_peer['mean_kl']:10.2e} "
          f"{k_ours['mean_kl'] / k_peer['mean_kl']:7.3f}")
    print(f"{'top-1 vs the GPTQ model':34s} {k_ours['top1']:10.2%} {k_peer['top1']:10.2%}")


if __name__ == "__main__":
    main()
