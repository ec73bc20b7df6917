"""`gemma4-jax quantize` (write a quantized checkpoint) and `gemma4-jax eval-quant` (what quantization costs).

Heavy imports (jax, the model) happen inside the commands: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import functools
import os
import sys
import time

FORMATS = ("sfp8", "int8", "int4", "q8_0", "q4_0")


def _add_policy_args(p) -> None:
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
    from gemma4_jax import quant
    from gemma4_jax.errors import Gemma4Error

    block = None
    if args.block is not None:
        if args.format not in ("int8", "int4"):
            raise Gemma4Error(f"--block applies to int8/int4, not {args.format}")
        block = quant.parse_spec(f"{args.format}/{args.block}").block
    overrides = []
    for text in args.override:
        pattern, sep, spec = text.partition("=")
        if not sep or not pattern or not spec:
            raise Gemma4Error(f"--override takes PATTERN=SPEC (e.g. 'layer_*/mlp/linear=int8'), got {text!r}")
        overrides.append((pattern, quant.parse_spec(spec)))
    return quant.QuantPolicy(args.format, block, tuple(overrides))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def cmd_quantize(args) -> int:
    import jax.numpy as jnp

    from gemma4_jax import cli, config, quant
    from gemma4_jax.errors import Gemma4Error

    policy = _policy(args)
    dtype = str(jnp.dtype(cli._DTYPES[args.dtype or "bfloat16"]))
    quant._prepare_output(args.output)
    if args.checkpoint and (quant.is_quantized_checkpoint(args.checkpoint) or _is_hf_directory(args.checkpoint)):
        cfg, sources = quant._hf_source(args.checkpoint)  # streamed: one float tensor in memory at a time
        source, copy_from = f"checkpoint {args.checkpoint}", args.checkpoint
    elif args.checkpoint:  # orbax, kaggle:, hf: — loaded whole, then quantized leaf by leaf
        cfg, params, source = cli.load_model(args, "bfloat16")
        sources = quant.tree_source(params)
        copy_from = getattr(args, "checkpoint_dir", None)
    elif args.variant:
        cfg = config.get_config(args.variant)
        sources = quant._random_source(cfg, args.init_seed, dtype)
        source, copy_from = f"random {cfg.name} weights (seed {args.init_seed}, {dtype})", None
    else:
        raise Gemma4Error("give --checkpoint DIR (an HF checkpoint) or --variant NAME (random weights)")
    print(f"quantizing {source} to {args.format} -> {args.output}", file=sys.stderr, flush=True)
    summary = quant.write_quantized(
        args.output, cfg, sources, policy, dtype, copy_from=copy_from, progress=quant.print_progress
    )
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensors"].items()))
    print(
        f"wrote {args.output}: {cfg.name} in {args.format}, {_gb(summary['bytes_after'])} "
        f"(from {_gb(summary['bytes_before'])}, {summary['bytes_before'] / max(1, summary['bytes_after']):.2f}x "
        f"smaller; tensors: {kinds}) in {summary['seconds']:.1f} s"
    )
    return 0


def _is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path)
    )


def _read_tokens(args, cfg) -> list[int]:
    from gemma4_jax import cli
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.sampler import check_token_ids

    path = args.text or args.tokens
    if not os.path.isfile(path):
        raise Gemma4Error(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if args.text:
        tokenizer = cli.load_tokenizer_for(args)
        tokens = tokenizer.encode(content, add_bos=True)
    else:
        tokens = cli._parse_token_ids(content, "--tokens file")
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    if len(tokens) < 2:
        raise Gemma4Error(f"{path}: {len(tokens)} tokens; at least 2 are needed to score a next token")
    check_token_ids(cfg, tokens, path)
    return tokens


def cmd_eval_quant(args) -> int:
    import jax
    import numpy as np

    from gemma4_jax import cli, quant
    from gemma4_jax.errors import Gemma4Error

    policy = _policy(args)
    if args.context < 2:
        raise Gemma4Error(f"--context must be at least 2, got {args.context}")
    cfg, params, source = cli.load_model(args, "float32")
    if any(isinstance(w, quant.QuantizedWeight) for w in jax.tree_util.tree_leaves(params, is_leaf=_is_q)):
        raise Gemma4Error(f"{args.checkpoint} is a quantized checkpoint; eval-quant needs the float one")
    tokens = _read_tokens(args, cfg)
    start = time.perf_counter()
    qparams = quant.quantize_params(params, cfg, policy=policy)
    quantize_seconds = time.perf_counter() - start
    forward = _jitted_forward()

    nll_f = nll_q = kl = agree = 0.0
    scored = 0
    context = min(args.context, cfg.max_context)
    for begin in range(0, len(tokens) - 1, context - 1):  # windows overlap by one token: every token is scored
        window = tokens[begin : begin + context]
        if len(window) < 2:
            break
        ids = np.asarray([window])
        logp_f = jax.nn.log_softmax(forward(params, ids, config=cfg)[0][0].astype(np.float32), axis=-1)
        logp_q = jax.nn.log_softmax(forward(qparams, ids, config=cfg)[0][0].astype(np.float32), axis=-1)
        logp_f, logp_q = np.asarray(logp_f[:-1], np.float64), np.asarray(logp_q[:-1], np.float64)
        target = np.asarray(window[1:])
        rows = np.arange(len(target))
        nll_f -= logp_f[rows, target].sum()
        nll_q -= logp_q[rows, target].sum()
        kl += (np.exp(logp_f) * (logp_f - logp_q)).sum()
        agree += (logp_f.argmax(-1) == logp_q.argmax(-1)).sum()
        scored += len(target)
        print(f"scored {scored}/{len(tokens) - 1} tokens", file=sys.stderr, flush=True)

    bytes_f, bytes_q = quant.weight_bytes(params), quant.weight_bytes(qparams)
    rows = [
        ("model", source),
        ("tokens scored", f"{scored} (windows of {context})"),
        ("perplexity float", f"{np.exp(nll_f / scored):.4f}"),
        (f"perplexity {args.format}", f"{np.exp(nll_q / scored):.4f}"),
        ("KL(float || quantized) / token", f"{kl / scored:.6f} nats"),
        ("top-1 agreement", f"{agree / scored:.4f}"),
        ("weight bytes float", f"{bytes_f:,} ({_gb(bytes_f)})"),
        (f"weight bytes {args.format}", f"{bytes_q:,} ({_gb(bytes_q)}, {bytes_f / bytes_q:.2f}x smaller)"),
        ("quantize time", f"{quantize_seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


@functools.cache
def _jitted_forward():
    """One jitted forward per process: repeated evaluations of the same shapes compile once."""
    import jax

    from gemma4_jax import model

    return jax.jit(model.apply, static_argnames=("config",))


def _is_q(x) -> bool:
    from gemma4_jax.quant import QuantizedWeight

    return isinstance(x, QuantizedWeight)


def register(subparsers) -> None:
    from gemma4_jax import cli

    q = subparsers.add_parser(
        "quantize",
        help="write a quantized checkpoint (sfp8, int8, int4, q8_0, q4_0)",
        description="Quantize a checkpoint into a new directory that `generate --checkpoint` loads. Defaults: "
        "norms, scalars and the MoE router stay float; under int4/q4_0 the PLE projections, the token embedding "
        "and the PLE table use 8 bits.",
    )
    cli.add_model_args(q, "bfloat16")
    _add_policy_args(q)
    q.add_argument("-o", "--output", required=True, help="new (or empty) output directory")
    q.set_defaults(func=cmd_quantize)

    e = subparsers.add_parser(
        "eval-quant",
        help="perplexity, KL and top-1 agreement of a quantized model against the float one",
        description="Score a text with the float model and its quantized version.",
    )
    cli.add_model_args(e, "float32")
    _add_policy_args(e)
    text = e.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="UTF-8 text file (tokenized with the checkpoint's or --tokenizer's tokenizer)")
    text.add_argument("--tokens", help="file of token ids separated by whitespace or commas")
    e.add_argument("--tokenizer", help="tokenizer directory/file (default: the checkpoint directory)")
    e.add_argument("--context", type=int, default=512, help="tokens per scored window (default 512)")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    e.set_defaults(func=cmd_eval_quant)
