"""Full-size E2B on CPU: the decode layout (`gemma4_jax/matvec.py`) against the checkpoint layout on the same
float32 weights. Each layout's worker loads the checkpoint as float32 (`api.load(..., layout=...)`), greedily
continues the benchmark prompt for `--new-tokens` tokens (no stop tokens) and takes the full-forward logits of
prompt + continuation; the parent checks that the continuations are identical and the logits agree within the
float32 bound below, and prints both layouts' decode speed.

    python bench/layouts.py --checkpoint /tmp/mb/qwork/checkpoint   # an HF bf16 checkpoint (bench/quant.py's)
    python bench/layouts.py                     # random E2B weights written to --workdir first (~10 GiB)
    python bench/layouts.py --variant tiny_keqv --new-tokens 16     # smoke run

Float32 E2B holds ~11 GiB of text-decoder weights (the PLE table stays memory-mapped: `ple="mmap"`); one worker
runs at a time. Bound: the two layouts sum each contraction in another order (column chunks of 2048), a float32
round-off difference, which random weights amplify along the sequence (attention over random keys is close to
ties). The checkpoint-layout worker measures that amplification itself: its logits again with the token embedding
scaled by 1 + 2^-22 (two float32 ulps; measured on E2B: 1e-5 of max|logit| at the first positions, up to 2e-2 at
position 70). The layouts must agree within twice that change, and the greedy tokens must be identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, limit_cpus, log, main, make_prompt, run_worker

PERTURBATION = 1 + 2**-22  # the token embedding's scale for the round-off sensitivity (two float32 ulps)


def worker_create(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    limit_cpus(args.threads)
    import jax.numpy as jnp

    from gemma4_jax import config, hf_format, model

    cfg = config.get_config(args.variant)
    log(f"creating random {cfg.name} weights (bfloat16) in {args.checkpoint}")
    hf_format.save_hf_checkpoint(args.checkpoint, cfg, model.init_params(cfg, 0, jnp.bfloat16))
    emit({"config": cfg.name})


def worker_run(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    limit_cpus(args.threads)
    import numpy as np

    from gemma4_jax import api, sources

    start = time.perf_counter()
    source = sources.open_source(args.checkpoint, text_only=True)
    ple = "mmap" if source.config.per_layer_input_dim else "device"  # the PLE table stays on disk where there is one
    m = api.load(source, dtype="float32", ple=ple, layout=args.layout, progress=False)
    load_seconds = time.perf_counter() - start
    prompt = make_prompt(m.config.vocab_size, args.prompt_len)
    sampler = m.sampler(stop_tokens=())
    log(f"{args.layout} layout: compiling and generating {args.new_tokens} tokens")
    warm = sampler.generate([prompt], args.new_tokens)
    timed = sampler.generate([prompt], args.new_tokens)
    tokens = timed.tokens[0]
    if tokens != warm.tokens[0]:
        raise SystemExit(f"{args.layout} layout: two greedy runs of the same prompt differ")
    logits = m.logits(prompt + tokens)
    np.save(os.path.join(args.workdir, f"logits-{args.layout}.npy"), logits)
    if args.layout == "checkpoint":  # the same forward, two ulps off: how far float32 round-off alone moves it
        import jax.numpy as jnp

        embedder = m.params["embedder"]
        embedder["input_embedding"] = embedder["input_embedding"] * jnp.float32(PERTURBATION)
        np.save(os.path.join(args.workdir, "logits-perturbed.npy"), m.logits(prompt + tokens))
    emit(
        {
            "layout": args.layout,
            "tokens": tokens,
            "load_s": load_seconds,
            "decode_tok_s": (args.new_tokens - 1) / timed.decode_seconds,
            "prefill_tok_s": args.prompt_len / timed.prefill_seconds,
        }
    )


def run_benchmark(args) -> int:
    import numpy as np

    workdir = args.workdir or tempfile.mkdtemp(prefix="gemma4-layouts-")
    os.makedirs(workdir, exist_ok=True)
    options = {"variant": args.variant, "threads": args.threads, "prompt_len": args.prompt_len}
    checkpoint = args.checkpoint or os.path.join(workdir, "checkpoint")
    try:
        if not os.path.exists(os.path.join(checkpoint, "config.json")):
            if run_worker(__file__, "create", {**options, "checkpoint": checkpoint}) is None:
                return 1
        results = {}
        for layout in ("checkpoint", "decode"):
            opts = {**options, "new_tokens": args.new_tokens, "checkpoint": checkpoint, "workdir": workdir}
            result = run_worker(__file__, "run", {**opts, "layout": layout})
            if result is None:
                return 1
            results[layout] = result
        names = ("checkpoint", "decode", "perturbed")
        plain, fast, perturbed = (np.load(os.path.join(workdir, f"logits-{name}.npy")) for name in names)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    scale = float(np.abs(plain).max())
    diff = float(np.abs(fast - plain).max())
    sensitivity = float(np.abs(perturbed - plain).max())
    same = results["checkpoint"]["tokens"] == results["decode"]["tokens"]
    plain_tokens, fast_tokens = (r["tokens"] for r in results.values())
    first = next((i for i, (a, b) in enumerate(zip(plain_tokens, fast_tokens, strict=True)) if a != b), None)
    print(f"\n{args.variant}, float32 weights, prompt {args.prompt_len} tokens, {args.new_tokens} greedy tokens, CPU\n")
    print(f"{'layout':<11} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS GiB':>13}")
    for layout, r in results.items():
        row = f"{r['load_s']:7.1f} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.2f} {r['peak_rss_gib']:13.2f}"
        print(f"{layout:<11} {row}")
    print(f"\ngreedy continuations: {'identical' if same else f'differ from token {first}'}")
    print(f"logits over {plain.shape[0]} positions: max |diff| {diff:.3g} at max |logit| {scale:.3g}; the checkpoint")
    print(f"layout's own change for the token embedding x (1 + 2^-22): {sensitivity:.3g} (bound: twice that)")
    ok = same and diff <= 2 * sensitivity
    verdict = "PASS" if ok else "FAIL"
    print(
        f"summary: {args.variant} decode vs checkpoint layout (f32): {verdict}, tokens {'equal' if same else 'differ'}"
        f", logits {diff / scale:.2g} x max (two ulps of the embedding: {sensitivity / scale:.2g})"
    )
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="e2b")
    p.add_argument("--checkpoint", help="an HF checkpoint directory (default: random weights written to --workdir)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--workdir", help="where the logits (and a created checkpoint) go; kept (default: a temp dir)")
    p.add_argument("--layout", choices=("checkpoint", "decode"), help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("create", "run"), help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    sys.exit(main(parser(), {"create": worker_create, "run": worker_run}, run_benchmark))
