"""What keeping the PLE table off the device saves, for full-size E2B in bf16.

1. Device bytes of the parameter tree with the table on the device and without it (from `jax.eval_shape`,
   nothing allocated), and the bytes sent to the device per token instead.
2. `--rss DIR`: resident memory of the table itself when held in host RAM vs memory-mapped from disk, with the
   host-side gathers a 128-token prefill + 32 decode steps make. Writes a random full-size table
   (`DIR/ple_table.npy`, 4.4 GiB, reused when present); each mode runs in its own subprocess and reports its
   RSS growth (mapped pages count once touched). Needs ~5 GiB of free RAM (run it under
   `flock /tmp/heavy.lock` on a shared machine).

    python bench/ple_memory.py [--rss /tmp/ple_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import psutil

from gemma4_jax import config, model, ple

PROMPT, NEW_TOKENS = 128, 32


def device_bytes() -> dict:
    shapes = model.param_shapes(config.E2B)
    rest, table = ple.split_table(shapes)

    def nbytes(tree):
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))

    cfg = config.E2B
    return {
        "params_bytes_ple_on_device": nbytes(shapes),
        "params_bytes_ple_off_device": nbytes(rest),
        "ple_table_bytes": nbytes(table),
        "rows_bytes_per_token": cfg.num_layers * cfg.per_layer_input_dim * 2,
    }


def write_table(path: str) -> None:
    cfg = config.E2B
    shape = (cfg.vocab_size, cfg.num_layers, cfg.per_layer_input_dim)
    if os.path.exists(path) and np.load(path, mmap_mode="r").shape == shape:
        return
    rng = np.random.default_rng(0)
    tmp = path + ".partial"
    out = np.lib.format.open_memmap(tmp, "w+", np.dtype(ml_dtypes.bfloat16), shape)
    for start in range(0, shape[0], 8192):
        block = rng.standard_normal((min(8192, shape[0] - start), *shape[1:]), np.float32)
        out[start : start + 8192] = block.astype(ml_dtypes.bfloat16)
    out.flush()
    del out
    os.replace(tmp, path)


def worker(mode: str, path: str) -> dict:
    """RSS growth of holding the table (`host`: read into RAM, `mmap`: memory-mapped) and gathering rows."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    if mode == "host":
        host = ple.HostPLE(np.load(path), config.E2B)
    else:
        host = ple.HostPLE.from_npy(path, config.E2B)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    host.rows(rng.integers(0, config.E2B.vocab_size, (1, PROMPT)))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        host.rows(rng.integers(0, config.E2B.vocab_size, (1, 1)))
    step_s = (time.perf_counter() - start) / NEW_TOKENS
    return {
        "mode": mode,
        "rss_growth_bytes": proc.memory_info().rss - base,
        "gather_prefill_s": prefill_s,
        "gather_step_s": step_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rss", metavar="DIR", help="also measure host RSS of the table (writes DIR/ple_table.npy)")
    parser.add_argument("--worker", choices=("host", "mmap"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, os.path.join(args.rss, "ple_table.npy"))))
        return 0

    start = time.perf_counter()
    d = device_bytes()
    gib = 2**30
    print("E2B bf16 parameter tree (gemma4-jax, incl. the unused reader-layer K/V):")
    for where, key in (
        ("on the device ", "params_bytes_ple_on_device"),
        ("off the device", "params_bytes_ple_off_device"),
    ):
        print(f"  device bytes, PLE table {where}: {d[key]:>14,} ({d[key] / gib:.2f} GiB)")
    print(f"  sent per token instead: {d['rows_bytes_per_token']:,} bytes ([1, 1, 35, 256] bf16)")
    if args.rss:
        os.makedirs(args.rss, exist_ok=True)
        path = os.path.join(args.rss, "ple_table.npy")
        write_table(path)
        # The file was just written or read, so the memory map's gathers hit the page cache (warm start).
        for mode in ("host", "mmap"):
            out = subprocess.run(
                [sys.executable, __file__, "--rss", args.rss, "--worker", mode], capture_output=True, text=True
            )
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            r = json.loads(out.stdout)
            print(
                f"  table in {mode:>4}: RSS +{r['rss_growth_bytes'] / 2**20:9.1f} MiB; host gather: "
                f"{PROMPT}-token prompt {r['gather_prefill_s'] * 1e3:.1f} ms, one decode token "
                f"{r['gather_step_s'] * 1e3:.3f} ms"
            )
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
