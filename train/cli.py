"""`gemma4-jax finetune` (LoRA / QLoRA training) and `gemma4-jax merge` (adapters folded into a checkpoint)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

# = lora.DEFAULT_TARGETS (repeated so that building the parser does not import jax)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def register(subparsers) -> None:
    from gemma4_jax.cli import add_model_args

    ft = subparsers.add_parser(
        "finetune",
        help="train LoRA adapters on chat or text data",
        description="Train LoRA adapters (base weights frozen; optionally quantized: QLoRA). Writes orbax "
        "checkpoints, metrics.jsonl and the adapters in Hugging Face PEFT layout into -o DIR.",
    )
    add_model_args(ft, "bfloat16")
    ft.add_argument(
        "--data",
        required=True,
        action="append",
        help='training file (repeatable): JSONL of {"messages": [...]} chats or {"text": ...} documents, '
        "or a .txt document. Malformed lines are errors; chats longer than --seq-len are dropped",
    )
    ft.add_argument("--tokenizer", help="tokenizer directory (default: the --checkpoint directory)")
    ft.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of examples (default 0.05)")
    ft.add_argument("--rank", type=int, default=16)
    ft.add_argument("--alpha", type=float, default=32.0)
    ft.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter input")
    ft.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated module names (q_proj,...,down_proj, per_layer_input_gate, per_layer_projection) "
        "or fnmatch patterns over full names like 'layers.1?.self_attn.*' (default: attention + MLP)",
    )
    ft.add_argument("--quantize", choices=("int8", "int4"), help="quantize the frozen base weights (QLoRA)")
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--seq-len", type=int, default=512, help="packed row length")
    ft.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warmup, then cosine to 10 %%)")
    ft.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10 %% of --steps, <= 100)")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--clip", type=float, default=1.0, help="gradient clipping (global norm)")
    ft.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps")
    ft.add_argument("--eval-every", type=int, default=50, help="eval interval in steps")
    ft.add_argument("--seed", type=int, default=0, help="adapter init, data order and dropout")
    ft.add_argument("--remat", action="store_true", help="recompute layers in the backward pass (less memory)")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in -o")
    ft.add_argument("-o", "--output", required=True, help="output directory")
    ft.set_defaults(func=cmd_finetune)

    mg = subparsers.add_parser(
        "merge",
        help="fold LoRA adapters into a checkpoint",
        description="Write base + adapters as a normal HF checkpoint (config.json + model.safetensors + tokenizer).",
    )
    add_model_args(mg, "bfloat16")
    mg.add_argument(
        "--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    mg.add_argument("-o", "--output", required=True, help="output checkpoint directory (must not exist)")
    mg.set_defaults(func=cmd_merge)


def _load_base(args, default_dtype):
    from gemma4_jax.cli import load_model

    return load_model(args, default_dtype)


def _text_prefix(checkpoint_dir: str | None) -> str:
    """Where the checkpoint keeps the text model (PEFT names follow the base model's module tree)."""
    from gemma4_jax.checkpoint import SafetensorsDir
    from gemma4_jax.errors import Gemma4Error

    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return "model."
    try:
        return SafetensorsDir(checkpoint_dir).text_prefix()
    except Gemma4Error:  # not an HF directory (orbax, quantized): Gemma4ForCausalLM names
        return "model."


def _require_training_packages() -> None:
    import importlib.util

    from gemma4_jax.errors import Gemma4Error

    missing = [m for m in ("optax", "orbax.checkpoint") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise Gemma4Error(f"finetune needs {', '.join(missing)}: pip install 'gemma4-jax[train]'")


def cmd_finetune(args) -> int:
    import jax
    from gemma4_jax.train import data, loop, lora

    from gemma4_jax.cli import load_tokenizer_for
    from gemma4_jax.errors import Gemma4Error

    started = time.perf_counter()
    _require_training_packages()
    lora_cfg = lora.LoraConfig(args.rank, args.alpha, args.dropout, tuple(t for t in args.targets.split(",") if t))
    tc = loop.TrainConfig(
        steps=args.steps,
        batch=args.batch,
        accumulation=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        clip_norm=args.clip,
        save_every=args.save_every,
        eval_every=args.eval_every,
        seed=args.seed,
        remat=args.remat,
    )
    # Read the data before loading the model when the tokenizer is at hand (bad data fails fast); a remote
    # checkpoint (hf:..., kaggle:...) brings its tokenizer only once loaded.
    local = args.tokenizer or (args.checkpoint if args.checkpoint and os.path.isdir(args.checkpoint) else None)
    if not local and not args.checkpoint:
        raise Gemma4Error("--tokenizer DIR is needed with --variant / random weights (no checkpoint to read it from)")
    dataset = data.load_dataset(args.data, load_tokenizer_for(args), args.seq_len) if local else None
    args.ple = "device"  # training gathers PLE rows inside the jitted step
    cfg, base, source = _load_base(args, "bfloat16")
    if dataset is None:
        dataset = data.load_dataset(args.data, load_tokenizer_for(args), args.seq_len)
    lora.select_targets(cfg, lora_cfg)  # bad patterns fail before any work
    top = max(int(e.tokens.max()) for e in dataset.examples)
    if top >= cfg.vocab_size:
        raise Gemma4Error(f"the tokenizer produced id {top}, outside the model's vocabulary of {cfg.vocab_size}")
    train_examples, eval_examples = data.split(dataset.examples, args.eval_fraction, args.seed)
    train_rows = data.pack(train_examples, args.seq_len)
    eval_rows = data.pack(eval_examples, args.seq_len) if eval_examples else None
    if args.quantize:
        from gemma4_jax import quant

        base = quant.quantize_params(base, cfg, args.quantize)
        source += f", quantized to {args.quantize}"
    dropped = f"; {dataset.dropped} chats longer than --seq-len dropped" if dataset.dropped else ""
    print(
        f"base: {source}; data: {len(dataset.examples)} examples, {dataset.tokens:,} tokens "
        f"({len(train_examples)} train / {len(eval_examples)} eval){dropped}"
    )
    result = loop.train(cfg, base, train_rows, eval_rows, lora_cfg, tc, args.output, resume=args.resume)
    lora.save_peft(
        args.output,
        cfg,
        jax.device_get(result.adapters),
        lora_cfg,
        base_model=args.checkpoint,
        prefix=_text_prefix(getattr(args, "checkpoint_dir", None) or args.checkpoint),
    )
    size = os.path.getsize(os.path.join(args.output, lora.PEFT_WEIGHTS))
    final = result.losses.get(tc.steps)
    ev = f", eval loss {result.eval_losses[tc.steps]:.4f}" if tc.steps in result.eval_losses else ""
    print(
        f"wrote {args.output}: adapters {lora.count(result.adapters):,} params ({size / 2**20:.2f} MiB, PEFT layout), "
        f"checkpoints, metrics.jsonl; steps {result.start_step + 1}-{tc.steps}"
        + (f", final loss {final:.4f}" if final is not None else "")
        + f"{ev} in {time.perf_counter() - started:.1f} s"
    )
    return 0


def cmd_merge(args) -> int:
    import jax.numpy as jnp
    from gemma4_jax.train import lora

    from gemma4_jax import checkpoint, quant
    from gemma4_jax.errors import Gemma4Error

    started = time.perf_counter()
    out = os.path.abspath(args.output)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise Gemma4Error(f"output {out} already exists and is not empty")
    if not os.path.isdir(os.path.dirname(out)):
        raise Gemma4Error(f"output directory's parent does not exist: {os.path.dirname(out)}")
    dtype = jnp.dtype({"bf16": "bfloat16", "f32": "float32"}.get(args.dtype, args.dtype or "bfloat16"))
    args.dtype = "float32"  # merge in f32, store in the requested dtype
    args.ple = "device"
    cfg, base, source = _load_base(args, "float32")
    base = quant.dequantize_params(base, jnp.float32)  # a quantized base merges into dense weights
    adapters, lora_cfg = lora.load_peft(args.adapter, cfg)
    merged = lora.merge(base, adapters, cfg, lora_cfg, dtype=dtype)
    merged = {k: _cast(v, dtype) for k, v in merged.items()}
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=os.path.dirname(out))
    try:
        checkpoint.save_hf_checkpoint(tmp, cfg, merged)
        source_dir = getattr(args, "checkpoint_dir", None) or args.checkpoint
        if source_dir and os.path.isdir(source_dir):
            from gemma4_jax.sources import tokenizer_files

            for path in tokenizer_files(source_dir, source_dir):
                shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(
        f"wrote {out}: {source} + LoRA r={lora_cfg.rank} ({lora.summary(cfg, adapters)}) merged, "
        f"{jnp.dtype(dtype).name}, {size / 2**20:.1f} MiB in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _cast(tree, dtype):
    import jax

    return jax.tree.map(lambda x: x.astype(dtype), tree)
