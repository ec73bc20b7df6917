"""Peak RSS of `gemma4-jax merge` (a rank-16 adapter) and of a 2-step `finetune` on a full-size model.

    python bench/train_memory.py --workdir /tmp/e2b-train-memory          # E2B, bf16 (needs ~25 GB of disk)
    python bench/train_memory.py --variant tiny --workdir /tmp/tiny-tm    # smoke run

The random bf16 checkpoint (with a small test tokenizer) and the adapter are made once in --workdir. Each command
then runs as its own process under /usr/bin/time, so each peak is that command's alone; the table puts it beside
the checkpoint's weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import log

CHAT = {"messages": [{"role": "user", "content": "what is a tensor"}, {"role": "assistant", "content": "an array"}]}


def prepare(args) -> tuple[str, str, str]:
    """(checkpoint, adapter, data) in the work directory, made if missing."""
    import jax
    import jax.numpy as jnp

    from gemma4_jax import config, hf_format, model
    from gemma4_jax.train import lora

    ckpt, adapter = os.path.join(args.workdir, "ckpt"), os.path.join(args.workdir, "adapter")
    data = os.path.join(args.workdir, "chats.jsonl")
    cfg = config.get_config(args.variant)
    if not os.path.isdir(ckpt):
        log(f"writing random bf16 {cfg.name} weights to {ckpt}")
        hf_format.save_hf_checkpoint(ckpt, cfg, model.init_params(cfg, 0, jnp.bfloat16))
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from tokenizer_fixture import write_tokenizer

        write_tokenizer(ckpt)
    if not os.path.isdir(adapter):
        lora_cfg = lora.LoraConfig(rank=16, alpha=32)
        adapters = lora.init_adapters(cfg, lora_cfg, seed=0)
        # B = 0 at init would make the merge a no-op: give every adapter a nonzero update
        adapters = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.01 if p[-1].key == "b" else x, adapters)
        lora.save_peft(adapter, cfg, adapters, lora_cfg)
    with open(data, "w") as f:
        f.write("\n".join(json.dumps(CHAT) for _ in range(16)) + "\n")
    return ckpt, adapter, data


def measured(argv: list[str]) -> tuple[int, float]:
    """(exit status, peak RSS in bytes) of one gemma4-jax command."""
    stats = os.path.join(os.path.dirname(argv[-1]) or ".", ".time")
    command = ["/usr/bin/time", "-f", "%M", "-o", stats, sys.executable, "-m", "gemma4_jax.cli", *argv]
    log(" ".join(command[5:]))
    code = subprocess.run(command).returncode
    with open(stats) as f:
        kib = int(f.read().strip().splitlines()[-1])
    os.remove(stats)
    return code, kib * 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="e2b")
    p.add_argument("--workdir", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    ckpt, adapter, data = prepare(args)
    weights = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    rows = []
    merged, run = os.path.join(args.workdir, "merged"), os.path.join(args.workdir, "run")
    for old in (merged, run):
        shutil.rmtree(old, ignore_errors=True)
    code, peak = measured(["merge", "--checkpoint", ckpt, "--adapter", adapter, "-o", merged])
    rows.append(("merge (rank-16 adapter, bf16 out)", code, peak))
    argv = ["finetune", "--checkpoint", ckpt, "--data", data, "--steps", "2", "--batch", "1", "--seq-len"]
    argv += [str(args.seq_len), "--dtype", "bfloat16", "--eval-fraction", "0", "--save-every", "2", "-o", run]
    code, peak = measured(argv)
    rows.append((f"finetune 2 steps, seq-len {args.seq_len}, bf16, r=16", code, peak))
    print(f"{args.variant}: checkpoint weights {weights / 1e9:.2f} GB (bf16)")
    print(f"| {'command':<44} | {'exit':>4} | {'peak RSS GB':>11} | {'x weights':>9} |")
    print(f"|{'-' * 46}|{'-' * 6}|{'-' * 13}|{'-' * 11}|")
    for name, code, peak in rows:
        print(f"| {name:<44} | {code:>4} | {peak / 1e9:>11.2f} | {peak / weights:>9.2f} |")
    return max(code for _, code, _ in rows)


if __name__ == "__main__":
    sys.exit(main())
