#!/usr/bin/env bash
# Sets up a virtualenv (.venv) with the test dependencies and runs lint + the whole test suite.
# Works on a fresh machine with Python >= 3.11 and access to PyPI. The parity tests need CPU torch 2.13.0
# and transformers 5.23.0 (pinned in the `test` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
ruff check .
ruff format --check .
python -m pytest -q "$@"
