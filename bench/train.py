"""LoRA training throughput: gemma4-jax vs Hugging Face transformers + peft, same weights, data and settings.

    python bench/train.py                                   # tiny config, f32, batch 4 x 128 tokens, r=16
    python bench/train.py --variant tiny --steps 6          # smoke run

Like bench/decode.py, the parent never imports jax or torch: it runs three workers of this script one after the
other (so one model is in memory at a time and each peak RSS is the worker's own):

1. `--worker create`: random weights (`init_params`), written with `save_hf_checkpoint`.
2. `--worker jax`: `load_hf_checkpoint`, LoRA on attention + MLP, `loop.make_step` (AdamW, clip 1.0), timed.
3. `--worker hf`: `Gemma4ForCausalLM.from_pretrained` + `peft.get_peft_model` with the same targets, rank, alpha,
   `torch.optim.AdamW` + `clip_grad_norm_`, timed.

Both train on the same random token rows (loss on every token, no packing). Tokens/s counts the tokens of the
timed steps (after `--warmup` untimed steps, which include compilation). Each worker prints one
`BENCH_RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULT_PREFIX, log, peak_rss_gib, run_worker

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_rows(vocab_size: int, rows: int, length: int, seed: int):
    import numpy as np

    tokens = np.random.default_rng(seed).integers(3, vocab_size, (rows, length + 1)).astype(np.int32)
    tokens[:, 0] = 2  # <bos>
    return tokens


def worker_create(args) -> dict:
    import jax.numpy as jnp

    from gemma4_jax import config, hf_format, model

    cfg = config.get_config(args.variant)
    params = model.init_params(cfg, 0, jnp.dtype(args.dtype))
    hf_format.save_hf_checkpoint(args.dir, cfg, params)
    return {"params": model.count_params(params)}


def timed_steps(args, label: str, one_step) -> dict:
    """Runs `one_step(s) -> loss` for s < args.steps, timing the steps after the warm-up ones; the figures both
    workers report."""
    losses, start = [], None
    for s in range(args.steps):
        if s == args.warmup:
            start = time.perf_counter()
        losses.append(one_step(s))
        log(f"{label} step {s + 1}/{args.steps} loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    timed = args.steps - args.warmup
    return {
        "tokens_per_s": timed * args.batch * args.seq_len / seconds,
        "step_s": seconds / timed,
        "first_loss": losses[0],
        "peak_rss_gib": peak_rss_gib(),
    }


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemma4_jax import hf_format
    from gemma4_jax.train import loop, lora

    cfg, base = hf_format.load_hf_checkpoint(args.dir, dtype=jnp.dtype(args.dtype))
    lora_cfg = lora.LoraConfig(args.rank, args.alpha, 0.0, TARGETS)
    tc = loop.TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=1e-4, warmup_steps=0)
    step = loop.make_step(cfg, lora_cfg, tc)
    optimizer, _ = loop.make_optimizer(tc)
    adapters = lora.init_adapters(cfg, lora_cfg)
    opt_state = optimizer.init(adapters)
    tokens = make_rows(cfg.vocab_size, args.batch * args.steps, args.seq_len, args.seed)
    positions = np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), (args.batch, args.seq_len))

    def batch(s):
        rows = tokens[s * args.batch : (s + 1) * args.batch]
        return {
            "inputs": rows[None, :, :-1],
            "targets": rows[None, :, 1:],
            "positions": positions[None],
            "segments": np.ones_like(positions)[None],
            "weights": np.ones((1, args.batch, args.seq_len), np.float32),
        }

    def one_step(s: int) -> float:
        nonlocal adapters, opt_state
        adapters, opt_state, m = step(adapters, opt_state, base, batch(s), s)
        return float(m["loss"])  # waits for the step

    result = timed_steps(args, "jax", one_step)
    return result | {"adapter_params": lora.count(adapters), "jax_devices": str(jax.devices()[0])}


def worker_hf(args) -> dict:
    import peft
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.Gemma4ForCausalLM.from_pretrained(args.dir, dtype=dtype, attn_implementation="sdpa")
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(TARGETS))
    model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    tokens = torch.tensor(make_rows(model.config.vocab_size, args.batch * args.steps, args.seq_len, args.seed)).long()

    def one_step(s: int) -> float:
        rows = tokens[s * args.batch : (s + 1) * args.batch]
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    result = timed_steps(args, "hf", one_step)
    return result | {"adapter_params": sum(p.numel() for p in trainable), "torch_threads": torch.get_num_threads()}


def run_train_worker(kind: str, args, directory: str) -> dict:
    options = {name: getattr(args, name) for name in ("variant", "dtype", "steps", "warmup", "batch", "seq_len")}
    options |= {"rank": args.rank, "alpha": args.alpha, "seed": args.seed, "dir": directory}
    log(f"worker {kind} ...")
    result = run_worker(__file__, kind, options)
    if result is None:
        raise SystemExit(f"worker {kind} failed")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("create", "jax", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    if args.worker:
        result = {"create": worker_create, "jax": worker_jax, "hf": worker_hf}[args.worker](args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    directory = tempfile.mkdtemp(prefix="bench-train-")
    try:
        created = run_train_worker("create", args, directory)
        ours = run_train_worker("jax", args, directory)
        hf = run_train_worker("hf", args, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"LoRA training, {args.variant} ({created['params']:,} params), {args.dtype}, batch {args.batch} x "
        f"{args.seq_len} tokens, r={args.rank} alpha={args.alpha:g} on q,k,v,o,gate,up,down, AdamW; "
        f"{args.steps - args.warmup} timed steps after {args.warmup}; CPU, {os.cpu_count()} cores, load {load:.1f}"
    )
    print(f"| {'implementation':<34} | {'train tokens/s':>14} | {'s/step':>8} | {'first loss':>10} | "
          f"{'adapter params':>14} | {'peak RSS GiB':>12} |")  # fmt: skip
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 10}|{'-' * 12}|{'-' * 16}|{'-' * 14}|")
    for name, r in (("gemma4-jax (JAX, jit step)", ours), ("HF transformers + peft (torch)", hf)):
        print(
            f"| {name:<34} | {r['tokens_per_s']:>14,.0f} | {r['step_s']:>8.3f} | {r['first_loss']:>10.4f} | "
            f"{r['adapter_params']:>14,} | {r['peak_rss_gib']:>12.2f} |"
        )


if __name__ == "__main__":
    main()
