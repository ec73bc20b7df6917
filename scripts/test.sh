#!/usr/bin/env bash
# Sets up a virtualenv (.venv) with the test dependencies and runs lint + the whole test suite (the slow parity tier
# included; plain `pytest` runs the fast default tier). A skipped test fails here (GEMMA4_STRICT=1): in CI a missing
# runtime is an error, never a skip.
# Works on a fresh machine with Python >= 3.11 and access to PyPI. The parity tests need CPU torch 2.13.0
# and transformers 5.23.0 (pinned in the `test` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Real speech for the audio tests is spoken by espeak-ng (a Debian package).
if ! command -v espeak-ng >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Reference files nobody on this project wrote (Google's Gemma 4 chat template, llama.cpp's Gemma 4 vocab) are
# read from the llama-cpp-python sdist; see tests/references.py.
if [ ! -f .cache/sdist/llama_cpp_python-0.3.36.tar.gz ]; then
  python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .cache/sdist
fi
# llama.cpp itself (llama-cpp-python, with its multimodal library mtmd) is the reference runtime of
# tests/test_gguf*.py. It is not in the `test` extra: PyPI has it as an sdist only, a ~9-minute llama.cpp build on
# 2 cores, which `pip install -e .[test]` would impose on everyone. Built here once from the sdist downloaded above,
# in the background (CPU) while pip fetches the test dependencies (network), then installed with its dependencies;
# --no-cache-dir so that a wheel cached from a build without mtmd (LLAVA_BUILD=OFF) is never reused.
LLAMA_WHEELS=.cache/llama-wheel
build=
if ! python -c 'import llama_cpp, sys; from llama_cpp import mtmd_cpp; sys.exit(llama_cpp.__version__ != "0.3.36")' \
    2>/dev/null; then
  rm -rf "$LLAMA_WHEELS"
  # Only the libraries the bindings load (llama, ggml, mtmd): llama-cpp-python forces llama.cpp's `common` library
  # on (its CLI helpers and an HTTP client, a third of the build), which this include turns off again right after
  # llama.cpp's project() call.
  printf 'set(LLAMA_BUILD_COMMON OFF)\n' >.cache/llama-no-common.cmake
  default_args="-DLLAVA_BUILD=ON -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/.cache/llama-no-common.cmake"
  (CMAKE_ARGS="${CMAKE_ARGS:-$default_args}" exec python -m pip wheel -q --no-deps --no-cache-dir \
    -w "$LLAMA_WHEELS" .cache/sdist/llama_cpp_python-0.3.36.tar.gz >.cache/llama-build.log 2>&1) &
  build=$!
  trap 'if [ -n "$build" ]; then kill "$build" 2>/dev/null || true; fi' EXIT  # the install below failed
fi
python -m pip install -q -e '.[test]'
if [ -n "$build" ]; then
  status=0
  wait "$build" || status=$?
  build=
  if [ "$status" != 0 ]; then
    tail -n 30 .cache/llama-build.log >&2
    echo "test.sh: building llama-cpp-python 0.3.36 failed (whole log: .cache/llama-build.log)" >&2
    exit 1
  fi
  python -m pip uninstall -q -y llama-cpp-python 2>/dev/null || true
  python -m pip install -q "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl
fi
ruff check .
ruff format --check .
GEMMA4_STRICT=1 python -m pytest -q -m "slow or not slow" --durations=15 "$@"
# Every notebook, headless, on its tiny offline defaults (one line each; a cell error fails the run); two at once.
python scripts/run_notebooks.py --jobs 2
