"""Quantized E2B: GGUF export cost, and batch-1 decode of our JAX model next to llama.cpp, same random weights.

    python bench/quant.py                         # Gemma 4 E2B (35 layers), CPU, 64-token prompt, 16 new tokens
    python bench/quant.py --layers 10             # E2B with 10 layers (PLE table and all widths unchanged)
    python bench/quant.py --variant tiny_keqv --prompt-len 16 --new-tokens 8   # smoke run (a minute)

One run prints one table. As in bench/decode.py the parent never holds weights; it runs one subprocess per
step, so each row's peak RSS is that step's own:

1. `vocab`: the real Gemma 4 vocabulary (262 144 tokens, merges, chat template) from the GGUF vocab file that
   ships in the llama-cpp-python sdist, written as a `tokenizer.json` (random weights have no tokenizer).
2. `create`: random bf16 weights (`init_params`) saved as an HF checkpoint (`save_hf_checkpoint`).
3. `export` x3: `gemma4-jax export gguf --quant f16 | q8_0 | q4_0` of that checkpoint (time, peak RSS, size).
4. `bandwidth`, then for each pair (bf16 ~ f16, int8 ~ q8_0, int4 ~ q4_0) `jax` and `llama` back to back, all of it
   `--rounds` times (default 2); each worker times `--repeat` calls (default 3); the table keeps the best of all.
   `bandwidth`: torch summing 1 GiB of float32 on the same threads, the machine's read bandwidth.
   `jax`: `api.load` as a user does (bf16: the CPU decode layout), for int8 / int4 then `quant.quantize_params(...,
   JaxPolicy(format))` and `matvec.decode_layout` (what loading a quantized checkpoint gives); one
   `Sampler.generate` to compile, then the timed calls.
   `llama`: llama-cpp-python on each GGUF file; per call a 2-token warm-up, then a timed greedy run of llama.cpp's
   own decode loop (one llama_decode per token; argmax in numpy), not `Llama.generate` and its Python sampling.

Each worker prints one `BENCH_RESULT {json}` line on stdout; progress goes to stderr. Needs llama-cpp-python
(scripts/test.sh installs it) and, for full E2B, ~16 GiB of free RAM and ~35 GiB of disk in the work directory.
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
import common
from common import OtherLoad, bench_config, emit, limit_cpus, log, make_prompt, run_worker

GGUF_QUANTS = ("f16", "q8_0", "q4_0")
JAX_FORMATS = ("bf16", "int8", "int4")
SDIST = os.path.join(os.path.dirname(__file__), "..", ".cache", "sdist", "llama_cpp_python-0.3.36.tar.gz")
VOCAB_MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf"


# ----- workers ----------------------------------------------------------------------------------------------


def worker_vocab(args) -> None:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from llama.cpp's Gemma 4 vocab file."""
    import tarfile

    import gguf

    if os.path.exists(os.path.join(args.checkpoint, "tokenizer.json")):
        log(f"reusing the tokenizer files in {args.checkpoint}")
        emit({"reused": True})
        return
    sdist = args.sdist
    if not os.path.isfile(sdist):
        raise SystemExit(f"{sdist} is missing: run scripts/test.sh or pass --sdist")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            member = tar.getmember(VOCAB_MEMBER)
            member.name = "vocab.gguf"
            tar.extract(member, tmp, filter="data")
        reader = gguf.GGUFReader(os.path.join(tmp, "vocab.gguf"))
        fields = {k: f.contents() for k, f in reader.fields.items()}
    tokens, types, merges = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    n_vocab = bench_config(args.variant, args.layers).vocab_size
    if n_vocab < len(tokens):  # smoke runs on toy presets: the first ids (specials, bytes) and their merges
        tokens, types = tokens[:n_vocab], types[:n_vocab]
        known = set(tokens)
        merges = [m for m in merges if m.replace(" ", "", 1) in known and all(p in known for p in m.split(" ", 1))]
    normal = {int(gguf.TokenType.NORMAL), int(gguf.TokenType.BYTE)}
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False}
            for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind not in normal
        ],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "byte_fallback": True,
            "unk_token": "<unk>",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    os.makedirs(args.checkpoint, exist_ok=True)
    with open(os.path.join(args.checkpoint, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    with open(os.path.join(args.checkpoint, "tokenizer_config.json"), "w") as f:
        json.dump(special | {"mask_token": "<mask>"}, f)
    with open(os.path.join(args.checkpoint, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(fields["tokenizer.chat_template"])
    emit({"tokens": len(tokens), "merges": len(merges)})


def worker_create(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    limit_cpus(args.threads)
    import jax.numpy as jnp

    from gemma4_jax import hf_format, model
    from gemma4_jax.config import Gemma4Config

    cfg = bench_config(args.variant, args.layers)
    n_params = model.count_params(model.param_shapes(cfg))
    existing = os.path.join(args.checkpoint, "config.json")
    if os.path.exists(existing) and Gemma4Config.load_json(existing).replace(name=cfg.name) == cfg:
        log(f"reusing the {cfg.name} checkpoint in {args.checkpoint}")
        emit({"seconds": 0.0, "params": n_params, "config": cfg.name, "reused": True})
        return
    log(f"creating random {cfg.name} weights: {n_params / 1e9:.2f} B parameters")
    start = time.perf_counter()
    params = model.init_params(cfg, 0, jnp.bfloat16)
    # The checkpoint directory already holds the vocab worker's tokenizer files, and the writer only writes new
    # directories: save beside it, move the tokenizer in, swap.
    saving = args.checkpoint + ".saving"
    shutil.rmtree(saving, ignore_errors=True)
    hf_format.save_hf_checkpoint(saving, cfg, params)
    if os.path.isdir(args.checkpoint):
        for name in os.listdir(args.checkpoint):
            shutil.move(os.path.join(args.checkpoint, name), os.path.join(saving, name))
        os.rmdir(args.checkpoint)
    os.rename(saving, args.checkpoint)
    emit({"seconds": time.perf_counter() - start, "params": n_params, "config": cfg.name})


def worker_export(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    limit_cpus(args.threads)
    from gemma4_jax.export.gguf import export_gguf
    from gemma4_jax.sources import open_source

    out = os.path.join(args.workdir, f"model-{args.quant}.gguf")
    log(f"export: GGUF {args.quant} -> {out}")
    start = time.perf_counter()
    log(export_gguf(open_source(args.checkpoint), out, quant=args.quant))
    emit({"seconds": time.perf_counter() - start, "bytes": os.path.getsize(out), "path": out})


def worker_jax(args) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    limit_cpus(args.threads)
    import jax
    import jax.numpy as jnp

    from gemma4_jax import api, matvec, quant
    from gemma4_jax.sampler import Sampler, SamplingConfig

    log(f"JAX {args.format}: loading {args.checkpoint}")
    # As a user loads it: bf16 in the CPU decode layout; the quantized rows quantize the official layout in memory
    # (what `gemma4-jax quantize` writes) and then take the decode layout, as loading that checkpoint does.
    layout = "auto" if args.format == "bf16" else "checkpoint"
    model = api.load(args.checkpoint, dtype=jnp.bfloat16, layout=layout, progress=False, text_only=True)
    cfg, params = model.config, model.params
    jax.block_until_ready(params)
    quantize_seconds = 0.0
    if args.format != "bf16":
        start = time.perf_counter()
        params = quant.quantize_params(params, cfg, quant.JaxPolicy(args.format))
        if matvec.wanted(jnp.bfloat16):
            params = matvec.decode_layout(params, cfg)
        jax.block_until_ready(params)
        quantize_seconds = time.perf_counter() - start
        log(f"JAX {args.format}: quantized in {quantize_seconds:.0f} s")
    table = params["embedder"].get("per_layer_embeddings")  # gathered a few rows per token, not read whole
    prompt = make_prompt(cfg.vocab_size, args.prompt_len)
    sampler = Sampler(cfg, params, SamplingConfig(temperature=0.0), stop_tokens=(), cache_dtype=jnp.bfloat16)
    warm = sampler.generate([prompt], args.new_tokens)
    log(f"JAX {args.format}: compiled in {warm.compile_seconds:.0f} s; {args.repeat} timed runs")
    other = OtherLoad()
    runs = []
    for _ in range(args.repeat):
        with other.measure():
            runs.append(sampler.generate([prompt], args.new_tokens))
    emit(
        {
            "prepare_seconds": quantize_seconds,
            "weight_bytes": quant.weight_bytes(params),
            "read_bytes": quant.weight_bytes(params) - (quant.weight_bytes(table) if table is not None else 0),
            "prefill_seconds": min(r.prefill_seconds for r in runs),
            "decode_seconds": min(r.decode_seconds for r in runs),
            "decode_steps": runs[0].decode_steps,
            "compile_seconds": warm.compile_seconds,
            "other_load_cores": other.cores,
            "tokens": runs[0].tokens[0],
        }
    )


def worker_llama(args) -> None:
    limit_cpus(args.threads)
    import gguf
    import llama_cpp

    from gemma4_jax.export.runtimes import llama_decode  # warms up (2 tokens), then the timed greedy run

    path = os.path.join(args.workdir, f"model-{args.quant}.gguf")
    log(f"llama.cpp {args.quant}: loading {path}")
    reader = gguf.GGUFReader(path)
    read_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "per_layer_token_embd.weight")
    del reader
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=args.prompt_len + args.new_tokens + 16,
        n_batch=args.prompt_len,
        n_ubatch=args.prompt_len,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    prompt = make_prompt(llm.n_vocab(), args.prompt_len)
    log(f"llama.cpp {args.quant}: {args.repeat} timed runs")
    other = OtherLoad()
    runs = []
    for _ in range(args.repeat):
        with other.measure():
            runs.append(llama_decode(path, prompt, args.new_tokens, llm=llm))
    tokens = runs[0][0]
    emit(
        {
            # The first token's wait is the prompt's prefill (+ its argmax); every later token is one decode.
            "prefill_seconds": min(stamps[1] - stamps[0] for _, stamps in runs),
            "decode_seconds": min(stamps[-1] - stamps[1] for _, stamps in runs),
            "decode_steps": len(tokens) - 1,
            "read_bytes": read_bytes,
            "other_load_cores": other.cores,
            "tokens": tokens,
        }
    )


def worker_bandwidth(args) -> None:
    """The machine's read bandwidth: torch summing 1 GiB of float32 on `--threads` threads, best of 5."""
    limit_cpus(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    x = torch.ones(1 << 28, dtype=torch.float32)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    emit({"read_gbps": x.numel() * 4 / best / 1e9})


WORKERS = {
    "vocab": worker_vocab,
    "create": worker_create,
    "export": worker_export,
    "jax": worker_jax,
    "llama": worker_llama,
    "bandwidth": worker_bandwidth,
}


# ----- parent -----------------------------------------------------------------------------------------------


def run_quant_worker(kind: str, args, **extra) -> dict | None:
    options = {"variant": args.variant, "layers": args.layers, "prompt_len": args.prompt_len, "repeat": args.repeat}
    options |= {"new_tokens": args.new_tokens, "threads": args.threads, "checkpoint": args.checkpoint}
    log(f"worker {kind} {extra or ''}")
    return run_worker(__file__, kind, options | {"workdir": args.workdir, "sdist": args.sdist, **extra})


def best_of(rounds: list[dict | None]) -> dict | None:
    """One row's rounds merged: the shortest prefill and decode times, the largest peak RSS and other load."""
    done = [r for r in rounds if r is not None]
    if not done or len(done) < len(rounds):
        return None
    merged = dict(done[0])
    for key in ("prefill_seconds", "decode_seconds"):
        merged[key] = min(r[key] for r in done)
    merged["peak_rss_gib"] = max(r["peak_rss_gib"] for r in done)
    cores = [r["other_load_cores"] for r in done if r["other_load_cores"] is not None]
    merged["other_load_cores"] = max(cores) if cores else None
    return merged


def _rates(result, prompt_len):
    """(prefill tok/s, decode tok/s, GB/s of weight bytes read per decode token), or None."""
    if not result:
        return None
    decode = result["decode_steps"] / result["decode_seconds"] if result["decode_steps"] else float("nan")
    return prompt_len / result["prefill_seconds"], decode, decode * result["read_bytes"] / 1e9


PAIRS = tuple(zip(JAX_FORMATS, GGUF_QUANTS, strict=True))  # bf16 ~ f16, int8 ~ q8_0, int4 ~ q4_0


def format_table(args, cfg_name, exports, jax_rows, llama_rows, bandwidth) -> str:
    header = (
        "weights",
        "runtime",
        "weight GiB",
        "read/token GB",
        "prepare s",
        "prefill tok/s",
        "decode tok/s",
        "GB/s read",
        "% of bandwidth",
        "RSS GiB",
        "decode vs llama.cpp",
    )
    rows = []
    for fmt, q in PAIRS:
        ours, theirs = _rates(jax_rows.get(fmt), args.prompt_len), _rates(llama_rows.get(q), args.prompt_len)
        for name, kind, result, rate in (("gemma4-jax", fmt, jax_rows.get(fmt), ours),
                                         ("llama.cpp", q, llama_rows.get(q), theirs)):  # fmt: skip
            if rate is None:
                rows.append((kind, name, *["failed"] * (len(header) - 2)))
                continue
            if name == "gemma4-jax":
                size, prepare = result["weight_bytes"], "-" if fmt == "bf16" else f"{result['prepare_seconds']:.0f}"
                ratio = f"{ours[1] / theirs[1]:.2f}x" if theirs else "-"
            else:
                e = exports.get(q)
                size, prepare, ratio = e["bytes"], f"{e['seconds']:.0f}", ""
            share = f"{100 * rate[2] / bandwidth:.0f}%" if bandwidth else "-"
            rows.append(
                (kind, name, f"{size / 2**30:.2f}", f"{result['read_bytes'] / 1e9:.2f}", prepare, f"{rate[0]:.1f}",
                 f"{rate[1]:.2f}", f"{rate[2]:.1f}", share, f"{result['peak_rss_gib']:.2f}", ratio)
            )  # fmt: skip
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    title = (
        f"Gemma 4 {cfg_name}, random weights, batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new "
        f"tokens (greedy), CPU, {args.threads} thread(s); best of {args.repeat} calls x {args.rounds} alternating "
        f"rounds; machine read bandwidth {bandwidth or float('nan'):.1f} GB/s"
    )
    return "\n".join([title, "", line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run_benchmark(args) -> int:
    wall = time.perf_counter()
    created = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gemma4-quant-bench-", dir="/tmp")
    os.makedirs(args.workdir, exist_ok=True)
    args.checkpoint = os.path.join(args.workdir, "checkpoint")
    log(f"work directory: {args.workdir}")
    exports, jax_rounds, llama_rounds, bandwidths = {}, {}, {}, []
    try:
        vocab = run_quant_worker("vocab", args)
        create = run_quant_worker("create", args) if vocab else None
        if create:
            for q in GGUF_QUANTS:
                exports[q] = run_quant_worker("export", args, quant=q)
            for round_ in range(args.rounds):  # each pair back to back, the two runtimes alternating
                log(f"round {round_ + 1} of {args.rounds}")
                bandwidths.append(run_quant_worker("bandwidth", args))
                for fmt, q in PAIRS:
                    jax_rounds.setdefault(fmt, []).append(run_quant_worker("jax", args, format=fmt))
                    if exports[q]:
                        llama_rounds.setdefault(q, []).append(run_quant_worker("llama", args, quant=q))
    finally:
        if not args.keep and created:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if not create:
        return 1
    jax_rows = {k: best_of(v) for k, v in jax_rounds.items()}
    llama_rows = {k: best_of(v) for k, v in llama_rounds.items()}
    measured = [b["read_gbps"] for b in bandwidths if b]
    bandwidth = max(measured) if measured else None
    print(format_table(args, create["config"], exports, jax_rows, llama_rows, bandwidth))
    notes = [
        "",
        f"Weights: {create['params'] / 1e9:.2f} B parameters, created + saved (bf16) in {create['seconds']:.0f} s.",
        "weight GiB: JAX: bytes of the parameter tree (packed codes + scales for quantized leaves); llama.cpp: file "
        "size. read/token: those bytes but the PLE table (a few rows gathered per token), what one decode step "
        "reads. GB/s read: read/token x decode tok/s. % of bandwidth: of the machine's read bandwidth, torch "
        "summing 1 GiB of float32 on the same threads, best of each round's measurement.",
        "prepare: GGUF export of the bf16 checkpoint (llama.cpp rows) or quantize_params + the CPU decode layout on "
        "the loaded bf16 tree (JAX rows).",
        "JAX int8 / int4: quant.JaxPolicy defaults (norms, router in float; int4 keeps the PLE projections, token "
        "embedding and PLE table at 8 bits). llama.cpp q4_0: Q4_0 matrices, Q8_0 embedding tables, f16 "
        "per_layer_model_proj (see gemma4_jax/export/gguf.py).",
        "prefill tok/s: prompt / time to the first token. decode tok/s: (N-1) tokens after the first / their time. "
        "llama.cpp: its own decode loop (llama_decode per token, argmax in numpy). RSS: ru_maxrss of the worker "
        "(llama.cpp maps the file: touched pages count).",
    ]
    loads = {f"jax {k}": v.get("other_load_cores") for k, v in jax_rows.items() if v}
    loads |= {f"llama {k}": v.get("other_load_cores") for k, v in llama_rows.items() if v}
    busy = {k: v for k, v in loads.items() if v is not None and v > 0.25}
    notes.append(
        "Other processes during the timed calls: "
        + (
            ", ".join(f"{k} {v:.2f} cores" for k, v in busy.items()) + " -- rerun on a quiet machine."
            if busy
            else "quiet."
        )
    )
    print("\n".join(notes))
    ratios = []
    for fmt, q in PAIRS:
        ours, theirs = _rates(jax_rows.get(fmt), args.prompt_len), _rates(llama_rows.get(q), args.prompt_len)
        ratios.append(f"{fmt} {ours[1] / theirs[1]:.2f}x {q}" if ours and theirs else f"{fmt} failed")
    wall = time.perf_counter() - wall
    print(f"\nsummary: {create['config']} decode vs llama.cpp: {', '.join(ratios)}; wall time {wall:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="e2b")
    parser.add_argument("--layers", type=int, default=0, help="cut the variant to this many layers (0: all)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per worker, best kept (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the workers, best kept (default 2)")
    parser.add_argument("--workdir", help="where checkpoint and GGUF files go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--sdist", default=SDIST, help="llama-cpp-python 0.3.36 sdist (holds the Gemma 4 vocab)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--quant", choices=GGUF_QUANTS, help=argparse.SUPPRESS)
    parser.add_argument("--format", choices=JAX_FORMATS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.main(build_parser(), WORKERS, run_benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
