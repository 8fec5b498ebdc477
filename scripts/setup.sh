#!/usr/bin/env bash
# Create .venv with Python 3.11, a PyTorch build that fits this machine, and causalrec.
#   bash scripts/setup.sh            # causalrec + test tools
#   PYTHON=python3.11 VENV=.venv TORCH_CUDA=1 bash scripts/setup.sh
# PyTorch: a CUDA build when an NVIDIA GPU is visible (or TORCH_CUDA=1), else a CPU build:
# a local CPU wheel if pip's find-links has one, else PyTorch's CPU index. (PyPI's default
# Linux torch is a CUDA build with ~6 GB of libraries, useless without a GPU.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ "${TORCH_CUDA:-0}" = 1 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif "${PIP[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: installed the local CPU wheel of torch $TORCH_VERSION"
  else
    echo "setup: installing the CPU build of torch from PyTorch's CPU index"
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
"${PIP[@]}" install -q -e ".[test]"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, recbole, trl; print(f"torch {torch.__version__}, recbole {recbole.__version__}, trl {trl.__version__}")'))"
