"""What every benchmark script shares: the worker protocol (each measurement runs in its own process and prints one
`BENCH_RESULT {json}` line), CPU pinning, peak RSS, the prompt, and other processes' load during the timed parts."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time

RESULT_PREFIX = "BENCH_RESULT "
PROMPT_SEED = 1234
BOS_ID = 2  # Gemma's <bos>; the remaining prompt ids are drawn from [3, vocab) so no special control tokens


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux).

    Caveat this design works around: on exec, Linux seeds a child's ru_maxrss with its parent's peak RSS, so the
    parent process must stay small (it never imports jax, torch or the model) for a worker's number to be its own.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def limit_cpus(threads: int) -> None:
    """Pins this process to `threads` CPUs. XLA sizes its CPU thread pool from the affinity mask; torch gets
    `set_num_threads` as well. Must run before jax/torch are imported."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs are available")
    os.sched_setaffinity(0, cpus[:threads])


def make_prompt(vocab_size: int, length: int) -> list[int]:
    """The benchmark prompt: BOS, then random ids from a fixed seed (both workers call this, so they agree)."""
    import numpy as np

    rng = np.random.default_rng(PROMPT_SEED)
    return [BOS_ID, *rng.integers(3, vocab_size, size=length - 1).tolist()]


def emit(result: dict) -> None:
    result["peak_rss_gib"] = peak_rss_gib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class OtherLoad:
    """CPU time that other processes used while this worker timed something: they compete for the same cores.

    Machine-wide busy time from /proc/stat minus this process's own CPU time, summed over the timed sections.
    """

    def __init__(self):
        self.other_seconds = 0.0
        self.wall_seconds = 0.0

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    @contextlib.contextmanager
    def measure(self):
        busy, own, wall = self._sample()
        yield
        busy2, own2, wall2 = self._sample()
        self.other_seconds += max(0.0, (busy2 - busy) - (own2 - own))
        self.wall_seconds += wall2 - wall

    @property
    def cores(self) -> float | None:
        """Average number of cores other processes kept busy during the timed sections (None: too short to tell,
        /proc/stat counts in 10 ms ticks)."""
        return self.other_seconds / self.wall_seconds if self.wall_seconds >= 1.0 else None


def bench_config(variant: str, layers: int = 0):
    """The preset `variant`, optionally cut to `layers` (`config.cut_to_layers`); a bad --layers exits."""
    from gemma4_jax import config
    from gemma4_jax.errors import Gemma4Error

    try:
        return config.cut_to_layers(config.get_config(variant), layers)
    except Gemma4Error as e:
        raise SystemExit(f"--{e}") from None


def run_worker(script: str, kind: str, options: dict) -> dict | None:
    """Runs `script --worker kind --option value ...` (stderr passes through live); its parsed result, or None."""
    command = [sys.executable, os.path.abspath(script), "--worker", kind]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        log(f"{kind} worker failed (exit status {proc.returncode})")
        return None
    return json.loads(results[-1][len(RESULT_PREFIX) :])


def main(parser, workers: dict, run_benchmark, argv=None) -> int:
    """A benchmark script's entry point: `--worker KIND` runs one measurement, otherwise the parent orchestrates.
    Every generation benchmark takes --prompt-len and --new-tokens (decode speed needs steps after the first)."""
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2:
        parser.error("--prompt-len must be >= 1 and --new-tokens >= 2 (decode speed needs steps after the first)")
    if getattr(args, "threads", 1) < 1:
        parser.error("--threads must be >= 1")
    if args.worker:
        workers[args.worker](args)
        return 0
    return run_benchmark(args)
