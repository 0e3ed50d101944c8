#!/usr/bin/env bash
# Set up .venv with the test extras (transformers, llama-cpp-python, CPU torch 2.13.0) and run pytest.
# Extra arguments go to pytest. llama-cpp-python builds from source once (~4-8 min); pip caches the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
