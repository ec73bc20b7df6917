"""Peak host RSS of loading a full-size orbax checkpoint (random weights) with `gemma4_jax.load`.

    .venv/bin/python bench/load_memory.py e2b /tmp/e2b_orbax

Writes the checkpoint first (official NESTED layout, bf16, OCDBT; skipped if DIR exists), then loads it in a
fresh process and prints the weights' bytes next to that process's peak RSS. Each phase runs in its own
process so its peak is its own. Needs about 2x the weights in free disk and ~1.2x in free RAM.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write(variant: str, path: str) -> dict:
    """Random bf16 weights drawn leaf by leaf (`sources.RandomSource`, the draws of `init_params`), saved by orbax."""
    from gemma4_jax import config, model, orbax_format, sources

    start = time.perf_counter()
    source = sources.RandomSource(config.get_config(variant), 0, "bfloat16")
    params: dict = {}
    for leaf in source.leaves():
        model.tree_set(params, leaf.path, source.read(leaf))
    nbytes = source.nbytes()
    orbax_format.save_orbax(path, params)
    return {"phase": "write", "bytes": nbytes, "peak_rss": _peak_rss(), "seconds": time.perf_counter() - start}


def load(path: str) -> dict:
    import jax

    import gemma4_jax

    start = time.perf_counter()
    loaded = gemma4_jax.load(path, dtype="bfloat16")
    cfg, params = loaded.config, loaded.params
    jax.block_until_ready(params)
    nbytes = sum(v.nbytes for v in jax.tree_util.tree_leaves(params))
    return {
        "phase": "load",
        "variant": cfg.name,
        "bytes": nbytes,
        "peak_rss": _peak_rss(),
        "seconds": time.perf_counter() - start,
        "backend": jax.default_backend(),
    }


def main() -> None:
    if len(sys.argv) == 4:  # a phase, run by the driver below
        phase, a, b = sys.argv[1:]
        print(json.dumps(write(a, b) if phase == "write" else load(b)))
        return
    variant, path = sys.argv[1:3]
    results = []
    phases = ([] if os.path.exists(path) else ["write"]) + ["load"]
    for phase in phases:
        out = subprocess.run([sys.executable, __file__, phase, variant, path], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{phase} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(
            f"{r['phase']}: weights {r['bytes'] / 1e9:.2f} GB, peak RSS {r['peak_rss'] / 1e9:.2f} GB "
            f"({r['peak_rss'] / r['bytes']:.2f}x), {r['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
