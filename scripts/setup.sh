#!/usr/bin/env bash
# Set up everything the demo and the tests need; safe to run again (it only does what is missing).
#   - Fashion-MNIST from the Debian package dataset-fashion-mnist (no download at run time)
#   - .venv (Python 3.11) with this package installed editable, with its test extras
# pip only: the pinned torch wheels come from the machine's local wheel store, which uv and poetry do not see.
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION_DIR="${GRADPRUNE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "setup: installing Fashion-MNIST (dataset-fashion-mnist)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q dataset-fashion-mnist
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
