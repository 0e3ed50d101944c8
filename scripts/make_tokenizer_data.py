#!/usr/bin/env python3
"""Regenerate qconvert/data/qwen2-tokenizer/ (the tokenizer the tiny checkpoints use) from the real GGUF.

The files are qconvert's own gguf-to-hf tokenizer output for Qwen2.5-Coder-0.5B-Instruct; the test suite
checks that this tokenizer tokenises exactly like llama.cpp does with the GGUF.
"""
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from formats.open import open_model  # noqa: E402
from qconvert.testing.fetch import fetch_real_model  # noqa: E402
from qconvert.testing.tiny import DATA  # noqa: E402

if __name__ == "__main__":
    with open_model(str(fetch_real_model())) as src:
        files = src.tokenizer.to_hf_files()
    DATA.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(DATA / "tokenizer.json.gz", "wb", mtime=0) as f:
        f.write(json.dumps(files["tokenizer.json"], ensure_ascii=False, indent=2).encode("utf-8"))
    (DATA / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config.json"], ensure_ascii=False, indent=2) + "\n")
    print(f"wrote {DATA}")
