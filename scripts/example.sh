#!/usr/bin/env bash
# One command from a fresh clone to a trained model: set up, ingest the bundled digits example,
# train examples/digits.yaml on a local Dask cluster. Extra arguments go to `dasktrain run`
# (e.g. --set cluster.workers=4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
if [ ! -d data/digits.zarr ]; then
  dasktrain ingest data/digits.zarr --example digits --chunk-size 64
fi
# A second run of the example goes to a fresh directory, unless the arguments name one.
if [ -d runs/digits/checkpoints ] && [[ " $* " != *"output_dir="* ]]; then
  echo "example: runs/digits already holds a run; starting a fresh one in runs/digits-$(date +%s)"
  set -- --set "output_dir=runs/digits-$(date +%s)" "$@"
fi
dasktrain run examples/digits.yaml "$@"
