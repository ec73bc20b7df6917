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
# Reference files nobody on this project wrote (Google's Gemma 4 chat template, llama.cpp's Gemma 4 vocab) are
# read from the llama-cpp-python sdist; see tests/references.py.
if [ ! -f .cache/sdist/llama_cpp_python-0.3.36.tar.gz ]; then
  python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .cache/sdist
fi
ruff check .
ruff format --check .
python -m pytest -q "$@"
