"""`gemma4-jax`: the command line. It only parses arguments and calls the library (`gemma4_jax.api` and the task
functions); every check of what the arguments mean lives there.

Bad input ends with one line `gemma4-jax: error: ...` and exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

RANDOM = "random weights (no --checkpoint)"


# ----- shared arguments --------------------------------------------------------------------------------------


def _source_args(p: argparse.ArgumentParser, *, dtype: str | None, ple: bool, random: bool = True) -> None:
    """--checkpoint (and --variant/--config to force its config, or to pick random weights), and where they apply
    --dtype, --ple, --init-seed."""
    p.add_argument(
        "--checkpoint",
        help="official orbax (Flax), HF or quantized directory, kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION], "
        "or hf:OWNER/NAME[@REVISION]",
    )
    forced = "with --checkpoint: force this variant (default: recognised from the tensor shapes)"
    p.add_argument(
        "--variant",
        help=forced + ("; without: random weights of a preset (e2b, e4b, 31b, 26b_a4b, tiny, ...)" if random else ""),
    )
    p.add_argument("--config", help="HF-style config.json for sizes other than the presets (with/without --checkpoint)")
    p.add_argument(
        "--text-only",
        action="store_true",
        help="the text decoder alone: leave the vision and audio encoders out (unread)",
    )
    if dtype is not None:
        p.add_argument("--dtype", help=f"parameter/compute dtype: bfloat16 (bf16) or float32 (f32); default {dtype}")
    if random:
        p.add_argument("--init-seed", type=int, help="seed of random weights (without --checkpoint; default 0)")
    if ple:
        p.add_argument(
            "--ple",
            default="device",
            help="where the Per-Layer-Embedding table lives: device (default), host (RAM) or mmap (memory-mapped from "
            "the HF checkpoint's safetensors file); off the device only each token's rows are sent",
        )


def _mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        help="shard over devices: axis=size,... over data, fsdp, tensor, expert (e.g. fsdp=4,tensor=2), a preset "
        "(fsdp, fsdp_tp, expert) or auto; sizes multiply to the device count (all processes)",
    )
    p.add_argument("--coordinator", help="multi-host: host:port of process 0 (or $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (or $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (or $JAX_PROCESS_ID)")


def _random_seed(args) -> int:
    from gemma4_jax.errors import Gemma4Error

    seed = getattr(args, "init_seed", None)
    if seed is not None and args.checkpoint:
        raise Gemma4Error("--init-seed applies to random weights, not to --checkpoint")
    return 0 if seed is None else seed


def _open(args, random: bool = True):
    """The WeightSource of --checkpoint / --variant / --config."""
    from gemma4_jax import sources
    from gemma4_jax.errors import Gemma4Error

    if not args.checkpoint and not random:
        raise Gemma4Error("give --checkpoint (this command needs real weights)")
    return sources.open_source(
        args.checkpoint,
        variant=args.variant,
        config_file=args.config,
        init_seed=_random_seed(args),
        text_only=args.text_only,
    )


def _load(args, default_dtype: str, tokenizer: str | None = None, layout: str = "auto"):
    """The model for a command; `layout` "checkpoint" where the parameters are read or transformed as stored
    (logits of the plain forward, quantization), "auto" where it generates (`api.load`)."""
    from gemma4_jax import api

    return api.load(
        args.checkpoint,
        dtype=getattr(args, "dtype", None),
        ple=getattr(args, "ple", "device"),
        variant=args.variant,
        config=args.config,
        init_seed=_random_seed(args),
        tokenizer=tokenizer,
        default_dtype=default_dtype,
        text_only=args.text_only,
        layout=layout,
        mesh=getattr(args, "mesh", None),
    )


def _media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image (PNG, JPEG, ...; repeatable). A text prompt without <|image|> placeholders gets one per "
        "image first; --prompt-ids must hold the placeholder ids",
    )
    p.add_argument(
        "--image-tokens",
        type=int,
        default=280,
        help="soft tokens per image: 70, 140, 280 (default), 560 or 1120",
    )
    p.add_argument(
        "--audio", action="append", default=[], metavar="PATH", help="an audio file (WAV, FLAC, OGG, MP3; repeatable)"
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    # Defaults are the ones the official checkpoints ship in generation_config.json (spec §3.6).
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=64, help="default 64")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _sampling(args):
    from gemma4_jax.sampler import SamplingConfig

    return SamplingConfig(args.temperature, args.top_k, args.top_p)


def _token_ids(text: str, what: str) -> list[int]:
    from gemma4_jax.errors import Gemma4Error

    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise Gemma4Error(f"{what} takes token ids separated by commas (e.g. 2,651,6037); got {text!r}")
    return [int(p) for p in parts]


def _text(value: str, what: str) -> str:
    """A command-line string that must be valid UTF-8 (undecodable bytes arrive as surrogate escapes)."""
    from gemma4_jax.errors import Gemma4Error

    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Gemma4Error(f"{what} is not valid UTF-8 text") from None
    return value


def _print(line: str) -> None:
    print(line, flush=True)


# ----- generate, chat, logits, info, memory ------------------------------------------------------------------


def cmd_generate(args) -> int:
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.sampler import DEFAULT_STOP_TOKENS

    if args.prompt is not None and args.prompt_ids is not None:
        raise Gemma4Error("give --prompt (text) or --prompt-ids, not both")
    if args.chat and args.prompt is None:
        raise Gemma4Error("--chat wraps a text --prompt in a user turn")
    sampling = _sampling(args)
    stop = DEFAULT_STOP_TOKENS if args.stop is None else _token_ids(args.stop, "--stop") if args.stop else ()
    if args.prompt is not None:
        if not args.checkpoint and not args.tokenizer:  # before any weights are made
            raise Gemma4Error("text needs a tokenizer: give --checkpoint DIR with one, or --tokenizer PATH")
        prompt = _text(args.prompt, "--prompt")
    else:
        prompt = _token_ids(args.prompt_ids or "2", "--prompt-ids")
    model = _load(args, "bfloat16", args.tokenizer)
    if not args.checkpoint and not args.variant and not args.config:
        _print(
            f"gemma4-jax demo: a {model.config.num_layers}-layer Gemma 4 with random weights and every E2B feature on "
            f"(PLE, sliding window {model.config.sliding_window} + global layers, KV sharing, p-RoPE, soft-cap).\n"
            "Real weights: gemma4-jax generate --checkpoint DIR (an HF directory with config.json + *.safetensors)."
        )
    ids, soft = model.prepare(
        prompt, images=args.image, audio=args.audio, image_tokens=args.image_tokens, chat=args.chat
    )
    media = f" ({len(args.image)} image(s), {len(args.audio)} audio clip(s))" if args.image or args.audio else ""
    _print(f"model: {model.source}; prompt: {len(ids)} tokens{media}; sampling: {sampling}")

    def write(text):
        print(text, end="", flush=True)

    def print_id(row, token):
        print(token, end=" ", flush=True)

    from gemma4_jax.api import TextStream

    sampler = model.sampler(sampling, stop)
    sampler.validate([ids], args.max_new_tokens)
    on_token = TextStream(model.tokenizer, write) if isinstance(prompt, str) else print_id
    generation = sampler.generate([ids], args.max_new_tokens, seed=args.seed, on_token=on_token, soft=[soft])
    print()
    rate = generation.decode_steps / generation.decode_seconds if generation.decode_steps else float("nan")
    _print(
        f"generated {len(generation.tokens[0])} tokens ({generation.finish_reasons[0]}): compile "
        f"{generation.compile_seconds:.1f} s, prefill {generation.prefill_seconds:.2f} s, decode {rate:.1f} tok/s"
    )
    return 0


def _read_line(prompt: str) -> str | None:
    """A line from stdin (None at its end); undecodable bytes are an error for that line, not a crash."""
    from gemma4_jax.errors import Gemma4Error

    try:
        line = input(prompt)
    except EOFError:
        return None
    except UnicodeDecodeError:
        raise Gemma4Error("the input is not valid UTF-8 text") from None
    return _text(line, "the input")


def cmd_chat(args) -> int:
    """A multi-turn terminal chat: each turn re-renders the conversation with the chat template and streams the
    answer. Commands: /image PATH and /audio PATH attach media to your next message, /reset, /quit (or end of
    input)."""
    from gemma4_jax import multimodal
    from gemma4_jax.errors import Gemma4Error

    sampling = _sampling(args)
    system = [{"role": "system", "content": _text(args.system, "--system")}] if args.system else []
    model = _load(args, "bfloat16", args.tokenizer)
    model.require_tokenizer()
    messages = list(system)
    attached: list[dict] = []  # content parts for the next user message
    media = " /image PATH, /audio PATH attach media;" if model.config.multimodal else ""
    print(f"model: {model.source}. Type a message;{media} /reset starts over, /quit or Ctrl-D ends.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = _read_line("you> ")
        except Gemma4Error as e:
            print(f"gemma4-jax: {e}", file=sys.stderr)
            continue
        if line is None:
            print(file=sys.stderr)
            return 0
        command, _, argument = line.strip().partition(" ")
        if command == "/quit":
            return 0
        if command == "/reset":
            messages, attached = list(system), []
            continue
        if command in ("/image", "/audio"):
            kind = command[1:]
            try:  # read now, so a bad file is reported before the message is typed
                if kind == "image":
                    multimodal.check_support(model.config, [multimodal.load_image(argument, args.image_tokens)])
                else:
                    multimodal.check_support(model.config, [multimodal.load_audio(argument)])
            except Gemma4Error as e:
                print(f"gemma4-jax: {e}", file=sys.stderr)
                continue
            attached.append({"type": kind, kind: argument})
            print(f"({kind} attached to your next message)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        content = [*attached, {"type": "text", "text": line}] if attached else line
        messages.append({"role": "user", "content": content})
        print("model> ", end="", flush=True)
        try:
            result = model.generate(
                messages,
                image_tokens=args.image_tokens,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
                enable_thinking=args.thinking,
                seed=args.seed + turn,
                on_text=lambda text: print(text, end="", flush=True),
            )
        except Gemma4Error as e:
            messages.pop()
            print(f"\ngemma4-jax: {e} (/reset to start over)", file=sys.stderr)
            continue
        attached = []
        print()
        messages.append({"role": "assistant", "content": model.tokenizer.decode(result.tokens, skip_special=True)})
        turn += 1


def cmd_logits(args) -> int:
    import time

    import numpy as np

    from gemma4_jax import files

    tokens = _token_ids(args.tokens, "--tokens")
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    files.check_output(out)
    model = _load(args, "float32", layout="checkpoint")
    start = time.perf_counter()
    logits = model.logits(tokens)
    with files.atomic_output(out) as tmp, open(tmp, "wb") as f:
        np.save(f, logits)
    _print(
        f"wrote {out}: float32 {list(logits.shape)} logits of {model.source} "
        f"({os.path.getsize(out) / 2**20:.1f} MiB, {time.perf_counter() - start:.2f} s)"
    )
    return 0


def cmd_info(args) -> int:
    from gemma4_jax import config, model, param_spec, sources

    if args.checkpoint:  # only metadata is read (headers, config.json, orbax metadata)
        cfg = sources.open_source(args.checkpoint).config
    else:
        cfg = config.get_config(args.variant or sources.DEMO_VARIANT)
    spec = param_spec.param_spec(cfg)
    total = sum(math.prod(leaf.shape) for leaf in spec)
    unused = sum(math.prod(leaf.shape) for leaf in spec if leaf.unused)
    ple = sum(math.prod(leaf.shape) for leaf in spec if leaf.quant == param_spec.PLE_TABLE)
    towers = {part: sum(math.prod(leaf.shape) for leaf in spec if leaf.part == part) for part in ("vision", "audio")}
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
        "vision encoder + projection": f"{towers['vision']:,}" if towers["vision"] else "none",
        "audio encoder + projection": f"{towers['audio']:,}" if towers["audio"] else "none",
        "text decoder (HF tree)": f"{total - unused - sum(towers.values()):,}",
        "kv cache bf16 @4096 (W-capped)": f"{model.cache_bytes(cfg, 4096) / 2**20:.1f} MiB",
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_memory(args) -> int:
    from gemma4_jax import memory

    result = memory.plan(args.variant, args.quant, args.context, args.batch, args.ple, args.text_only)
    share = memory.mesh_plan(result, args.mesh, args.lora_rank) if args.mesh else None
    if args.json:
        out = result.to_dict()
        if share is not None:
            out["per_device"] = dataclasses.asdict(share) | {"total": share.total}
        print(json.dumps(out, indent=2))
    else:
        print(memory.format_plan(result) + (memory.format_mesh_plan(result, share, args.lora_rank) if share else ""))
    return 0


# ----- convert, quantize, eval-quant, export ------------------------------------------------------------------


def cmd_convert(args) -> int:
    from gemma4_jax import convert

    _print(convert.convert(_open(args, random=False), args.out, args.to, layout=args.layout, text_only=args.text_only))
    return 0


def _policy_args(p: argparse.ArgumentParser) -> None:
    from gemma4_jax.quant.codecs import FORMATS

    p.add_argument("--format", required=True, choices=FORMATS, help="quantization format of the weight matrices")
    p.add_argument(
        "--block",
        default=None,
        help="int8/int4: elements per scale along the contraction axis, or 'channel' "
        "(default: int4 32, int8 channel); Q8_0/Q4_0 always use ggml's 32",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=SPEC",
        help="per-tensor choice before the defaults, e.g. 'embedder/per_layer_embeddings=int4/32' or "
        "'layer_*/mlp/linear=float' (fnmatch on the parameter path; repeatable)",
    )


def _policy(args):
    from gemma4_jax.quant.policy import JaxPolicy

    return JaxPolicy.parse(args.format, args.block, args.override)


def cmd_quantize(args) -> int:
    from gemma4_jax import api, files
    from gemma4_jax.quant.checkpoint import quantize

    policy = _policy(args)
    dtype = api.parse_dtype(args.dtype or "bfloat16")
    files.check_output(args.output, directory=True)
    source = _open(args)
    files.log(f"quantizing {source.description} to {args.format} -> {args.output}")
    summary = quantize(source, args.output, policy, dtype=dtype)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensors"].items()))
    before, after = summary["bytes_before"], summary["bytes_after"]
    _print(
        f"wrote {args.output}: {source.config.name} in {args.format}, {files.human_bytes(after)} (from "
        f"{files.human_bytes(before)}, {before / max(1, after):.2f}x smaller; tensors: {kinds}) in "
        f"{summary['seconds']:.1f} s"
    )
    return 0


def cmd_eval_quant(args) -> int:
    from gemma4_jax import files
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.quant.evaluate import eval_quant

    policy = _policy(args)
    path = args.text or args.tokens
    content = files.read_text(path)
    model = _load(args, "float32", args.tokenizer, layout="checkpoint")
    if args.text:
        tokens = model.require_tokenizer().encode(content, add_bos=True)
    else:
        tokens = _token_ids(content, f"{path}")
    if args.max_tokens < 0:
        raise Gemma4Error(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    report = eval_quant(model, policy, tokens, args.context, log=files.log)
    bytes_f, bytes_q = report.bytes_float, report.bytes_quantized
    rows = [
        ("model", model.source),
        ("tokens scored", f"{report.tokens_scored} (windows of {report.context})"),
        ("perplexity float", f"{report.perplexity_float:.4f}"),
        (f"perplexity {args.format}", f"{report.perplexity_quantized:.4f}"),
        ("KL(float || quantized) / token", f"{report.kl_per_token:.6f} nats"),
        ("top-1 agreement", f"{report.top1_agreement:.4f}"),
        ("weight bytes float", f"{bytes_f:,} ({files.human_bytes(bytes_f)})"),
        (f"weight bytes {args.format}", f"{bytes_q:,} ({files.human_bytes(bytes_q)}, {bytes_f / bytes_q:.2f}x less)"),
        ("quantize time", f"{report.quantize_seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_export_gguf(args) -> int:
    from gemma4_jax.export.gguf import export_gguf
    from gemma4_jax.files import check_output

    check_output(args.output)
    if args.mmproj:
        check_output(args.mmproj)
    source = _open(args)
    _print(
        export_gguf(
            source, args.output, quant=args.quant, tokenizer_dir=args.tokenizer, mmproj=args.mmproj,
            mmproj_quant=args.mmproj_quant,
        )
    )  # fmt: skip
    return 0


def cmd_export_litert(args) -> int:
    from gemma4_jax.export.litert import export_litert
    from gemma4_jax.files import check_output

    check_output(args.output, directory=True)
    summary = export_litert(
        _open(args),
        args.output,
        quant=args.quant,
        ple_bits=args.ple_bits,
        prefill_len=args.prefill_len,
        cache_len=args.cache_len,
        tokenizer_dir=args.tokenizer,
        modalities=args.modalities,
        image_tokens=args.image_tokens,
        audio_frames=args.audio_frames,
        tower_quant=args.tower_quant,
    )
    _print(summary)
    return 0


# ----- finetune, merge -----------------------------------------------------------------------------------------


def cmd_finetune(args) -> int:
    from gemma4_jax import api
    from gemma4_jax.errors import Gemma4Error, require_packages
    from gemma4_jax.hf_format import HFSource, text_prefix
    from gemma4_jax.train import data, finetune, loop, lora

    require_packages("optax", "orbax.checkpoint", extra="train", what="finetune")
    lora_config = lora.LoraConfig(args.rank, args.alpha, args.dropout, tuple(t for t in args.targets.split(",") if t))
    train_config = loop.TrainConfig(
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
    source = _open(args)
    if not (args.tokenizer or source.directory):
        raise Gemma4Error("--tokenizer DIR is needed with random weights (no checkpoint to read it from)")
    model_tokenizer = api.load_tokenizer_of(args.tokenizer or source.directory, required=True)
    # bad data (and bad media files) fail before the weights are loaded
    dataset = data.load_dataset(args.data, model_tokenizer, args.seq_len, source.config, args.image_tokens)
    model = api.load(source, dtype=args.dtype, tokenizer=args.tokenizer, layout="checkpoint", mesh=args.mesh)
    prefix = text_prefix(source.files.names()) if isinstance(source, HFSource) else "model."
    summary = finetune.finetune(
        model,
        dataset,
        args.output,
        lora_config=lora_config,
        train_config=train_config,
        quantize=args.quantize,
        eval_fraction=args.eval_fraction,
        resume=args.resume,
        base_model=args.checkpoint,
        text_prefix=prefix,
    )
    _print(summary)
    return 0


def cmd_merge(args) -> int:
    from gemma4_jax.files import check_output
    from gemma4_jax.train.merge import merge

    check_output(args.output, directory=True)
    _print(merge(_open(args), args.adapter, args.output, dtype=args.dtype))
    return 0


def cmd_ship(args) -> int:
    """A checkpoint (+ chats) to verified GGUF / LiteRT artifacts: fine-tune, merge, export, verify, report."""
    from gemma4_jax.ship import main_summary, ship
    from gemma4_jax.train import loop, lora

    lora_config = lora.LoraConfig(args.rank, args.alpha)
    train_config = loop.TrainConfig(
        steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, save_every=max(1, args.steps // 4),
        eval_every=max(1, args.steps // 4), seed=args.seed,
    )  # fmt: skip
    report = ship(
        args.checkpoint, args.targets, args.output, data=args.data, lora_config=lora_config,
        train_config=train_config, prompt=args.prompt, new_tokens=args.new_tokens, eval_text=args.eval_text,
        eval_tokens=args.eval_tokens, prefill_len=args.prefill_len, cache_len=args.cache_len,
    )  # fmt: skip
    return main_summary(report)


# ----- the parser ----------------------------------------------------------------------------------------------

# = lora.DEFAULT_TARGETS (repeated so that building the parser does not import jax)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-jax", description="Gemma 4 in JAX/Flax.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="compile every time (default: compiled programs are kept in $GEMMA4_JAX_CACHE or ~/.cache/gemma4-jax/xla;"
        " GEMMA4_JAX_CACHE=off is this flag for a whole environment)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt.")
    _source_args(g, dtype="bfloat16", ple=True)
    g.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer, one <bos> first)")
    g.add_argument("--prompt-ids", help="prompt as token ids instead, e.g. 2,651,6037 (default: 2, i.e. <bos>)")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in a user turn of the chat template")
    g.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json or its directory (default: the checkpoint)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    _media_args(g)
    _sampling_args(g)
    g.add_argument("--stop", default=None, help="stop token ids (default 1,106,50; empty string: none)")
    _mesh_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal", description=cmd_chat.__doc__)
    _source_args(c, dtype="bfloat16", ple=True)
    c.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json or its directory (default: the checkpoint)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--thinking", action="store_true", help="enable thinking (<|think|> in the system turn)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--image-tokens", type=int, default=280, help="soft tokens per image: 70, 140, 280, 560, 1120")
    _sampling_args(c)
    _mesh_args(c)
    c.set_defaults(func=cmd_chat)

    lg = sub.add_parser(
        "logits",
        help="write full-forward logits to .npy",
        description="Write float32 [T, vocab] logits. The default dtype is float32 where it fits, else bfloat16.",
    )
    _source_args(lg, dtype="float32", ple=True)
    lg.add_argument("--tokens", required=True, help="token ids, e.g. 2,15,27")
    lg.add_argument("--out", required=True, help="output .npy file")
    _mesh_args(lg)
    lg.set_defaults(func=cmd_logits)

    info = sub.add_parser("info", help="config and parameter counts", description="Print config and sizes.")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="HF, orbax or quantized directory, kaggle:... or hf:...")
    src.add_argument("--variant", help="preset name")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    from gemma4_jax.memory import PLE_PLACES, QUANT_BYTES_PER_WEIGHT, VARIANTS

    m = sub.add_parser(
        "memory",
        help="weight and KV-cache bytes of a variant, on the device and on the host",
        description="Weights by part (PLE table, token embedding, decoder, vision, audio) in a quantization "
        "format, the W-capped KV cache, and the totals on the device and on the host. No weights are needed.",
    )
    m.add_argument("--variant", required=True, choices=VARIANTS)
    m.add_argument("--quant", choices=tuple(QUANT_BYTES_PER_WEIGHT), default="bf16", help="weight format")
    m.add_argument("--context", type=int, default=4096, help="KV-cache length in tokens (default 4096)")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--ple", choices=tuple(PLE_PLACES), default="device", help="where the PLE table lives")
    m.add_argument("--text-only", action="store_true", help="leave out the vision and audio encoders")
    m.add_argument(
        "--mesh",
        help="also the bytes each device holds on this mesh, e.g. fsdp=8 or fsdp=2,tensor=4 (axes data, fsdp, "
        "tensor, expert), and which common slices of that many devices it fits",
    )
    m.add_argument("--lora-rank", type=int, default=0, help="with --mesh: add LoRA adapters of this rank + AdamW")
    m.add_argument("--json", action="store_true", help="machine-readable output (exact bytes)")
    m.set_defaults(func=cmd_memory)

    cv = sub.add_parser(
        "convert",
        help="convert between official orbax (Flax) and HF safetensors checkpoints",
        description="Convert a checkpoint between the official orbax (Flax) layout and HF safetensors, "
        "losslessly (values and dtypes as stored). Tokenizer files travel along.",
    )
    _source_args(cv, dtype=None, ple=False, random=False)
    cv.add_argument("--to", required=True, choices=("orbax", "hf"), help="output format")
    cv.add_argument("-o", "--out", required=True, help="output directory (must not exist yet)")
    cv.add_argument(
        "--layout",
        choices=("nested", "flat"),
        default="nested",
        help="orbax output layout: nested = the Flax param tree (default), flat = transformer/... keys",
    )
    cv.set_defaults(func=cmd_convert)

    q = sub.add_parser(
        "quantize",
        help="write a quantized checkpoint (sfp8, int8, int4, q8_0, q4_0)",
        description="Quantize a checkpoint into a new directory that `generate --checkpoint` loads. Defaults: "
        "norms, scalars and the MoE router stay float; under int4/q4_0 the PLE projections, the token embedding "
        "and the PLE table use 8 bits.",
    )
    _source_args(q, dtype="bfloat16", ple=False)
    _policy_args(q)
    q.add_argument("-o", "--output", required=True, help="new (or empty) output directory")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval-quant",
        help="perplexity, KL and top-1 agreement of a quantized model against the float one",
        description="Score a text with the float model and its quantized version.",
    )
    _source_args(e, dtype="float32", ple=True)
    _policy_args(e)
    text = e.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="UTF-8 text file (tokenized with the checkpoint's or --tokenizer's tokenizer)")
    text.add_argument("--tokens", help="file of token ids separated by whitespace or commas")
    e.add_argument("--tokenizer", help="tokenizer directory/file (default: the checkpoint directory)")
    e.add_argument("--context", type=int, default=512, help="tokens per scored window (default 512)")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    e.set_defaults(func=cmd_eval_quant)

    export = sub.add_parser("export", help="export a checkpoint for another runtime")
    formats = export.add_subparsers(dest="format", required=True)
    from gemma4_jax.quant.policy import GGUF_QUANTS, MMPROJ_QUANTS

    eg = formats.add_parser("gguf", help="GGUF file that llama.cpp runs", description="GGUF file that llama.cpp runs")
    _source_args(eg, dtype=None, ple=False)
    eg.add_argument(
        "--tokenizer",
        help="directory with tokenizer.json (+ tokenizer_config.json, chat_template.jinja); default: --checkpoint",
    )
    eg.add_argument("--quant", default="f16", choices=GGUF_QUANTS, help="storage type of the weight matrices")
    eg.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    eg.add_argument(
        "--mmproj",
        metavar="FILE",
        help="also write the vision/audio encoders as the projector GGUF llama.cpp's mtmd reads (llama-mtmd-cli "
        "--mmproj FILE)",
    )
    eg.add_argument(
        "--mmproj-quant",
        default="f16",
        choices=MMPROJ_QUANTS,
        help="storage type of the encoders' matrices in the mmproj (default f16)",
    )
    eg.set_defaults(func=cmd_export_gguf)

    el = formats.add_parser(
        "litert", help="LiteRT .tflite models + .litertlm bundle", description="LiteRT .tflite models + .litertlm"
    )
    _source_args(el, dtype=None, ple=False)
    el.add_argument("--quant", choices=("none", "int8", "int4"), default="none", help="weight quantization")
    el.add_argument(
        "--ple-bits",
        type=int,
        choices=(4, 8),
        default=8,
        help="bits of the per-layer-input projections under --quant int4 (default 8: 4 bits roughly doubles error)",
    )
    el.add_argument(
        "--prefill-len",
        type=int,
        help="tokens per prefill call (default 128; with the vision tower of 31B/26B-A4B: --image-tokens + 2)",
    )
    el.add_argument("--cache-len", type=int, default=1024, help="KV cache length S (default 1024)")
    el.add_argument(
        "--modalities",
        help="what the bundle takes: text plus vision and/or audio, comma-separated (default: text and every tower "
        "the checkpoint has)",
    )
    el.add_argument(
        "--image-tokens",
        type=int,
        help="soft tokens per image = patch budget / 9 of the vision encoder (70, 140, 280, 560, 1120; default 280, "
        "transformers' default: 2520 patches)",
    )
    el.add_argument(
        "--audio-frames",
        type=int,
        help="10-ms mel frames per audio encoder call, a multiple of 4 (default 3000: 30 s, the longest clip "
        "transformers encodes; the engine splits longer audio into such chunks)",
    )
    el.add_argument(
        "--tower-quant",
        help="storage of the vision/audio towers' matrices: float or int8 (default: int8 per channel under --quant "
        "int8 and int4 alike - the towers are never int4 - and float otherwise)",
    )
    el.add_argument("--tokenizer", help="directory with tokenizer.model (default: the checkpoint directory)")
    el.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    el.set_defaults(func=cmd_export_litert)

    ft = sub.add_parser(
        "finetune",
        help="train LoRA adapters on chat or text data",
        description="Train LoRA adapters (base weights frozen; optionally quantized: QLoRA). Writes orbax "
        "checkpoints, metrics.jsonl and the adapters in Hugging Face PEFT layout into -o DIR.",
    )
    _source_args(ft, dtype="bfloat16", ple=False)
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
        help="comma-separated module names (q_proj,...,down_proj, per_layer_input_gate, per_layer_projection), "
        "the MoE expert stacks (experts.gate_up_proj, experts.down_proj) or fnmatch patterns over full names like "
        "'layers.1?.self_attn.*' (default: attention + MLP)",
    )
    ft.add_argument("--quantize", choices=("int8", "int4"), help="quantize the frozen base weights (QLoRA)")
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--seq-len", type=int, default=512, help="packed row length")
    ft.add_argument(
        "--image-tokens", type=int, default=280, help="soft tokens per image in the data: 70, 140, 280, 560, 1120"
    )
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
    _mesh_args(ft)
    ft.set_defaults(func=cmd_finetune)

    mg = sub.add_parser(
        "merge",
        help="fold LoRA adapters into a checkpoint",
        description="Write base + adapters as a normal HF checkpoint (config.json + model.safetensors + tokenizer), "
        "tensor by tensor.",
    )
    _source_args(mg, dtype="the source's", ple=False)
    mg.add_argument(
        "--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    mg.add_argument("-o", "--output", required=True, help="output checkpoint directory (must not exist)")
    mg.set_defaults(func=cmd_merge)

    sh = sub.add_parser(
        "ship",
        help="fine-tune, export and verify edge artifacts in one resumable run",
        description="Checkpoint (+ --data chats) -> LoRA fine-tune -> merge -> export each target -> verify each in "
        "its own runtime (llama.cpp; the LiteRT interpreter and LiteRT-LM engine) against JAX on the same quantized "
        "weights -> DIR/report.md, report.json and plots. Rerun the same command to resume a killed run. Exit status "
        "1 when an artifact fails verification.",
    )
    sh.add_argument("--checkpoint", required=True, help="local HF or orbax checkpoint directory with its tokenizer")
    sh.add_argument("--targets", required=True, help="comma-separated, e.g. gguf:q4_0,gguf:q8_0,litert:int4")
    sh.add_argument("-o", "--output", required=True, help="output directory (new or empty; or a ship run's, to resume)")
    sh.add_argument("--data", action="append", help="chats/text (.jsonl or .txt) to LoRA fine-tune on (repeatable)")
    sh.add_argument("--steps", type=int, default=100, help="fine-tune steps (default 100)")
    sh.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    sh.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    sh.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate (default 1e-4)")
    sh.add_argument("--batch", type=int, default=4, help="fine-tune rows per step (default 4)")
    sh.add_argument("--seq-len", type=int, default=256, help="fine-tune row length in tokens (default 256)")
    sh.add_argument("--seed", type=int, default=0, help="fine-tune seed (default 0)")
    sh.add_argument("--prompt", default="The quick brown fox", help="text whose greedy continuation is verified")
    sh.add_argument("--new-tokens", type=int, default=8, help="greedy tokens compared per runtime (default 8)")
    sh.add_argument("--eval-text", help="held-out text for quality without --data (default: a built-in sample)")
    sh.add_argument("--eval-tokens", type=int, default=256, help="held-out tokens scored (default 256)")
    sh.add_argument("--prefill-len", type=int, default=32, help="LiteRT prefill signature length (default 32)")
    sh.add_argument("--cache-len", type=int, default=128, help="LiteRT KV cache length (default 128)")
    sh.set_defaults(func=cmd_ship)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gemma4_jax.errors import Gemma4Error

    args = build_parser().parse_args(argv)
    try:
        from gemma4_jax.api import CACHE_OFF, use_compilation_cache

        use_compilation_cache(CACHE_OFF if args.no_compile_cache else None)
        if hasattr(args, "coordinator"):
            from gemma4_jax.sharding import initialize_distributed

            initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # before JAX starts
        return args.func(args)
    except Gemma4Error as e:
        if args.debug:
            raise
        print(f"gemma4-jax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # one the library did not turn into a Gemma4Error: still one line naming the file
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"gemma4-jax: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        hint = "try --dtype bfloat16, --ple mmap or a quantized checkpoint"
        print(f"gemma4-jax: error: out of memory ({hint})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemma4-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
