#!/usr/bin/env bash
# The prepared GPU check (issue 14): environment, CUDA tests, a real bf16 SmolLM2 conversion
# through `deepspeed` (NCCL) with export and held-out perplexity, the GPU benchmarks, and with the
# time left the quality study's full setting for DOT and pruning. Every step records
# pass/fail/skip with its reason and command in the results folder's summary.md, raw logs beside
# it; no step stops the next. The logic is tools/gpu_check.py (its docstring has the details).
#
# Here, first (CPU, once): bash tools/gpu_wheels.sh        # fills .whl/ .gpu_a/ .gpu_b/, checks 64 MiB
#                          bash tools/gpu_check.sh --dry_run  # validates every step, no CUDA needed
#
# On the device (device tool `run`; two calls back to back: the machine stays warm only ~30 s and
# call 2 needs the GGUF half and wheels call 1 staged in the ignored .gpu_state/):
#   call 1: carry [".whl", ".gpu_a"]  timeout_s 300
#           command: bash tools/gpu_check.sh --part a --budget 210
#   call 2: carry [".whl", ".gpu_b"]  timeout_s 390   (at once after call 1)
#           command: bash tools/gpu_check.sh --part b --budget 300
#   rerun one step (machine still warm): carry [".whl"]  timeout_s 260
#           command: bash tools/gpu_check.sh --only STEP --budget 200
#   machine went cold before call 2: call 1's carry with `--part a --stage_only`, then call 2 at once.
# Call 1 runs env, cuda_tests, the three benchmarks (SmolLM2's shape, random weights) and, with time
# left, the fast suite; call 2 joins the halves (sha256), dequantises, and runs convert, then with
# time left quality_dot and quality_prune. What comes back: $OUT/summary.md and
# $OUT/gpu_results.tar.gz; here: mkdir -p results/gpu && tar xzf FILES_AT/gpu_results.tar.gz -C
# results/gpu, then commit results/gpu/ (README "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -z "${OUT:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python          # a development checkout
else
  PY=python3                   # the GPU image's python3 holds torch
fi
exec "$PY" tools/gpu_check.py "$@"
