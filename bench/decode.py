"""Prefill and batch-1 decode throughput: gemma4-jax vs Hugging Face transformers, same random weights.

    python bench/decode.py                                  # Gemma 4 E2B, bf16, CPU, 128-token prompt, 32 new tokens
    python bench/decode.py --variant tiny --prompt-len 16 --new-tokens 8    # smoke run (seconds)

One run prints one table. The parent process never holds weights: it starts three subprocesses of this script,
one after the other, so that at most one copy of the model is in memory at any time:

1. `--worker create`: random weights from `init_params` (bf16), written with `save_hf_checkpoint`.
2. `--worker jax`: loads the checkpoint with `load_hf_checkpoint`, times `Sampler.generate`.
3. `--worker hf`: loads it with `Gemma4ForCausalLM.from_pretrained`, times `model.generate`.

Each worker prints one `BENCH_RESULT {json}` line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from common import OtherLoad, emit, limit_cpus, log, make_prompt, run_worker

JAX_ROW = "gemma4-jax (JAX)"
HF_ROW = "HF transformers (torch)"


# ----- workers (each runs in its own process) -------------------------------------------------------------


def _weight_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files (one, or the shards the writer splits a big model into)."""
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]


def worker_create(args) -> None:
    """Random weights for `--variant`, saved as an HF checkpoint in `--checkpoint` (reused if already there)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # weights are created on the host; no accelerator needed
    limit_cpus(args.threads)
    import jax
    import jax.numpy as jnp

    from gemma4_jax import config, hf_format, model

    cfg = config.get_config(args.variant).text_only()  # what Gemma4ForCausalLM reads
    if os.path.exists(os.path.join(args.checkpoint, "config.json")) and _weight_files(args.checkpoint):
        existing = config.Gemma4Config.load_json(os.path.join(args.checkpoint, "config.json"))
        if existing.replace(name=cfg.name) == cfg:
            log(f"reusing the {cfg.name} checkpoint already in {args.checkpoint}")
            emit({"reused": True, "seconds": 0.0})
            return
        raise SystemExit(f"{args.checkpoint} holds a checkpoint of another config; pick an empty --workdir")

    n_params = model.count_params(model.param_shapes(cfg))
    log(f"creating random {cfg.name} weights: {n_params / 1e9:.2f} B parameters, {2 * n_params / 2**30:.1f} GiB bf16")
    start = time.perf_counter()
    params = model.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    jax.block_until_ready(params)
    init_seconds = time.perf_counter() - start
    log(f"created in {init_seconds:.0f} s; saving to {args.checkpoint}")
    start = time.perf_counter()
    hf_format.save_hf_checkpoint(args.checkpoint, cfg, params)
    save_seconds = time.perf_counter() - start
    size = sum(os.path.getsize(path) for path in _weight_files(args.checkpoint))
    log(f"saved {size / 2**30:.2f} GiB in {save_seconds:.0f} s")
    emit({"reused": False, "init_seconds": init_seconds, "save_seconds": save_seconds, "params": n_params})


def worker_jax(args) -> None:
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    limit_cpus(args.threads)
    import jax
    import jax.numpy as jnp

    from gemma4_jax import api, model
    from gemma4_jax.sampler import Sampler, SamplingConfig

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: jax sees no GPU (devices: {jax.devices()})")
    device = str(jax.devices()[0])
    log(f"JAX: loading {args.checkpoint} onto {device}")
    start = time.perf_counter()
    # As a user loads it (text decoder only, like Gemma4ForCausalLM); `--layout auto` stores the matrices for
    # XLA:CPU's fused matrix-vector form on CPU (gemma4_jax.matvec), "checkpoint" keeps the official layout.
    loaded = api.load(args.checkpoint, dtype="bfloat16", text_only=True, layout=args.layout, progress=False)
    cfg, params = loaded.config, loaded.params
    jax.block_until_ready(params)
    load_seconds = time.perf_counter() - start
    prompt = make_prompt(cfg.vocab_size, args.prompt_len)
    n = args.new_tokens

    # No stop tokens: every run produces exactly `n` tokens, like HF's min_new_tokens below.
    sampler = Sampler(cfg, params, SamplingConfig(temperature=0.0), stop_tokens=())
    log(f"JAX: loaded in {load_seconds:.0f} s; compiling prefill + decode step (first generate call)")
    start = time.perf_counter()
    warm = sampler.generate([prompt], max_new_tokens=n)  # same shapes as the timed call, so nothing recompiles
    first_call_seconds = time.perf_counter() - start
    log(f"JAX: compiled in {warm.compile_seconds:.1f} s (first call {first_call_seconds:.1f} s); timed run")
    other = OtherLoad()
    with other.measure():
        timed = sampler.generate([prompt], max_new_tokens=n)
    if timed.compile_seconds > 1.0:  # the lowering/compilation cache should make this ~0
        log(f"JAX: warning: the timed call spent {timed.compile_seconds:.1f} s compiling again")

    # Bytes one decode step must read (for the GPU roofline): every weight except the PLE table (only one row per
    # token is gathered) and the K/V projections of KV-shared layers (never used), plus the K/V cache at the final
    # context length.
    shapes = model.param_shapes(cfg, jnp.bfloat16)
    unused = [shapes["embedder"]["per_layer_embeddings"]] if cfg.per_layer_input_dim else []
    for i in range(cfg.num_layers):
        if cfg.is_kv_reader(i):
            unused += [shapes[f"layer_{i}"]["attn"].get(k, {}) for k in ("kv_einsum", "k_einsum", "key_norm")]
    weight_bytes = 2 * (model.count_params(shapes) - sum(model.count_params(t) for t in unused))
    kv_bytes = model.cache_bytes(cfg, args.prompt_len + n)

    emit(
        {
            "device": device,
            "load_seconds": load_seconds,
            "compile_seconds": warm.compile_seconds,
            "timed_call_compile_seconds": timed.compile_seconds,
            "other_load_cores": other.cores,
            "first_call_seconds": first_call_seconds,
            "prefill_seconds": timed.prefill_seconds,
            "decode_seconds": timed.decode_seconds,
            "decode_steps": timed.decode_steps,
            "prompt": prompt,
            "tokens": timed.tokens[0],
            "weight_bytes": weight_bytes,
            "kv_bytes": kv_bytes,
        }
    )


def worker_hf(args) -> None:
    limit_cpus(args.threads)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    use_cuda = args.device == "gpu" and torch.cuda.is_available()
    device = "cuda" if use_cuda else "cpu"

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    log(f"HF: loading {args.checkpoint} ({device}, {torch.get_num_threads()} threads)")
    start = time.perf_counter()
    model, info = transformers.Gemma4ForCausalLM.from_pretrained(
        args.checkpoint, dtype=torch.bfloat16, output_loading_info=True
    )
    # lm_head is tied to embed_tokens; anything else missing would mean HF is benchmarking random init, not our file.
    missing = [k for k in info["missing_keys"] if not k.startswith("lm_head.")]
    if missing:
        raise SystemExit(f"HF did not load these tensors from the checkpoint: {missing[:5]}")
    model = model.to(device).eval()
    load_seconds = time.perf_counter() - start

    prompt = make_prompt(model.config.vocab_size, args.prompt_len)
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def generate(new_tokens):
        # min_new_tokens: no early stop at EOS, so exactly `new_tokens` tokens (our side runs without stop tokens).
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )

    with torch.inference_mode():
        log(f"HF: loaded in {load_seconds:.0f} s; first generate call (warm-up, 2 tokens)")
        start = time.perf_counter()
        generate(2)
        sync()
        first_call_seconds = time.perf_counter() - start

        other = OtherLoad()
        log(f"HF: warm-up took {first_call_seconds:.1f} s; timed prefill forward")
        with other.measure():
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            sync()
            prefill_seconds = time.perf_counter() - start

        log("HF: timed generate, and a plain cached greedy loop (its decode at its best: no generate overhead)")
        with other.measure():
            start = time.perf_counter()
            out = generate(n)
            sync()
            generate_seconds = time.perf_counter() - start
            step = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            token = step.logits[:, -1:].argmax(-1)
            loop_tokens = [int(token)]
            sync()
            start = time.perf_counter()
            for _ in range(n - 1):
                step = model(input_ids=token, past_key_values=step.past_key_values, use_cache=True)
                token = step.logits[:, -1:].argmax(-1)
                loop_tokens.append(int(token))
            sync()
            loop_seconds = time.perf_counter() - start
        if loop_tokens != out[0, ids.shape[1] :].tolist():
            log("HF: warning: the cached loop and generate disagree on the greedy tokens")

    emit(
        {
            "device": device,
            "threads": torch.get_num_threads(),
            "load_seconds": load_seconds,
            "first_call_seconds": first_call_seconds,
            "prefill_seconds": prefill_seconds,
            "generate_seconds": generate_seconds,
            "generate_decode_seconds": generate_seconds - prefill_seconds,  # generate = prefill + (n - 1) steps
            "decode_seconds": loop_seconds,  # the plain cached loop: (n - 1) forward calls of one token
            "decode_steps": n - 1,
            "other_load_cores": other.cores,
            "prompt": prompt,
            "tokens": out[0, ids.shape[1] :].tolist(),
        }
    )


WORKERS = {"create": worker_create, "jax": worker_jax, "hf": worker_hf}


# ----- parent: orchestration and the table -----------------------------------------------------------------


def run_decode_worker(kind: str, args, checkpoint_dir: str) -> dict | None:
    """Runs one worker (stderr passes through live) and returns its parsed result, or None if it failed."""
    options = {"checkpoint": checkpoint_dir, "variant": args.variant, "prompt_len": args.prompt_len}
    options |= {"new_tokens": args.new_tokens, "threads": args.threads, "device": args.device}
    return run_worker(__file__, kind, options)


def rates(result: dict | None, prompt_len: int) -> tuple[float, float] | None:
    if result is None:
        return None
    decode = result["decode_steps"] / result["decode_seconds"] if result["decode_steps"] else float("nan")
    return prompt_len / result["prefill_seconds"], decode


def format_table(args, jax_result, hf_result) -> str:
    header = ("implementation", "prefill tok/s", "decode tok/s", "compile/warm-up s", "peak RSS GiB")
    rows = []
    for name, result, warmup_key in ((JAX_ROW, jax_result, "compile_seconds"), (HF_ROW, hf_result, None)):
        r = rates(result, args.prompt_len)
        if r is None:
            rows.append((name, "failed", "failed", "failed", "failed"))
            continue
        warmup = result[warmup_key or "first_call_seconds"]
        rows.append((name, f"{r[0]:.1f}", f"{r[1]:.2f}", f"{warmup:.2f}", f"{result['peak_rss_gib']:.2f}"))
    ours, theirs = rates(jax_result, args.prompt_len), rates(hf_result, args.prompt_len)
    if ours and theirs:
        rows.append(("ratio ours/HF", f"{ours[0] / theirs[0]:.2f}x", f"{ours[1] / theirs[1]:.2f}x", "", ""))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(cells).rstrip()

    hf_device = hf_result["device"] if hf_result else "?"
    jax_device = jax_result["device"] if jax_result else "?"
    title = (
        f"Gemma 4 {args.variant.upper()}, random weights, bfloat16, batch 1, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens (greedy); JAX on {jax_device}, HF on {hf_device}; "
        f"{args.threads} CPU thread(s)"
    )
    out = [title, "", line(header), line(["-" * w for w in widths]), *map(line, rows[:2])]
    if len(rows) > 2:
        out += [line(["-" * w for w in widths]), line(rows[2])]
    return "\n".join(out)


def format_notes(args, jax_result, hf_result, create_result) -> str:
    notes = [
        "",
        "How each number is measured (one warm-up call, then one timed call, per implementation):",
        f"  prefill tok/s  {args.prompt_len} / prefill time. JAX: Generation.prefill_seconds of a Sampler.generate "
        "call (prefill into the KV cache, last-token logits, first greedy token). HF: one forward of the prompt "
        "with use_cache=True, logits_to_keep=1.",
        f"  decode tok/s   {args.new_tokens - 1} steps after the first token / their time. JAX: decode_steps / "
        "decode_seconds. HF: a plain cached loop of N-1 one-token forward calls (its best; generate(), timed "
        "too, adds overhead).",
        "  compile/warm-up  JAX: jit lower+compile of prefill and decode step (Generation.compile_seconds, no "
        "execution). HF: wall time of the first generate() call (2 new tokens; it also computes them).",
        "  peak RSS       ru_maxrss of that worker process (load + warm-up + timed run); the parent holds no weights.",
    ]
    if create_result:
        if create_result["reused"]:
            notes.append("Weights: reused an existing checkpoint in the work directory.")
        else:
            notes.append(
                f"Weights: init_params {create_result['init_seconds']:.0f} s, save_hf_checkpoint "
                f"{create_result['save_seconds']:.0f} s, peak RSS {create_result['peak_rss_gib']:.2f} GiB."
            )
    if jax_result and hf_result:
        notes.append(
            f"Load time: JAX {jax_result['load_seconds']:.0f} s, HF {hf_result['load_seconds']:.0f} s. "
            f"JAX first generate() call (compile + run) {jax_result['first_call_seconds']:.1f} s; the timed call's "
            f"compile_seconds (cache hit) {jax_result['timed_call_compile_seconds']:.3f} s."
        )
        loads = {"JAX": jax_result["other_load_cores"], "HF": hf_result["other_load_cores"]}
        busiest = max((v for v in loads.values() if v is not None), default=0.0)
        # A few percent of a core is background noise (kernel threads, page zeroing); a quarter core is a competitor.
        notes.append(
            "CPU used by other processes during the timed calls: "
            + ", ".join(f"{k} " + ("n/a (under 1 s)" if v is None else f"{v:.2f} cores") for k, v in loads.items())
            + (
                f" -- WARNING: they competed with the {args.threads} benchmark thread(s); rerun on a quiet machine."
                if busiest > 0.25
                else " (quiet)."
            )
        )
        if jax_result["prompt"] != hf_result["prompt"]:
            notes.append("WARNING: the two workers used different prompts.")
        a, b = jax_result["tokens"], hf_result["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        notes.append(
            f"Greedy tokens: the first {same} of {len(a)} agree. Not a correctness check: random weights amplify bf16 "
            "rounding differences along the sequence (the parity tests compare the implementations in float64/32)."
        )
    if args.device == "gpu" and jax_result:
        per_token = jax_result["weight_bytes"] + jax_result["kv_bytes"]
        bound = args.hbm_gbps * 1e9 / per_token
        ours = rates(jax_result, args.prompt_len)[1]
        notes.append(
            f"HBM roofline ({args.hbm_gbps:.0f} GB/s): {per_token / 1e9:.3f} GB read per decode token "
            f"(weights without the PLE table and unused shared-layer K/V {jax_result['weight_bytes'] / 1e9:.3f} GB, "
            f"KV cache at {args.prompt_len + args.new_tokens} tokens {jax_result['kv_bytes'] / 1e6:.1f} MB) -> "
            f"at most {bound:.0f} tok/s; ours {ours:.1f} tok/s = {100 * ours / bound:.1f}% of it."
        )
    return "\n".join(notes)


def run_benchmark(args) -> int:
    wall_start = time.perf_counter()
    if args.workdir:
        created_dir = not os.path.exists(args.workdir)
        os.makedirs(args.workdir, exist_ok=True)
        workdir = args.workdir
    else:
        workdir, created_dir = tempfile.mkdtemp(prefix="gemma4-bench-", dir="/tmp"), True
    preexisting = set(os.listdir(workdir))
    log(f"work directory: {workdir}")
    jax_result = hf_result = None
    try:
        create_result = run_decode_worker("create", args, workdir)
        if create_result is not None:
            jax_result = run_decode_worker("jax", args, workdir)
            hf_result = run_decode_worker("hf", args, workdir)
    finally:
        if args.keep:
            log(f"kept the checkpoint in {workdir}")
        elif created_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # a directory the user gave us: remove only what this run wrote
            for name in set(os.listdir(workdir)) - preexisting:
                os.remove(os.path.join(workdir, name))
    if create_result is None:
        return 1

    print(format_table(args, jax_result, hf_result))
    print(format_notes(args, jax_result, hf_result, create_result))
    wall = time.perf_counter() - wall_start
    ours, theirs = rates(jax_result, args.prompt_len), rates(hf_result, args.prompt_len)
    if ours and theirs:
        summary = (
            f"ours/HF: prefill {ours[0] / theirs[0]:.2f}x ({ours[0]:.1f} vs {theirs[0]:.1f} tok/s), "
            f"decode {ours[1] / theirs[1]:.2f}x ({ours[1]:.2f} vs {theirs[1]:.2f} tok/s)"
        )
    else:
        summary = "a worker failed, no comparison"
    print(f"\nsummary: {args.variant} bf16 {args.device}, {args.threads} thread(s): {summary}; wall time {wall:.0f} s")
    return 0 if ours and theirs else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="e2b", help="model preset (default e2b; 'tiny' for a smoke run)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens, BOS included (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads for both implementations (default: all usable CPUs)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: our JAX worker on the GPU (error if jax sees none); HF on cuda if torch has it, else CPU",
    )
    parser.add_argument(
        "--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth for the --device gpu roofline (H100 SXM: 3350)"
    )
    parser.add_argument(
        "--layout", default="auto", choices=("auto", "checkpoint"), help="our weight layout (api.load; default auto)"
    )
    parser.add_argument("--workdir", help="directory for the checkpoint (default: a new temporary one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (rerun with --workdir to reuse it)")
    # Internal: how the parent starts its workers.
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.main(build_parser(), WORKERS, run_benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
