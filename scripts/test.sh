#!/usr/bin/env bash
# Set up (see setup.sh), then run the whole test suite. Extra arguments go to pytest.
# pytest's own exit code is ours: 5 ("no tests collected") is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
