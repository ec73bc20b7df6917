"""Test tiers and strictness.

- `pytest` (the default tier) runs every test not marked `slow`: minutes on 2 cores, every module touched.
- `pytest -m "slow or not slow"` (what `scripts/test.sh` and CI run) is the whole suite, parity against
  transformers, llama.cpp, the LiteRT interpreter and engine, and peft included.
- With `GEMMA4_STRICT=1` (set by scripts/test.sh, so in CI) a skipped test is a failure: a missing runtime must
  never pass as green.
"""

import gc
import os
import sys

import pytest

# `hf_reference`, `decisive`, ... are helper modules next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

STRICT = os.environ.get("GEMMA4_STRICT") == "1"

# The CLI keeps compiled programs in JAX's persistent cache; the tests compile afresh (a cache left by an earlier
# run, or another worker's entries, must not decide a result). test_cli.py::test_compilation_cache turns it on
# in subprocesses of its own and checks what it writes.
os.environ.setdefault("GEMMA4_JAX_CACHE", "off")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. XLA:CPU maps every compiled kernel's code and data
    as separate pages, about three memory mappings per kernel, and keeps them while the program is cached: an
    xdist worker that runs many modules reached 59 000 mappings, near Linux's default vm.max_map_count of 65 530,
    past which mmap fails and XLA segfaults inside whatever it was doing (CI runs died in a compile, in writing
    and in reading the persistent cache). One module stays far below (test_quant: 4 500)."""
    yield
    import jax  # here, not at the top: a test module may set JAX's environment before it imports JAX

    jax.clear_caches()
    gc.collect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under GEMMA4_STRICT=1 (a missing runtime or dependency is a failure): {reason}"


def pytest_collectreport(report):
    if STRICT and report.skipped:
        report.outcome = "failed"
