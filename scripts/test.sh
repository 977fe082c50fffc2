#!/usr/bin/env bash
# Set up (see setup.sh), then run the whole test suite. Extra arguments go to pytest (`-n 0`: one process).
# Two pytest-xdist workers, a test module per worker at a time (module fixtures start servers once): much of the
# suite waits on MLflow, moto, Prefect and subprocesses, so two workers on two cores take about 0.7x the time of one.
# pytest's own exit code is ours: 5 ("no tests collected") is a failure too. The slowest tests close the log, so that
# a suite that grows slower says where.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --durations=20 "$@"
