#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent; safe to re-run).
# Installs torch first so that pip never resolves it to a multi-GB CUDA build on a CPU-only box,
# then kdcache itself (editable) with its test/GGUF/report extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ -f .setup-done ] && [ .setup-done -nt pyproject.toml ] && $PY -c "import kdcache, torch, transformers, datasets, pyarrow" 2>/dev/null; then
  exit 0
fi
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PY -m pip install -q "torch>=2.2,<2.15"            # a CUDA build, where there is a GPU
  else
    # On these machines pip serves torch 2.13.0 as a local CPU wheel; a bare `torch` would be CUDA.
    $PY -m pip install -q torch==2.13.0
  fi
fi
$PY -m pip install -q -e ".[test]"
touch .setup-done
