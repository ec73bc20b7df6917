"""`merge`: LoRA adapters folded into their base checkpoint, written as a normal HF checkpoint.

Tensor by tensor: each base weight is read, the adapted ones get `scale · A B` added in float32 (at least), and
the result is written straight into the output's safetensors shards. Unadapted tensors pass through in their
stored dtype (the E2B PLE table is never widened), so a full-size merge holds about one tensor, not the model.
"""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np

from gemma4_jax import files, param_spec, sources
from gemma4_jax.model import tree_get
from gemma4_jax.train import lora


def merge(source: sources.WeightSource, adapter_dir: str, out: str, *, dtype=None) -> str:
    """Writes `source` + the PEFT adapters in `adapter_dir` to the new HF checkpoint directory `out`; tensors are
    stored in `dtype` (default: as the source stores them; a quantized source's compute dtype). Returns a one-line
    summary."""
    from gemma4_jax.api import parse_dtype
    from gemma4_jax.hf_format import np_dtype, write_hf

    start = time.perf_counter()
    out = files.check_output(out, directory=True)
    config = source.config
    adapters, lora_config = lora.load_peft(adapter_dir, config)
    adapted = {t.path: t for t in lora.targets_of(config, adapters)}
    target = parse_dtype(dtype)
    dtypes = {  # the encoders stay in at least float32, as they run
        leaf.path: np_dtype(param_spec.leaf_dtype(leaf, target)) if target is not None else source.dtype(leaf)
        for leaf in source.leaves()
        if not leaf.unused
    }

    def leaves():
        for leaf in source.leaves():
            if leaf.path not in dtypes:
                yield leaf, np.zeros((), np.float32)  # unused reader K/V: not written
                continue
            if leaf.path not in adapted:
                yield leaf, source.read(leaf, dtypes[leaf.path])
                continue
            factors = tree_get(adapters, leaf.path)
            weight = lora.LoraWeight(
                source.read(leaf, np.float32), factors["a"], factors["b"], None, adapted[leaf.path].roles,
                lora_config.scale,
            )  # fmt: skip
            yield leaf, np.asarray(weight.materialize(jnp.float32)).astype(dtypes[leaf.path])

    progress = files.Progress(f"merging into {config.name}", source.nbytes(), min_total=10**8)
    with files.atomic_output(out, directory=True) as tmp:
        names = write_hf(tmp, config, dtypes, leaves(), progress)
        sources.copy_tokenizer_files(source, tmp)
    progress.close()
    kinds = ", ".join(sorted({str(d) for d in dtypes.values()}))
    size = sum(os.path.getsize(os.path.join(out, name)) for name in names)
    return (
        f"wrote {out}: {source.description} + LoRA r={lora_config.rank} ({lora.summary(config, adapters)}) merged, "
        f"{kinds}, {files.human_bytes(size)} in {time.perf_counter() - start:.1f} s"
    )
