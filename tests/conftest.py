"""Test tiers and strictness.

- `pytest` (the default tier) runs every test not marked `slow`: minutes on 2 cores, every module touched.
- `pytest -m "slow or not slow"` (what `scripts/test.sh` and CI run) is the whole suite, parity against
  transformers, llama.cpp, the LiteRT interpreter and engine, and peft included.
- With `GEMMA4_STRICT=1` (set by scripts/test.sh, so in CI) a skipped test is a failure: a missing runtime must
  never pass as green.
"""

import os
import sys

import pytest

# `hf_reference`, `decisive`, ... are helper modules next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

STRICT = os.environ.get("GEMMA4_STRICT") == "1"

# The CLI keeps compiled programs in JAX's persistent cache; in-process tests call it, and then every later test
# of that long-lived xdist worker would write and read the cache. CI runs crashed three times inside jaxlib's
# executable (de)serialization there (segfaults in compilation_cache.put_executable_and_time / a cache read),
# never outside, so the tests compile without it; test_cli.py::test_compilation_cache turns it on in a
# subprocess of its own and checks what it writes and reads.
os.environ.setdefault("GEMMA4_JAX_CACHE", "off")


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
