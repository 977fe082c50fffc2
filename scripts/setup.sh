#!/usr/bin/env bash
# Set up everything the demo and the tests need; safe to run again (it only does what is missing).
#   - Fashion-MNIST from the Debian package dataset-fashion-mnist (no download at run time)
#   - Chromium from the Debian package chromium, for the MLflow UI review test
#   - .venv (Python 3.11) with this package installed editable, with its test extras
# pip only: the pinned torch wheels come from the machine's local wheel store, which uv and poetry do not see.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, installed only when missing (one apt-get update for all of them):
#   dataset-fashion-mnist  Fashion-MNIST for the demo and the tests
#   chromium               the headless browser of the MLflow UI review test (tests/test_review_ui.py)
FASHION_DIR="${GRADPRUNE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
APT_MISSING=""
if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then APT_MISSING="$APT_MISSING dataset-fashion-mnist"; fi
if [ ! -x /usr/bin/chromium ]; then APT_MISSING="$APT_MISSING chromium"; fi
if [ -n "$APT_MISSING" ]; then
    echo "setup: installing$APT_MISSING"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    # shellcheck disable=SC2086  # one word per package
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $APT_MISSING
fi

if [ ! -x .venv/bin/python ]; then
    PYTHON="$(command -v python3.11 || true)"
    if [ -z "$PYTHON" ]; then
        echo "setup: error: python3.11 not found; install Python 3.11 and rerun" >&2
        exit 1
    fi
    echo "setup: creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last successful install (or nothing is installed yet).
STAMP=.venv/.gradprune-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ] || [ ! -x .venv/bin/gradprune ]; then
    echo "setup: pip install -e '.[test]'"
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$WANT" > "$STAMP"
fi
