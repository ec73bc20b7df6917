"""`gemma4-jax` command line: generate, logits, info.

Bad input ends with one line `gemma4-jax: error: ...` and exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

DEMO_VARIANT = "tiny"
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32"}


def _parse_token_ids(text: str, what: str) -> list[int]:
    from gemma4_jax.errors import Gemma4Error

    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise Gemma4Error(f"{what} takes token ids separated by commas (e.g. 2,651,6037); got {text!r}")
    return [int(p) for p in parts]


def load_tokenizer_for(args, required: bool = True):
    """The tokenizer from --tokenizer, else from the checkpoint directory; None if there is none and it is
    not required."""
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.tokenizer import load_tokenizer

    path = getattr(args, "tokenizer", None) or getattr(args, "checkpoint_dir", None) or args.checkpoint
    if path is None or not os.path.exists(path):
        if not required:
            return None
        if path is None:
            raise Gemma4Error("text needs a tokenizer: give --checkpoint DIR with one, or --tokenizer PATH")
        raise Gemma4Error(f"tokenizer path not found: {path}")
    try:
        return load_tokenizer(path)
    except Gemma4Error:
        if required:
            raise
        return None


class TextStream:
    """Prints generated tokens as text as they arrive, holding back incomplete UTF-8 byte sequences."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # a byte-fallback character still missing bytes
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


def load_model(args, default_dtype: str):
    """(config, params, description) from --checkpoint, --variant, or the built-in demo model."""
    import jax.numpy as jnp

    from gemma4_jax import config, model, ple, quant, sources

    dtype = jnp.dtype(_DTYPES[args.dtype or default_dtype])
    ple_mode = getattr(args, "ple", "device")  # host/mmap: the PLE table leaf becomes a ple.HostPLE
    if args.checkpoint and quant.is_quantized_checkpoint(args.checkpoint):  # written by `gemma4-jax quantize`
        args.checkpoint_dir = args.checkpoint
        cfg, params = quant.load_quantized(args.checkpoint, dtype if args.dtype else None)
        return cfg, params, f"quantized checkpoint {args.checkpoint}"
    if args.checkpoint:
        # orbax/HF directory, kaggle:..., hf:...; checkpoint_dir: the local directory with its tokenizer files
        cfg, params, args.checkpoint_dir = sources.load_checkpoint(
            args.checkpoint, dtype, variant=args.variant, config_file=getattr(args, "config", None), progress=True
        )
        return cfg, ple.place_table(cfg, params, ple_mode, args.checkpoint_dir), f"checkpoint {args.checkpoint}"
    cfg = sources.given_config(args.variant, getattr(args, "config", None)) or config.get_config(DEMO_VARIANT)
    params = ple.place_table(cfg, model.init_params(cfg, args.init_seed, dtype), ple_mode)
    return cfg, params, f"random weights (variant {cfg.name}, seed {args.init_seed})"


def cmd_generate(args) -> int:
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.sampler import DEFAULT_STOP_TOKENS, Sampler, SamplingConfig

    demo = not args.checkpoint and not args.variant
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.prompt is not None and args.prompt_ids is not None:
        raise Gemma4Error("give --prompt (text) or --prompt-ids, not both")
    tokenizer = load_tokenizer_for(args, required=args.prompt is not None or args.chat)
    if args.prompt is not None:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = (
            tokenizer.encode_chat(messages, add_generation_prompt=True)
            if args.chat
            else tokenizer.encode(args.prompt, add_bos=True)
        )
    else:
        prompt = _parse_token_ids(args.prompt_ids or "2", "--prompt-ids")
    cfg, params, source = load_model(args, "bfloat16")
    stop = DEFAULT_STOP_TOKENS if args.stop is None else _parse_token_ids(args.stop, "--stop") if args.stop else ()
    sampler = Sampler(cfg, params, sampling, stop_tokens=stop)
    sampler.validate([prompt], args.max_new_tokens)
    if demo:
        print(
            f"gemma4-jax demo: a {cfg.num_layers}-layer Gemma 4 with random weights and every E2B feature on "
            f"(PLE, sliding window {cfg.sliding_window} + global layers, KV sharing, p-RoPE, soft-cap).\n"
            "Real weights: gemma4-jax generate --checkpoint DIR (an HF directory with config.json + *.safetensors)."
        )
    print(f"model: {source}; prompt: {len(prompt)} tokens; sampling: {sampling}")

    def print_id(row, token):
        print(token, end=" ", flush=True)

    on_token = TextStream(tokenizer) if tokenizer is not None and args.prompt_ids is None else print_id
    result = sampler.generate([prompt], args.max_new_tokens, seed=args.seed, on_token=on_token)
    n = len(result.tokens[0])
    print()
    rate = result.decode_steps / result.decode_seconds if result.decode_steps else float("nan")
    print(
        f"generated {n} tokens ({result.finish_reasons[0]}): compile {result.compile_seconds:.1f} s, "
        f"prefill {result.prefill_seconds:.2f} s, decode {rate:.1f} tok/s"
    )
    return 0


def cmd_chat(args) -> int:
    """A multi-turn terminal chat: each turn re-renders the conversation with the chat template and streams
    the answer. Commands: /reset, /quit (or end of input)."""
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.sampler import DEFAULT_STOP_TOKENS, Sampler, SamplingConfig

    tokenizer = load_tokenizer_for(args)
    cfg, params, source = load_model(args, "bfloat16")
    sampler = Sampler(cfg, params, SamplingConfig(args.temperature, args.top_k, args.top_p), DEFAULT_STOP_TOKENS)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"model: {source}. Type a message; /reset starts over, /quit or Ctrl-D ends.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=args.thinking)
        try:
            sampler.validate([prompt], args.max_new_tokens)
        except Gemma4Error as e:
            messages.pop()
            print(f"gemma4-jax: {e} (/reset to start over)", file=sys.stderr)
            continue
        print("model> ", end="", flush=True)
        stream = TextStream(tokenizer)
        result = sampler.generate([prompt], args.max_new_tokens, seed=args.seed + turn, on_token=stream)
        print()
        messages.append({"role": "assistant", "content": tokenizer.decode(result.tokens[0], skip_special=True)})
        turn += 1


def cmd_logits(args) -> int:
    import jax
    import numpy as np

    from gemma4_jax import checkpoint, model
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.sampler import check_token_ids

    tokens = _parse_token_ids(args.tokens, "--tokens")
    cfg, params, source = load_model(args, "float32")
    if len(tokens) > cfg.max_context:
        raise Gemma4Error(f"{len(tokens)} tokens exceed the {cfg.max_context}-token context of {cfg.name}")
    check_token_ids(cfg, tokens, "--tokens")
    start = time.perf_counter()
    logits, _ = jax.jit(model.apply, static_argnames=("config",))(params, np.asarray([tokens]), config=cfg)
    logits = np.asarray(logits[0], np.float32)
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise Gemma4Error(f"output directory does not exist: {directory}")
    checkpoint.atomic_write(out, lambda tmp: np.save(tmp, logits))  # tmp ends in .npy too
    print(
        f"wrote {out}: float32 {list(logits.shape)} logits of {source} "
        f"({os.path.getsize(out) / 2**20:.1f} MiB, {time.perf_counter() - start:.2f} s)"
    )
    return 0


def cmd_info(args) -> int:
    from gemma4_jax import config, model, sources

    if args.checkpoint:  # orbax: the variant is recognised from the tensor metadata, nothing is read
        cfg = sources.checkpoint_config(args.checkpoint)
    else:
        cfg = config.get_config(args.variant or DEMO_VARIANT)
    shapes = model.param_shapes(cfg)
    total = model.count_params(shapes)
    embedder = shapes["embedder"]
    ple = model.count_params(embedder.get("per_layer_embeddings", {}))
    unused = sum(
        model.count_params(shapes[f"layer_{i}"]["attn"].get(k, {}))
        for i in range(cfg.num_layers)
        if cfg.is_kv_reader(i)
        for k in ("kv_einsum", "k_einsum", "key_norm")
    )
    info = {
        "variant": cfg.name,
        "layers": f"{cfg.num_layers} ({cfg.layer_string})",
        "embed_dim": cfg.embed_dim,
        "heads": f"{cfg.num_heads} query; KV {cfg.num_kv_heads} local / {cfg.global_kv_heads} global",
        "head_dim": f"{cfg.head_dim} local / {cfg.global_head_dim} global",
        "sliding_window": cfg.sliding_window,
        "k_eq_v_global": cfg.k_eq_v_global,
        "kv_shared_layers": cfg.num_kv_shared_layers,
        "ffw_hidden": sorted({cfg.layer_ffw_hidden(i) for i in range(cfg.num_layers)}),
        "experts": f"{cfg.num_experts} x {cfg.expert_hidden}, top {cfg.num_experts_per_token}"
        if cfg.num_experts
        else 0,
        "per_layer_input_dim": cfg.per_layer_input_dim,
        "max_context": cfg.max_context,
        "params (official tree)": f"{total:,}",
        "params without unused reader K/V": f"{total - unused:,}",
        "params without PLE table": f"{total - unused - ple:,}",
        "kv cache bf16 @4096 (W-capped)": f"{model.cache_bytes(cfg, 4096) / 2**20:.1f} MiB",
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def add_model_args(p: argparse.ArgumentParser, dtype_default: str) -> None:
    """--checkpoint / --variant / --dtype / --init-seed / --ple, read by `load_model`."""
    p.add_argument(
        "--checkpoint",
        help="official orbax (Flax) or HF directory, kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION], "
        "or hf:OWNER/NAME",
    )
    p.add_argument(
        "--variant",
        help="with --checkpoint: force this variant (default: recognised from the tensor shapes); without: random "
        f"weights of a preset (e2b, e4b, 31b, 26b_a4b, tiny, ...); default: the {DEMO_VARIANT} demo",
    )
    p.add_argument("--config", help="HF-style config.json for sizes other than the presets (with/without --checkpoint)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help=f"parameter/compute dtype (default {dtype_default})")
    p.add_argument("--init-seed", type=int, default=0, help="seed of random weights (--variant / demo)")
    p.add_argument(
        "--ple",
        choices=("device", "host", "mmap"),
        default="device",
        help="where the Per-Layer-Embedding table lives: device memory (default), host RAM, or memory-mapped from "
        "the checkpoint's safetensors file (mmap); off the device only each token's rows are sent",
    )


def sampling_args(p: argparse.ArgumentParser) -> None:
    # Defaults are the ones the official checkpoints ship in generation_config.json (spec §3.6).
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=64, help="default 64")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


# Modules that add subcommands: each has `register(subparsers)` and imports its heavy dependencies lazily.
_COMMAND_MODULES: tuple[str, ...] = (
    "gemma4_jax.export.cli",
    "gemma4_jax.convert",
    "gemma4_jax.memory",
    "gemma4_jax.quant_cli",
    "gemma4_jax.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-jax", description="Gemma 4 in JAX/Flax.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt.")
    add_model_args(g, "bfloat16")
    g.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer, one <bos> first)")
    g.add_argument("--prompt-ids", help="prompt as token ids instead, e.g. 2,651,6037 (default: 2, i.e. <bos>)")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in a user turn of the chat template")
    g.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json or its directory (default: the checkpoint)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    sampling_args(g)
    g.add_argument("--stop", default=None, help="stop token ids (default 1,106,50; empty string: none)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal", description=cmd_chat.__doc__)
    add_model_args(c, "bfloat16")
    c.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json or its directory (default: the checkpoint)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--thinking", action="store_true", help="enable thinking (<|think|> in the system turn)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    sampling_args(c)
    c.set_defaults(func=cmd_chat)

    lg = sub.add_parser(
        "logits", help="write full-forward logits to .npy", description="Write float32 [T, vocab] logits."
    )
    add_model_args(lg, "float32")
    lg.add_argument("--tokens", required=True, help="token ids, e.g. 2,15,27")
    lg.add_argument("--out", required=True, help="output .npy file")
    lg.set_defaults(func=cmd_logits)

    info = sub.add_parser("info", help="config and parameter counts", description="Print config and sizes.")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="HF or orbax directory, kaggle:... or hf:...")
    src.add_argument("--variant", help="preset name")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gemma4_jax.errors import Gemma4Error

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Gemma4Error as e:
        if args.debug:
            raise
        print(f"gemma4-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemma4-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
