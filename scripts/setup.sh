#!/usr/bin/env bash
# Create .venv and install dasktrain with its test tools. Safe to run again: it only adds
# what is missing. PyTorch is installed first, and only where none is importable, so that
# pip does not pull a multi-GB CUDA build on a CPU machine:
#   TORCH_SPEC   what to install (default torch==2.13.0, whose CPU build pip finds locally here)
#   TORCH_INDEX  an index URL for it, e.g. https://download.pytorch.org/whl/cpu
#   VENV         where the environment goes (default .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "setup: installing dasktrain and its dependencies into $VENV"
"${pip[@]}" install -e ".[test,jobqueue,dashboard,keras,huggingface,s3,tracking]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import dasktrain, torch, dask, distributed, zarr, prefect" \
  || { echo "setup: the environment in $VENV is incomplete" >&2; exit 1; }
