#!/usr/bin/env bash
# Set up (see setup.sh), then run the whole pipeline end to end on embedded local services.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gradprune demo "$@"
