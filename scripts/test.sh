#!/usr/bin/env bash
# One command from a fresh clone to a tested tree: set up, lint, start the services the tests
# use (a local Prefect server; a one-node SLURM, where this runs as root), run the test suite,
# and stop what it started, by pid, however the tests end.
# Tests whose service could not be started skip with the reason. Extra arguments go to pytest
# (e.g. -k resume, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
ruff check pipeline cluster flows tests benchmarks
bash scripts/typecheck.sh

prefect_dir=$(mktemp -d)
# pytest's own temporary root keeps only the newest three sessions of a user, so another pytest
# started meanwhile on this machine would delete this run's files under it: a root of its own.
pytest_tmp=$(mktemp -d)
stop_services() {
  bash scripts/prefect-server.sh stop "$prefect_dir" || true
  rm -rf "$prefect_dir" "$pytest_tmp"
  bash scripts/slurm/stop.sh || true
}
trap stop_services EXIT
api_line=$(bash scripts/prefect-server.sh start "$prefect_dir")
export "$api_line"   # PREFECT_API_URL for the flow and deployment tests
if [ "$(id -u)" = 0 ] && bash scripts/slurm/start.sh; then
  export SLURM_CONF=${DASKTRAIN_SLURM_DIR:-/tmp/dasktrain-slurm}/slurm.conf
else
  echo "test: SLURM could not be started here; the SLURM tests will skip"
fi

# Two pytest processes (pytest-xdist), each taking whole test files, so a module's cluster and
# server fixtures stay in one process: the tests spend much of their time starting processes and
# waiting on them, and one process kept only about one core busy. DASKTRAIN_TEST_PROCESSES=0 runs
# them in this process, one after the other. The 15 slowest tests are listed at the end, to keep
# the suite near its 10-minute budget.
python -m pytest -q -p no:cacheprovider --durations=15 --basetemp "$pytest_tmp/t" -n "${DASKTRAIN_TEST_PROCESSES:-2}" --dist loadfile "$@"
