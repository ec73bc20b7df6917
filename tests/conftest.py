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
# run must not decide a result). test_cli.py::test_compilation_cache turns it on in subprocesses of its own and
# checks what it writes. One cache shared by a run's workers and subprocesses would not pay: measured over half the
# suite, 22 of 228 cached programs were found again, saving 60 s of 1505 s compiling against 55 s of cache writes
# and reads (the tests compile distinct programs).
os.environ.setdefault("GEMMA4_JAX_CACHE", "off")


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to stay under
        return 0


# Linux's default vm.max_map_count is 65 530; XLA:CPU maps each compiled kernel's code, constants and data as
# separate pages (about three mappings per kernel) and keeps them while JAX caches the program. Past the limit
# mmap fails and XLA segfaults inside whatever it was doing: CI workers died in a compile, a cache write and a
# cache read. Measured: an xdist worker 59 435 mappings after many modules, test_matvec.py alone 56 722.
_MAPPINGS_BEFORE_CLEARING = 20_000


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Drops JAX's compiled programs after a module's last test (the next module rarely reuses them) and after any
    test that leaves the process holding many mappings. A program still needed is compiled again."""
    last_of_module = nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None)
    if last_of_module or _memory_mappings() > _MAPPINGS_BEFORE_CLEARING:
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
