#!/usr/bin/env bash
# Create .venv and install stream-rec with its test tools. Idempotent: re-running
# after pyproject.toml changes reinstalls; otherwise it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU build; an unpinned torch would pull a
# multi-GB CUDA build. On a GPU host, install a CUDA torch before this script.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
rm -f .venv/.installed-*
touch "$stamp"
