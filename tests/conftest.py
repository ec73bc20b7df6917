"""Test tiers and strictness.

- `pytest` (the default tier) runs every test not marked `slow`: minutes on 2 cores, every module touched.
- `pytest -m "slow or not slow"` (what `scripts/test.sh` and CI run) is the whole suite, parity against
  transformers, llama.cpp, the LiteRT interpreter and engine, and peft included.
- With `GEMMA4_STRICT=1` (set by scripts/test.sh, so in CI) a skipped test is a failure: a missing runtime must
  never pass as green.
"""

import gc
import os
import shutil
import sys
import tempfile

import pytest

# `hf_reference`, `decisive`, ... are helper modules next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

STRICT = os.environ.get("GEMMA4_STRICT") == "1"

# One persistent compilation cache for the whole run, made empty when the run starts and removed when it ends:
# the xdist workers, the subprocesses the tests start (CLI, sharded workers) and a module that comes after
# `jax.clear_caches()` (below) load a program that another one compiled instead of compiling it again. Nothing
# from an earlier run is ever read. JAX reads its own environment variables when it starts, so this reaches every
# process without importing JAX here; $GEMMA4_JAX_CACHE sends the CLI there too (api.use_compilation_cache).
# test_cli.py::test_compilation_cache checks the CLI's cache in directories of its own.
_CACHE_PREFIX = "gemma4-jax-test-xla-"
_RUN_CACHE = None


def _remove_stale_run_caches() -> None:
    """Run caches that a killed run left behind: their directory names the pid of a process that has ended."""
    for name in os.listdir(tempfile.gettempdir()):
        pid = name[len(_CACHE_PREFIX) :].split("-")[0]
        if name.startswith(_CACHE_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)


if "PYTEST_XDIST_WORKER" not in os.environ and "GEMMA4_JAX_CACHE" not in os.environ:
    if os.path.isdir("/proc"):
        _remove_stale_run_caches()
    _RUN_CACHE = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}-")
    os.environ.update(
        GEMMA4_JAX_CACHE=_RUN_CACHE,
        JAX_COMPILATION_CACHE_DIR=_RUN_CACHE,
        # as api.use_compilation_cache: bounded, so JAX locks the directory (several processes share it)
        JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


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
