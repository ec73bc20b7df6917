"""Test tiers and strictness.

- `pytest` (the default tier) runs every test not marked `slow`: minutes on 2 cores, every module touched.
- `pytest -m "slow or not slow"` (what `scripts/test.sh` and CI run) is the whole suite, parity against
  transformers, llama.cpp, the LiteRT interpreter and engine, and peft included.
- With `GEMMA4_STRICT=1` (set by scripts/test.sh, so in CI) a skipped test is a failure: a missing runtime must
  never pass as green.
"""

import os
import sys
import tempfile

import pytest

# `hf_reference`, `decisive`, ... are helper modules next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

STRICT = os.environ.get("GEMMA4_STRICT") == "1"

# The CLI keeps compiled programs in the user's cache directory; the tests keep theirs apart, one directory per
# xdist worker, so that no worker reads an entry another is writing (a CI run once crashed inside a cache read).
# (xdist workers inherit the controller's setting, hence the prefix test.)
_TEST_CACHE = os.path.join(tempfile.gettempdir(), "gemma4-jax-test-xla")
if os.environ.get("GEMMA4_JAX_CACHE", _TEST_CACHE).startswith(_TEST_CACHE):
    os.environ["GEMMA4_JAX_CACHE"] = f"{_TEST_CACHE}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"


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
