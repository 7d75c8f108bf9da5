#!/usr/bin/env bash
# One prepared GPU check (issue 21): make an environment with a CUDA torch, then run scripts/gpu_check.py, which
# writes gpu_check.json and gpu_check.md under $OUT (default runs/gpu_check) and prints a line per check.
#   OUT=/path/to/out scripts/gpu_check.sh [gpu_check.py options, e.g. --quick or --checks throughput,hf]
# The environment is .venv-gpu (GPU_CHECK_VENV). Where $PYTHON (default python3) already has a torch that sees
# CUDA, the venv is built on it (--system-site-packages; a GPU machine may reach no package index) and only
# missing packages are installed; otherwise torch comes from PyPI (its Linux x86_64 wheel is the CUDA build).
# Everything else at constraints.txt's versions; liger-kernel (train.loss fused_linear) when it can be had.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
python="${PYTHON:-python3}"
venv="${GPU_CHECK_VENV:-.venv-gpu}"
pip_flags=(-q --retries 0 --timeout 15)

if [[ " $* " != *" --cpu-smoke "* ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device (nvidia-smi finds no GPU); run on a GPU machine" >&2
  exit 2
fi
cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

no_torch_pins=$(mktemp)
trap 'rm -f "$no_torch_pins"' EXIT
grep -v '^torch==' constraints.txt > "$no_torch_pins"
if [ ! -x "$venv/bin/python" ]; then
  if cuda_torch "$python"; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
    "$venv/bin/pip" install "${pip_flags[@]}" -c constraints.txt torch
  fi
fi
cuda_torch "$venv/bin/python" || echo "gpu_check.sh: the torch in $venv does not see a CUDA device" >&2

# cpt's dependencies from pyproject.toml (torch as it is): a no-op where they are installed at these versions.
deps=$("$venv/bin/python" - <<'PY'
import re
text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
print(" ".join(d for d in re.findall(r'"([^"]+)"', block) if not d.startswith("torch")))
PY
)
# shellcheck disable=SC2086
if ! "$venv/bin/pip" install "${pip_flags[@]}" -c "$no_torch_pins" $deps; then
  echo "gpu_check.sh: could not install cpt's dependencies into $venv (no package index reachable?); install" \
       "them into $python, or point PYTHON at an interpreter that has them" >&2
  exit 3
fi
"$venv/bin/python" -c 'import liger_kernel' 2>/dev/null ||
  "$venv/bin/pip" install "${pip_flags[@]}" --no-deps liger-kernel 2>/dev/null ||
  echo "gpu_check.sh: liger-kernel not installed: train.loss fused_linear falls back to the chunked loss" >&2

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" scripts/gpu_check.py --out "$out" "$@"
