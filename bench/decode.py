"""Prefill, decode and time to first token: gemma4-jax vs Hugging Face transformers, same random weights.

    python bench/decode.py                                  # Gemma 4 E2B, bf16, CPU, 128-token prompt, 32 new tokens
    python bench/decode.py --variant tiny --prompt-len 16 --new-tokens 8    # smoke run (seconds)
    python bench/decode.py --variant 26b_a4b --layers 6     # the MoE at full width, 6 of its 30 layers (~12 GB)

One run prints one table. The parent process never holds weights: it starts subprocesses of this script, one
after the other, so that at most one copy of the model is in memory at any time:

1. `--worker create`: random weights from `init_params` (bf16), written with `save_hf_checkpoint`.
2. `--rounds` times, alternating (default 2): `--worker jax` (loads the checkpoint with `api.load` as a user does,
   times `Sampler.generate`) and `--worker hf` (`Gemma4ForCausalLM.from_pretrained`, times its forward).
   Round 1's JAX worker starts with an empty persistent compilation cache, round 2's finds it warm: its time to
   first token is the "second run" of a user's command.

Each worker times `--repeat` calls (default 3) and keeps the best of each figure; the parent keeps the best over
rounds (the machines are noisy: alternating the two and keeping the best of several compares them at their best).
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

    cfg = common.bench_config(args.variant, args.layers).text_only()  # what Gemma4ForCausalLM reads
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


def _resident_bytes(tree) -> int:
    """Bytes of the arrays in a loaded parameter tree (weight objects count their stored data; a PLE table kept on
    the host counts too)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "nbytes")):
        total += int(getattr(leaf, "nbytes", 0) or 0)
    return total


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
    if args.compile_cache:
        api.use_compilation_cache(args.compile_cache)  # what the CLI does by default
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
    log(f"JAX: loaded in {load_seconds:.0f} s; first generate call (compile, or the persistent cache, + run)")
    first_token_at = []
    start = time.perf_counter()
    warm = sampler.generate(
        [prompt], max_new_tokens=n, on_token=lambda row, token: first_token_at.append(time.perf_counter())
    )
    ttft = first_token_at[0] - start
    log(f"JAX: time to first token {ttft:.1f} s (compile/cache {warm.compile_seconds:.1f} s); timed calls")
    other = OtherLoad()
    timed = []
    with other.measure():
        for _ in range(args.repeat):
            timed.append(sampler.generate([prompt], max_new_tokens=n))
    if max(t.compile_seconds for t in timed) > 1.0:  # the lowering/compilation cache should make this ~0
        log("JAX: warning: a timed call spent more than 1 s compiling again")
    batch = {}
    if args.batch > 1:
        prompts = [prompt] * args.batch
        sampler.generate(prompts, max_new_tokens=n)  # compiles the batch shapes
        with other.measure():
            runs = [sampler.generate(prompts, max_new_tokens=n) for _ in range(args.repeat)]
        best_run = min(runs, key=lambda g: g.decode_seconds)
        batch = {"batch_decode_seconds": best_run.decode_seconds, "batch_decode_steps": best_run.decode_steps}

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
            "ttft_seconds": ttft,
            "timed_call_compile_seconds": max(t.compile_seconds for t in timed),
            "other_load_cores": other.cores,
            "prefill_seconds": min(t.prefill_seconds for t in timed),
            "decode_seconds": min(t.decode_seconds for t in timed),
            "decode_steps": timed[0].decode_steps,
            **batch,
            "prompt": prompt,
            "tokens": timed[0].tokens[0],
            "weight_bytes": weight_bytes,
            "resident_bytes": _resident_bytes(params),
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

    def cached_loop(input_ids, steps):
        """Prefill, then `steps` one-token forward calls reusing the cache (greedy): the plain loop, HF's best."""
        step = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, logits_to_keep=1)
        token = step.logits[:, -1:].argmax(-1)
        tokens = [token[:, 0].tolist()]
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step = model(input_ids=token, past_key_values=step.past_key_values, use_cache=True)
            token = step.logits[:, -1:].argmax(-1)
            tokens.append(token[:, 0].tolist())
        sync()
        return time.perf_counter() - start, [list(row) for row in zip(*tokens, strict=True)]

    with torch.inference_mode():
        log(f"HF: loaded in {load_seconds:.0f} s; first generate call (time to first token)")
        start = time.perf_counter()
        generate(1)  # prefill + the first token: its time to first token in a new process
        sync()
        ttft = time.perf_counter() - start
        generate(2)  # warm-up
        other = OtherLoad()
        log(f"HF: time to first token {ttft:.1f} s; timed prefill forwards, generate, cached greedy loops")
        prefills, loops, batch_loops = [], [], []
        with other.measure():
            for _ in range(args.repeat):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                sync()
                prefills.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = generate(n)
            sync()
            generate_seconds = time.perf_counter() - start
            for _ in range(args.repeat):
                seconds, loop_tokens = cached_loop(ids, n - 1)
                loops.append(seconds)
            if args.batch > 1:
                for _ in range(args.repeat):
                    batch_loops.append(cached_loop(ids.repeat(args.batch, 1), n - 1)[0])
        if loop_tokens[0] != out[0, ids.shape[1] :].tolist():
            log("HF: warning: the cached loop and generate disagree on the greedy tokens")

    batch = {"batch_decode_seconds": min(batch_loops), "batch_decode_steps": n - 1} if batch_loops else {}
    emit(
        {
            "device": device,
            "threads": torch.get_num_threads(),
            "load_seconds": load_seconds,
            "ttft_seconds": ttft,
            "prefill_seconds": min(prefills),
            "generate_seconds": generate_seconds,
            "generate_decode_seconds": generate_seconds - min(prefills),  # generate = prefill + (n - 1) steps
            "decode_seconds": min(loops),  # the plain cached loop: (n - 1) forward calls of one token
            "decode_steps": n - 1,
            **batch,
            "other_load_cores": other.cores,
            "prompt": prompt,
            "tokens": out[0, ids.shape[1] :].tolist(),
        }
    )


WORKERS = {"create": worker_create, "jax": worker_jax, "hf": worker_hf}


# ----- parent: orchestration and the table -----------------------------------------------------------------


def run_decode_worker(kind: str, args, checkpoint_dir: str, compile_cache: str = "") -> dict | None:
    """Runs one worker (stderr passes through live) and returns its parsed result, or None if it failed."""
    options = {"checkpoint": checkpoint_dir, "variant": args.variant, "layers": args.layers}
    options |= {"prompt_len": args.prompt_len}
    options |= {"new_tokens": args.new_tokens, "threads": args.threads, "device": args.device}
    if kind != "create":
        options |= {"repeat": args.repeat, "batch": args.batch, "layout": args.layout}
    if compile_cache:
        options["compile_cache"] = compile_cache
    return run_worker(__file__, kind, options)


def best_of(rounds: list[dict | None]) -> dict | None:
    """One implementation's rounds merged: the best (shortest) of each timed figure, the largest peak RSS, each
    round's time to first token in order."""
    done = [r for r in rounds if r is not None]
    if len(done) < len(rounds):
        return None
    merged = dict(done[0])
    for key in ("prefill_seconds", "decode_seconds", "batch_decode_seconds"):
        if key in merged:
            merged[key] = min(r[key] for r in done)
    merged["peak_rss_gib"] = max(r["peak_rss_gib"] for r in done)
    merged["ttft_rounds"] = [r["ttft_seconds"] for r in done]
    cores = [r["other_load_cores"] for r in done if r["other_load_cores"] is not None]
    merged["other_load_cores"] = max(cores) if cores else None
    return merged


def rates(result: dict | None, prompt_len: int, batch: int = 1) -> tuple[float, float, float | None] | None:
    """prefill tok/s, decode tok/s at batch 1, decode tok/s summed over the batch (None: not measured)."""
    if result is None:
        return None
    decode = result["decode_steps"] / result["decode_seconds"] if result["decode_steps"] else float("nan")
    batched = None
    if result.get("batch_decode_seconds"):
        batched = batch * result["batch_decode_steps"] / result["batch_decode_seconds"]
    return prompt_len / result["prefill_seconds"], decode, batched


def format_table(args, jax_result, hf_result) -> str:
    ttft_names = ["TTFT 1st run s", "TTFT 2nd run s"][: args.rounds] + [
        f"TTFT run {i + 1} s" for i in range(2, args.rounds)
    ]
    header = ("implementation", "prefill tok/s", "decode tok/s", f"decode tok/s b={args.batch}", *ttft_names)
    header += ("peak RSS GiB",)
    rows = []
    for name, result in ((JAX_ROW, jax_result), (HF_ROW, hf_result)):
        r = rates(result, args.prompt_len, args.batch)
        if r is None:
            rows.append((name, *["failed"] * (len(header) - 1)))
            continue
        batched = "-" if r[2] is None else f"{r[2]:.2f}"
        ttfts = [f"{t:.2f}" for t in result["ttft_rounds"]]
        rows.append((name, f"{r[0]:.1f}", f"{r[1]:.2f}", batched, *ttfts, f"{result['peak_rss_gib']:.2f}"))
    ours, theirs = rates(jax_result, args.prompt_len, args.batch), rates(hf_result, args.prompt_len, args.batch)
    if ours and theirs:
        batched = f"{ours[2] / theirs[2]:.2f}x" if ours[2] and theirs[2] else ""
        ttfts = [f"{t / u:.2f}x" for t, u in zip(jax_result["ttft_rounds"], hf_result["ttft_rounds"], strict=True)]
        rows.append(
            ("ratio ours/HF", f"{ours[0] / theirs[0]:.2f}x", f"{ours[1] / theirs[1]:.2f}x", batched, *ttfts, "")
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(cells).rstrip()

    hf_device = hf_result["device"] if hf_result else "?"
    jax_device = jax_result["device"] if jax_result else "?"
    cut = f" ({args.layers} layers)" if args.layers else ""
    title = (
        f"Gemma 4 {args.variant.upper()}{cut}, random weights, bfloat16, prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens (greedy); JAX on {jax_device}, HF on {hf_device}; "
        f"{args.threads} CPU thread(s); best of {args.repeat} calls x {args.rounds} alternating rounds"
    )
    out = [title, "", line(header), line(["-" * w for w in widths]), *map(line, rows[:2])]
    if len(rows) > 2:
        out += [line(["-" * w for w in widths]), line(rows[2])]
    return "\n".join(out)


def format_notes(args, jax_result, hf_result, create_result) -> str:
    notes = [
        "",
        f"How each number is measured (per worker: one warm-up call, then {args.repeat} timed calls, best kept; "
        f"the workers alternate {args.rounds} times, best kept):",
        f"  prefill tok/s  {args.prompt_len} / prefill time. JAX: Generation.prefill_seconds of a Sampler.generate "
        "call (prefill into the KV cache, last-token logits, first greedy token). HF: one forward of the prompt "
        "with use_cache=True, logits_to_keep=1.",
        f"  decode tok/s   {args.new_tokens - 1} steps after the first token / their time. JAX: decode_steps / "
        "decode_seconds. HF: a plain cached loop of N-1 one-token forward calls (its best; generate(), timed "
        "too, adds overhead).",
        f"  b={args.batch}            the same with {args.batch} copies of the prompt, tokens of all rows / time.",
        "  TTFT           time to the first token of the first generate call of a new process, weights loaded: JAX "
        "compiles (1st run, empty persistent compilation cache) or loads its programs (2nd run, the cache the 1st "
        "wrote); HF: generate(max_new_tokens=1), no compile step.",
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
    if jax_result:
        resident = (jax_result["resident_bytes"] + jax_result["kv_bytes"]) / 2**30
        notes.append(
            f"JAX memory: peak RSS {jax_result['peak_rss_gib']:.2f} GiB = "
            f"{jax_result['peak_rss_gib'] / resident:.2f}x its weights as loaded + the KV cache ({resident:.2f} GiB)."
        )
    if jax_result and hf_result:
        notes.append(
            f"Load time: JAX {jax_result['load_seconds']:.0f} s, HF {hf_result['load_seconds']:.0f} s. JAX compile "
            f"(1st run) {jax_result['compile_seconds']:.1f} s; the timed calls' compile_seconds (cache hit) "
            f"{jax_result['timed_call_compile_seconds']:.3f} s."
        )
        loads = {"JAX": jax_result["other_load_cores"], "HF": hf_result["other_load_cores"]}
        busiest = max((v for v in loads.values() if v is not None), default=0.0)
        # A few percent of a core is background noise (kernel threads, page zeroing); a quarter core is a competitor.
        notes.append(
            "CPU used by other processes during the timed calls (worst round): "
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
    jax_rounds, hf_rounds = [], []
    compile_cache = tempfile.mkdtemp(prefix="gemma4-bench-xla-", dir="/tmp")  # empty: round 1 compiles
    try:
        create_result = run_decode_worker("create", args, workdir)
        if create_result is not None:
            for round_ in range(args.rounds):
                log(f"round {round_ + 1} of {args.rounds}")
                jax_rounds.append(run_decode_worker("jax", args, workdir, compile_cache))
                hf_rounds.append(run_decode_worker("hf", args, workdir))
    finally:
        shutil.rmtree(compile_cache, ignore_errors=True)
        if args.keep:
            log(f"kept the checkpoint in {workdir}")
        elif created_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # a directory the user gave us: remove only what this run wrote
            for name in set(os.listdir(workdir)) - preexisting:
                os.remove(os.path.join(workdir, name))
    if create_result is None:
        return 1
    jax_result, hf_result = best_of(jax_rounds), best_of(hf_rounds)

    print(format_table(args, jax_result, hf_result))
    print(format_notes(args, jax_result, hf_result, create_result))
    wall = time.perf_counter() - wall_start
    ours, theirs = rates(jax_result, args.prompt_len, args.batch), rates(hf_result, args.prompt_len, args.batch)
    if ours and theirs:
        summary = (
            f"ours/HF: prefill {ours[0] / theirs[0]:.2f}x ({ours[0]:.1f} vs {theirs[0]:.1f} tok/s), "
            f"decode {ours[1] / theirs[1]:.2f}x ({ours[1]:.2f} vs {theirs[1]:.2f} tok/s)"
        )
        if ours[2] and theirs[2]:
            summary += (
                f", batch {args.batch} decode {ours[2] / theirs[2]:.2f}x ({ours[2]:.2f} vs {theirs[2]:.2f} tok/s)"
            )
    else:
        summary = "a worker failed, no comparison"
    print(f"\nsummary: {args.variant} bf16 {args.device}, {args.threads} thread(s): {summary}; wall time {wall:.0f} s")
    return 0 if ours and theirs else 1


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="e2b", help="model preset (default e2b; 'tiny' for a smoke run)")
    parser.add_argument("--layers", type=int, default=0, help="cut the variant to this many layers (0: all)")
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
    parser.add_argument("--repeat", type=positive, default=3, help="timed calls per worker, best kept (default 3)")
    parser.add_argument(
        "--rounds", type=positive, default=2, help="alternations of the JAX and HF workers, best kept (default 2)"
    )
    parser.add_argument(
        "--batch", type=positive, default=4, help="batch of the batched decode figure (default 4; 1: skip)"
    )
    parser.add_argument("--workdir", help="directory for the checkpoint (default: a new temporary one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (rerun with --workdir to reuse it)")
    # Internal: how the parent starts its workers.
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--compile-cache", default="", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.main(build_parser(), WORKERS, run_benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
