"""`finetune`: LoRA / QLoRA training of a loaded model on a dataset, written as checkpoints + PEFT adapters."""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax

from gemma4_jax import sharding
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.matvec import checkpoint_layout
from gemma4_jax.train import data, loop, lora


def base_id(config, quantize: str | None) -> str:
    """What identifies the base model of a run: its architecture and the quantization of its frozen weights."""
    text = json.dumps({"config": config.to_hf_dict(), "quantize": quantize}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finetune(
    model,
    dataset: data.Dataset,
    out: str,
    *,
    lora_config: lora.LoraConfig | None = None,
    train_config: loop.TrainConfig | None = None,
    quantize: str | None = None,
    eval_fraction: float = 0.05,
    resume: bool = False,
    base_model: str | None = None,
    text_prefix: str = "model.",
) -> str:
    """Trains LoRA adapters (default `lora.LoraConfig()`) on `model` (an `api.Model`, frozen; `quantize`
    "int8"/"int4" makes it QLoRA) with `dataset` (`data.load_dataset`), writing `out` (see `loop`): checkpoints,
    metrics.jsonl and the final adapters in PEFT layout (`base_model` and `text_prefix` say which checkpoint and
    where its text model is). Returns a one-line summary."""
    from gemma4_jax.quant import JaxPolicy, quantize_params

    started = time.perf_counter()
    lora_config = lora_config or lora.LoraConfig()
    train_config = train_config or loop.TrainConfig()
    if os.path.lexists(out) and not os.path.isdir(out):
        raise Gemma4Error(f"output {out} is a file; -o takes a directory for checkpoints and adapters")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise Gemma4Error(f"output directory does not exist: {os.path.dirname(os.path.abspath(out))}")
    if quantize not in (None, "int8", "int4"):
        raise Gemma4Error(f"--quantize must be int8 or int4, got {quantize!r}")
    mesh = getattr(model, "mesh", None)
    if quantize and mesh is not None:
        raise Gemma4Error("--quantize (QLoRA) trains on one device; drop --mesh or --quantize")
    if model.params["embedder"].get("per_layer_embeddings") is not None and not hasattr(
        model.params["embedder"]["per_layer_embeddings"], "shape"
    ):
        raise Gemma4Error("finetune gathers PLE rows inside the training step: load with ple='device'")
    cfg = model.config
    lora.select_targets(cfg, lora_config)  # bad patterns fail before any work
    top = max(int(e.tokens.max()) for e in dataset.examples)
    if top >= cfg.vocab_size:
        raise Gemma4Error(f"the tokenizer produced id {top}, outside the model's vocabulary of {cfg.vocab_size}")
    data.embed_media(dataset.examples, model.params, cfg)  # the encoders stay frozen: they run once per example
    train_examples, eval_examples = data.split(dataset.examples, eval_fraction, train_config.seed)
    train_rows = data.pack(train_examples, train_config.seq_len)
    eval_rows = data.pack(eval_examples, train_config.seq_len) if eval_examples else None
    base, source = checkpoint_layout(model.params), model.source  # LoRA wraps weights in the official layout
    if quantize:
        base = quantize_params(base, cfg, JaxPolicy(quantize))
        source += f", quantized to {quantize}"
    dropped = f"; {dataset.dropped} chats longer than --seq-len dropped" if dataset.dropped else ""
    print(
        f"base: {source}; data: {len(dataset.examples)} examples, {dataset.tokens:,} tokens "
        f"({len(train_examples)} train / {len(eval_examples)} eval){dropped}"
    )
    result = loop.train(
        cfg,
        base,
        train_rows,
        eval_rows,
        lora_config,
        train_config,
        out,
        resume=resume,
        base_id=base_id(cfg, quantize),
        mesh=mesh,
    )
    adapters = sharding.to_host(result.adapters)  # every process joins the gather; the first one writes
    if jax.process_index() == 0:
        lora.save_peft(out, cfg, adapters, lora_config, base_model=base_model, prefix=text_prefix)
    size = os.path.getsize(os.path.join(out, lora.PEFT_WEIGHTS))
    steps = train_config.steps
    final = result.losses.get(steps)
    ev = f", eval loss {result.eval_losses[steps]:.4f}" if steps in result.eval_losses else ""
    return (
        f"wrote {out}: adapters {lora.count(result.adapters):,} params ({size / 2**20:.2f} MiB, PEFT layout), "
        f"checkpoints, metrics.jsonl; steps {result.start_step + 1}-{steps}"
        + (f", final loss {final:.4f}" if final is not None else "")
        + f"{ev} in {time.perf_counter() - started:.1f} s"
    )
