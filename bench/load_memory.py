"""Peak host RSS of loading a full-size orbax checkpoint (random weights) with `sources.load_checkpoint`.

    flock /tmp/heavy.lock .venv/bin/python scripts/measure_orbax_load.py e2b /tmp/e2b_orbax

Writes the checkpoint first (official NESTED layout, bf16, OCDBT; skipped if DIR exists), then loads it in a
fresh process and prints the weights' bytes next to that process's peak RSS. Each phase runs in its own
process so its peak is its own. Needs about 2x the weights in free disk and ~1.2x in free RAM.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write(variant: str, path: str) -> dict:
    """Random weights drawn leaf by leaf straight into bf16 numpy arrays (no JAX copy), saved by orbax."""
    import jax
    import ml_dtypes
    import numpy as np

    from gemma4_jax import config, model, sources

    start = time.perf_counter()
    cfg = config.get_config(variant)
    rng = np.random.default_rng(0)
    params: dict = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(model.param_shapes(cfg))[0]:
        leaf_path = tuple(k.key for k in key_path)
        std = model.init_std(leaf_path, leaf.shape)
        value = np.empty(leaf.shape, ml_dtypes.bfloat16)
        rows = max(1, (1 << 24) // max(1, math.prod(leaf.shape[1:])))
        for i in range(0, leaf.shape[0], rows):
            block = value[i : i + rows]
            block[...] = 1.0 if std is None else rng.standard_normal(block.shape, np.float32) * np.float32(std)
        sources._set(params, leaf_path, value)
    nbytes = sum(v.nbytes for v in jax.tree_util.tree_leaves(params))
    sources.save_orbax(path, params)
    return {"phase": "write", "bytes": nbytes, "peak_rss": _peak_rss(), "seconds": time.perf_counter() - start}


def load(path: str) -> dict:
    import jax
    import jax.numpy as jnp

    from gemma4_jax import sources

    start = time.perf_counter()
    cfg, params, _ = sources.load_checkpoint(path, jnp.bfloat16, progress=True)
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
