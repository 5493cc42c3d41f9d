#!/usr/bin/env bash
# One command from a fresh clone to a tested tree: set up, lint, run the test suite.
# Extra arguments go to pytest (e.g. -k resume, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
ruff check pipeline cluster flows tests benchmarks
python -m pytest -q -p no:cacheprovider "$@"
