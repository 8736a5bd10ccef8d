#!/usr/bin/env bash
# Prepares what the GPU check (tools/gpu_check.sh) carries to the device machine, which has no
# network: three ignored folders, and prints their sizes against the 64 MiB a call may carry.
#
#   bash tools/gpu_wheels.sh            # idempotent: a second run only re-checks the sizes
#
#   .whl/    wheels for Python 3.12 / x86-64 of what the GPU image lacks or has too old (KINDS.md):
#            deepspeed (built here as a pure-python wheel, DS_BUILD_OPS=0: PyPI has only the sdist)
#            and its missing needs (hjson, pydantic + pydantic-core, annotated-types,
#            typing-inspection, typing-extensions >= 4.16 for pydantic), datasets and its missing
#            needs (dill, multiprocess, fsspec <= 2026.9.0), fire (+ termcolor), gguf, and POT for
#            the Sinkhorn benchmark (0.9.6.post1: 1.5 MB; 0.9.7's wheel is 33 MB). transformers is
#            NOT carried: the image's 5.17 runs our code (setup.cfg accepts >= 5.17, see README "GPU").
#   .gpu_a/  the first half of the SmolLM2 GGUF (98 MB: it does not fit one call), its sha256, and
#            the six Austen books (austen.tar.xz) for the conversion and the quality study
#   .gpu_b/  the second half of the GGUF and the same sha256
# Call 1 carries [.whl, .gpu_a], call 2 [.whl, .gpu_b]; the device keeps what call 1 staged in
# the ignored .gpu_state/ while the machine is warm, and call 2 reassembles and checks the GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# The shared data folder sits beside the main checkout (../shared), or beside the worktrees' parent.
if [ -z "${AUSTEN_DIR:-}" ]; then
  AUSTEN_DIR=../shared/data/austen
  [ -d "$AUSTEN_DIR" ] || AUSTEN_DIR=../../shared/data/austen
fi
LIMIT=$((64 * 1024 * 1024))

# name==version, one per line; versions are the ones the CPU venv runs where the project pins one.
WHEELS="
hjson==3.1.0
pydantic==2.14.4
pydantic_core==2.50.5
annotated-types==0.8.0
typing-inspection==0.4.5
typing_extensions==4.16.0
datasets==5.2.0
dill==0.4.1
multiprocess==0.70.19
fsspec==2026.9.0
fire==0.7.1
termcolor==3.3.0
gguf==0.19.0
POT==0.9.6.post1
"
DEEPSPEED=0.19.8

mkdir -p .whl .gpu_a .gpu_b
pip_dl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$1"
}
have_wheel() {   # pip normalises names in file names: '-' and '.' become '_', case varies
  local norm
  norm=$(echo "${1%%==*}" | tr 'A-Z.-' 'a-z__')
  ls .whl 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^${norm}-${1##*==}-"
}
for spec in $WHEELS; do
  have_wheel "$spec" || pip_dl "$spec"
done
if ! have_wheel "deepspeed==$DEEPSPEED"; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$DEEPSPEED"
  # --no-build-isolation: setup.py imports torch, which the build then takes from this venv.
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
# One version of each package: two would stop the whole install on the device.
dups=$(ls .whl | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "gpu_wheels: more than one wheel of: $dups (remove the extra from .whl/)" >&2; exit 1; }

# The GGUF in two halves plus its checksum.
GGUF=$("$PY" -c "from dotmoe_ds.demo import find_demo_gguf; print(find_demo_gguf())")
SUM=$(sha256sum "$GGUF" | cut -d' ' -f1)
if [ "$(cat .gpu_a/smollm2.gguf.sha256 2>/dev/null)" != "$SUM" ] || [ ! -f .gpu_b/smollm2.gguf.part2 ]; then
  size=$(stat -c %s "$GGUF")
  half=$(( (size + 1) / 2 ))
  head -c "$half" "$GGUF" > .gpu_a/smollm2.gguf.part1
  tail -c +"$((half + 1))" "$GGUF" > .gpu_b/smollm2.gguf.part2
  echo "$SUM" > .gpu_a/smollm2.gguf.sha256
  echo "$SUM" > .gpu_b/smollm2.gguf.sha256
  basename "$GGUF" > .gpu_a/smollm2.gguf.name
  basename "$GGUF" > .gpu_b/smollm2.gguf.name
fi
if [ ! -f .gpu_a/austen.tar.xz ]; then
  if [ -d "$AUSTEN_DIR" ]; then
    tar -C "$AUSTEN_DIR" -cJf .gpu_a/austen.tar.xz .
  else
    echo "gpu_wheels: $AUSTEN_DIR not found: the device runs use the shipped excerpt (dotmoe_ds/demo_data)" >&2
  fi
fi

# What each call sends: the tree (tracked + untracked-not-ignored files) plus its carried folders.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
bytes() { du -sb "$1" | cut -f1; }
whl=$(bytes .whl); a=$(bytes .gpu_a); b=$(bytes .gpu_b)
call1=$((tree + whl + a)); call2=$((tree + whl + b))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "tree $(mib "$tree"); .whl $(mib "$whl") ($(ls .whl | wc -l) wheels); .gpu_a $(mib "$a"); .gpu_b $(mib "$b")"
echo "call 1 carries [.whl, .gpu_a]: $(mib "$call1") of 64 MiB; call 2 carries [.whl, .gpu_b]: $(mib "$call2") of 64 MiB"
if [ "$call1" -gt "$LIMIT" ] || [ "$call2" -gt "$LIMIT" ]; then
  echo "gpu_wheels: a call would carry more than 64 MiB; the device tool refuses it" >&2
  exit 1
fi
