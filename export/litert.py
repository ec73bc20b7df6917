"""`gemma4-jax export litert`: LiteRT models + a .litertlm bundle, straight from the JAX parameters.

Writes to the output directory (built in a temp dir next to it, then renamed):
- `model.tflite`: signatures `prefill` (T = --prefill-len) and `decode` (T = 1); inputs `tokens` [1, T],
  `input_pos` [T], `per_layer_embeddings` [1, T, L, P] (PLE models), `kv_cache_{k,v}_{i}` [1, KVH, S, Dh] for
  every layer that owns K/V; outputs `logits` [1, T, V] and the updated caches under the same names.
- `per_layer_embedder.tflite` (PLE models): signature `per_layer_embedder`, `token_ids` [1, 1] ->
  `embeddings` [1, 1, L, P], the PLE table on its own so the runtime can mmap it (as Google's E2B file does).
- `model.litertlm`: both models, LlmMetadata (gemma4, start/stop tokens, chat template) and the SentencePiece
  tokenizer, when the checkpoint (or --tokenizer) has a `tokenizer.model`.
- `export.json`: what was exported and the measured agreement with JAX.

Before anything is written, the models run a short prefill + decode in the LiteRT interpreter and are
compared with `gemma4_jax.model.apply`; a mismatch fails the export.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time

from gemma4_jax.errors import Gemma4Error

# Max |logit difference| of the built-in check, float compute (float export, or the weight-only twin of a
# quantized export against JAX on the same dequantized weights): converter round-off only (measured ~2e-5).
# Dynamic-range exports also quantize activations at run time; on random tiny models that moves logits by up to
# ~0.9x their range (MoE routing flips), so their bound (DYNAMIC_BOUND x range) only catches broken graphs.
TOLERANCE = 1e-3
DYNAMIC_BOUND = 1.5
_CHECK_DECODE_STEPS = 8
# Side models of PLE configs (signature name -> file name), fed to the main model as `embeddings` and
# `per_layer_embeddings`.
SIDE_MODELS = {"embedder": "embedder.tflite", "per_layer_embedder": "per_layer_embedder.tflite"}


def add_arguments(parser) -> None:
    from gemma4_jax.cli import add_model_args

    add_model_args(parser, "float32")
    parser.add_argument("--quant", choices=("none", "int8", "int4"), default="none", help="weight quantization")
    parser.add_argument(
        "--ple-bits",
        type=int,
        choices=(4, 8),
        default=8,
        help="bits of the per-layer-input projections under --quant int4 (default 8: 4 bits roughly doubles error)",
    )
    parser.add_argument("--prefill-len", type=int, default=128, help="tokens per prefill call (default 128)")
    parser.add_argument("--cache-len", type=int, default=1024, help="KV cache length S (default 1024)")
    parser.add_argument("--tokenizer", help="directory with tokenizer.model (default: the checkpoint directory)")
    parser.add_argument("-o", "--output", required=True, help="output directory (must not exist)")


def _log(msg: str) -> None:
    print(f"[litert] {msg}", file=sys.stderr, flush=True)


def main_signatures(config, weights, prefill_len: int, cache_len: int):
    """The prefill and decode signatures of the main model (see module doc)."""
    import numpy as np
    from gemma4_jax.export import litert_convert, litert_graph

    shapes = litert_graph.cache_shapes(config, cache_len)
    names = list(shapes)
    ple = bool(config.per_layer_input_dim)

    def signature(name: str, t: int):
        # PLE models read `embeddings` from the embedder model instead of `tokens`: the LiteRT-LM runtime fills
        # `per_layer_embeddings` only on its embeddings path (with `tokens` it leaves them unset).
        if ple:
            inputs = [
                ("embeddings", (1, t, config.embed_dim), np.float32),
                ("per_layer_embeddings", (1, t, config.num_layers, config.per_layer_input_dim), np.float32),
            ]
        else:
            inputs = [("tokens", (1, t), np.int32)]
        inputs += [("input_pos", (t,), np.int32)] + [(n, shapes[n], np.float32) for n in names]

        def fn(*args):
            if ple:
                x, rows, input_pos, *caches = args
                return litert_graph.step(
                    config, weights, None, input_pos, rows, dict(zip(names, caches, strict=True)), x
                )
            tokens, input_pos, *caches = args
            return litert_graph.step(config, weights, tokens, input_pos, None, dict(zip(names, caches, strict=True)))

        return litert_convert.Signature(name, fn, inputs, ["logits", *names])

    return [signature("prefill", prefill_len), signature("decode", 1)]


def embedder_signature(config, weights):
    import numpy as np
    from gemma4_jax.export import litert_convert, litert_graph

    def fn(token_ids):
        return {"embeddings": litert_graph.embed(config, weights.embedding, token_ids)}

    return litert_convert.Signature("embedder", fn, [("token_ids", (1, 1), np.int32)], ["embeddings"])


def ple_signature(config, weights):
    import numpy as np
    from gemma4_jax.export import litert_convert, litert_graph

    def fn(token_ids):
        return {"embeddings": litert_graph.per_layer_rows(config, weights.per_layer_table, token_ids)}

    return litert_convert.Signature("per_layer_embedder", fn, [("token_ids", (1, 1), np.int32)], ["embeddings"])


def quantize(model_bytes: bytes, quant: str, ple_bits: int = 8, weight_only: bool = False) -> bytes:
    """Dynamic-range quantization (ai-edge-quantizer): int8 or int4 per-channel weights, float activations
    quantized at run time. The per-layer-input projections (tensor names under `per_layer_input*`) get
    `ple_bits`; embedding lookups stay float (the runtime rejects quantized `embedding_lookup` tables)."""
    if quant == "none":
        return model_bytes
    from ai_edge_quantizer import qtyping, quantizer

    bits = {"int8": 8, "int4": 4}[quant]
    q = quantizer.Quantizer(bytearray(model_bytes))
    # Weights feed FULLY_CONNECTED only (attention's BATCH_MATMULs multiply activations).
    # `weight_only` (tests): the same weights, dequantized to float at run time, so the interpreter must match a
    # JAX forward on the dequantized weights to float round-off.
    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    add = q.add_weight_only_config if weight_only else q.add_dynamic_config
    add(".*", fc, bits)
    if bits != ple_bits:
        add(".*per_layer_input.*", fc, max(bits, ple_bits))
    result = q.quantize(enable_progress_bar=False, enable_progress_report=False)
    return bytes(result.quantized_model)


@functools.lru_cache(maxsize=8)
def _jitted_apply(config):
    import jax

    from gemma4_jax import model

    return jax.jit(lambda p, t, pos, c: model.apply(p, t, pos, c, config=config))


def jax_reference(config, params, prompt, n_decode: int, cache_len: int):
    """Greedy continuation with `model.apply` and a KV cache: (prefill logits [T, V], decode logits
    [n_decode - 1, V] (after each fed token), greedy tokens [n_decode])."""
    import jax.numpy as jnp
    import numpy as np

    from gemma4_jax import model

    cache = model.init_cache(config, 1, cache_len, jnp.float32)
    apply = _jitted_apply(config)
    t = len(prompt)
    logits, cache = apply(params, jnp.asarray([prompt], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None], cache)
    prefill = np.asarray(logits[0])
    token = int(prefill[-1].argmax())
    decode, tokens = [], [token]
    for step in range(n_decode - 1):
        pos = jnp.asarray([[t + step]], jnp.int32)
        logits, cache = apply(params, jnp.asarray([[token]], jnp.int32), pos, cache)
        decode.append(np.asarray(logits[0, 0]))
        token = int(decode[-1].argmax())
        tokens.append(token)
    return prefill, np.stack(decode) if decode else np.zeros((0, config.vocab_size)), tokens


def graph_reference(config, weights, float_embedding, prompt, n_decode: int, cache_len: int):
    """As `jax_reference`, but through `litert_graph.step` in JAX (equal to `model.apply` to float round-off,
    see tests/test_litert.py) so the weights can be the quantized ones; the embedding lookup uses
    `float_embedding` (the exported lookups stay float)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gemma4_jax.export import litert_graph

    caches = {n: jnp.zeros(s, jnp.float32) for n, s in litert_graph.cache_shapes(config, cache_len).items()}

    @jax.jit
    def step(tokens, pos, caches):
        x = litert_graph.embed(config, float_embedding, tokens)
        rows = None
        if config.per_layer_input_dim:
            rows = litert_graph.per_layer_rows(config, weights.per_layer_table, tokens)
        out = litert_graph.step(config, weights, None, pos, rows, caches, x)
        return out.pop("logits")[0], out

    t = len(prompt)
    prefill, caches = step(jnp.asarray([prompt], jnp.int32), jnp.arange(t, dtype=jnp.int32), caches)
    prefill = np.asarray(prefill)
    token = int(prefill[-1].argmax())
    decode, tokens = [], [token]
    for i in range(n_decode - 1):
        logits, caches = step(jnp.asarray([[token]], jnp.int32), jnp.asarray([t + i], jnp.int32), caches)
        decode.append(np.asarray(logits[0]))
        token = int(decode[-1].argmax())
        tokens.append(token)
    return prefill, np.stack(decode) if decode else np.zeros((0, config.vocab_size)), tokens


class LiteRTRunner:
    """Runs the exported models in the ai-edge-litert interpreter (the reference runtime), feeding the main
    model the way the LiteRT-LM runtime does (side models one token at a time, prompt padded with zeros)."""

    def __init__(self, config, model_bytes: bytes, side: dict[str, bytes], prefill_len: int, cache_len: int):
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
        from gemma4_jax.export import litert_graph

        self.config, self.prefill_len = config, prefill_len
        self._interpreters = [Interpreter(model_content=model_bytes)]
        self._prefill = self._interpreters[0].get_signature_runner("prefill")
        self._decode = self._interpreters[0].get_signature_runner("decode")
        self._side = {}
        for name, content in side.items():
            self._interpreters.append(Interpreter(model_content=content))
            self._side[name] = self._interpreters[-1].get_signature_runner(name)
        shapes = litert_graph.cache_shapes(config, cache_len)
        self.caches = {n: np.zeros(s, np.float32) for n, s in shapes.items()}

    def _inputs(self, tokens):
        """The main model's token inputs: `tokens`, or `embeddings` + `per_layer_embeddings` (PLE)."""
        import numpy as np

        if not self._side:
            return {"tokens": np.asarray(tokens, np.int32)[None]}
        out = {}
        for name, input_name in (("embedder", "embeddings"), ("per_layer_embedder", "per_layer_embeddings")):
            rows = [self._side[name](token_ids=np.asarray([[t]], np.int32))["embeddings"] for t in tokens]
            out[input_name] = np.concatenate(rows, axis=1)
        return out

    def prefill(self, prompt, start: int = 0):
        """Logits [len(prompt), V]; the prompt is padded to the prefill length with token 0 at position 0 (as
        the runtime pads): the pads' K/V land past the prompt's end, masked until decode overwrites them."""
        import numpy as np

        t = len(prompt)
        if not 0 < t <= self.prefill_len:
            raise Gemma4Error(f"prefill of {t} tokens: 1..{self.prefill_len} supported")
        tokens = np.zeros(self.prefill_len, np.int32)
        tokens[:t] = prompt
        pos = np.zeros(self.prefill_len, np.int32)
        pos[:t] = np.arange(start, start + t)
        out = self._prefill(input_pos=pos, **self._inputs(tokens), **self.caches)
        self.caches = {n: out[n] for n in self.caches}
        return out["logits"][0, :t]

    def decode(self, token: int, position: int):
        import numpy as np

        out = self._decode(input_pos=np.asarray([position], np.int32), **self._inputs([token]), **self.caches)
        self.caches = {n: out[n] for n in self.caches}
        return out["logits"][0, 0]


def _require(err, tol, got, want, what) -> None:
    if not err <= tol:
        raise Gemma4Error(
            f"the exported model disagrees with {what}: max |logit diff| {err:.4g} > {tol:.4g}; nothing written"
        )
    if got != want:
        raise Gemma4Error(f"greedy tokens differ from {what}: {got} vs {want}; nothing written")


def compare(config, model_bytes, side, prefill_len, cache_len, prompt, reference):
    """Prefills `prompt` and decodes in the interpreter, fed the reference's greedy tokens.

    `reference` is (prefill logits, decode logits, greedy tokens) from `jax_reference`/`graph_reference`.
    Returns (max |logit diff| over prefill and decode, max |reference logit|, LiteRT greedy tokens (argmax of
    its own logits at each step)).
    """
    import numpy as np

    ref_prefill, ref_decode, ref_tokens = reference
    runner = LiteRTRunner(config, model_bytes, side, prefill_len, cache_len)
    got_prefill = runner.prefill(prompt)
    got_decode, got_tokens = [], [int(got_prefill[-1].argmax())]
    for step, token in enumerate(ref_tokens[:-1]):
        got_decode.append(runner.decode(token, len(prompt) + step))
        got_tokens.append(int(got_decode[-1].argmax()))
    err = float(np.max(np.abs(got_prefill - ref_prefill)))
    if got_decode:
        err = max(err, float(np.max(np.abs(np.stack(got_decode) - ref_decode))))
    scale = float(max(np.max(np.abs(ref_prefill)), np.max(np.abs(ref_decode)) if len(ref_decode) else 0.0))
    return err, scale, got_tokens


def write_bundle(path, config, model_dir, side_names, tokenizer_dir, cache_len) -> None:
    """The .litertlm: LlmMetadata, SentencePiece tokenizer, prefill/decode model, embedder + per-layer
    embedder (PLE models), read from `model_dir`."""
    from litert_lm_builder import litertlm_builder as builder
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    from gemma4_jax.sampler import DEFAULT_STOP_TOKENS
    from gemma4_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    meta = llm_metadata_pb2.LlmMetadata()
    meta.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(gemma4=llm_model_type_pb2.Gemma4()))
    meta.start_token.token_ids.ids.append(config.bos_id)
    for stop in dict.fromkeys((config.eos_id, *DEFAULT_STOP_TOKENS)):
        meta.stop_tokens.add().token_ids.ids.append(stop)
    meta.max_num_tokens = cache_len
    if tokenizer.chat_template:
        meta.jinja_prompt_template = tokenizer.chat_template
    work = os.path.dirname(path)
    meta_path = os.path.join(work, ".llm_metadata.pb")
    with open(meta_path, "wb") as f:
        f.write(meta.SerializeToString())
    b = builder.LitertLmFileBuilder()
    b.add_llm_metadata(meta_path)
    b.add_sentencepiece_tokenizer(os.path.join(tokenizer_dir, "tokenizer.model"))
    b.add_tflite_model(os.path.join(model_dir, "model.tflite"), builder.TfLiteModelType.PREFILL_DECODE)
    kinds = {
        "embedder": builder.TfLiteModelType.EMBEDDER,
        "per_layer_embedder": builder.TfLiteModelType.PER_LAYER_EMBEDDER,
    }
    for name in side_names:
        b.add_tflite_model(os.path.join(model_dir, SIDE_MODELS[name]), kinds[name])
    with open(path, "wb") as f:
        b.build(f)
    os.remove(meta_path)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    import gc

    import numpy as np
    from gemma4_jax.export import litert_convert, litert_graph

    from gemma4_jax.cli import load_model

    start = time.time()
    out_dir = os.path.abspath(args.output)
    if os.path.exists(out_dir):
        raise Gemma4Error(f"{args.output} already exists; choose a new output directory")
    if args.prefill_len < 1 or args.cache_len < 2:
        raise Gemma4Error("--prefill-len must be >= 1 and --cache-len >= 2")
    if args.prefill_len > args.cache_len:
        raise Gemma4Error(f"--prefill-len {args.prefill_len} exceeds --cache-len {args.cache_len}")
    if args.dtype not in (None, "float32", "f32"):
        raise Gemma4Error("LiteRT export computes in float32 (--dtype float32); quantize with --quant")
    tokenizer_dir = args.tokenizer or args.checkpoint
    if tokenizer_dir and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.model")):
        if args.tokenizer:
            raise Gemma4Error(f"no tokenizer.model in {args.tokenizer}")
        tokenizer_dir = None

    cfg, params, source = load_model(args, "float32")
    _log(f"{cfg.name}: {source}, quant {args.quant}, prefill {args.prefill_len}, cache {args.cache_len}")
    weights = litert_graph.graph_weights(cfg, params)

    side = {}  # converted one at a time, so the converter holds one model's constants at once
    if cfg.per_layer_input_dim:
        for signature in (embedder_signature(cfg, weights), ple_signature(cfg, weights)):
            t0 = time.time()
            side[signature.name] = litert_convert.convert([signature])
            _log(f"{signature.name} converted: {len(side[signature.name]) / 2**20:.1f} MiB in {time.time() - t0:.0f} s")
            gc.collect()
    t0 = time.time()
    float_bytes = litert_convert.convert(main_signatures(cfg, weights, args.prefill_len, args.cache_len))
    _log(f"prefill/decode model converted: {len(float_bytes) / 2**20:.1f} MiB in {time.time() - t0:.0f} s")
    gc.collect()

    prompt_len = min(args.prefill_len, 12)
    prompt = [cfg.bos_id, *np.random.default_rng(0).integers(3, cfg.vocab_size, prompt_len - 1).tolist()]
    n_decode = min(_CHECK_DECODE_STEPS, args.cache_len - prompt_len)
    check = {"prompt_tokens": prompt_len, "decode_steps": n_decode}
    if args.quant == "none":
        model_bytes = float_bytes
        reference = jax_reference(cfg, params, prompt, n_decode, args.cache_len)
        err, scale, got = compare(cfg, model_bytes, side, args.prefill_len, args.cache_len, prompt, reference)
        tol = TOLERANCE
        _log(f"check vs model.apply: max |dlogit| {err:.3g} (tolerance {tol:.3g}), greedy equal {got == reference[2]}")
        _require(err, tol, got, reference[2], "model.apply")
        check |= {"max_abs_logit_diff": err, "tolerance": tol, "jax_greedy": reference[2], "litert_greedy": got}
    else:
        bits = {"int8": 8, "int4": 4}[args.quant]
        ple_bits = 8 if args.quant == "int8" else args.ple_bits
        t0 = time.time()
        model_bytes = quantize(float_bytes, args.quant, ple_bits)
        _log(
            f"quantized ({args.quant}, per-layer inputs {ple_bits}-bit): {len(float_bytes) / 2**20:.1f} -> "
            f"{len(model_bytes) / 2**20:.1f} MiB in {time.time() - t0:.0f} s"
        )
        quantized = litert_graph.quantized_like(weights, bits, ple_bits)
        reference = graph_reference(cfg, quantized, weights.embedding, prompt, n_decode, args.cache_len)
        del quantized
        # The weights: a weight-only twin (same quantized weights, float compute) must match the JAX forward on
        # the dequantized weights to round-off.
        twin = quantize(float_bytes, args.quant, ple_bits, weight_only=True)
        err, scale, got = compare(cfg, twin, side, args.prefill_len, args.cache_len, prompt, reference)
        del twin
        tol = TOLERANCE
        _log(f"weights check (weight-only twin vs JAX on dequantized weights): max |dlogit| {err:.3g} (tol {tol:.3g})")
        _require(err, tol, got, reference[2], "JAX on the dequantized weights")
        check |= {"weights_max_abs_logit_diff": err, "weights_tolerance": tol}
        # The exported model also quantizes activations at run time: its distance is reported, and bounded only
        # against gross breakage (a mis-converted graph is off by several times the logit scale).
        err, scale, got = compare(cfg, model_bytes, side, args.prefill_len, args.cache_len, prompt, reference)
        bound = DYNAMIC_BOUND * scale
        _log(
            f"dynamic-range model vs JAX on dequantized weights: max |dlogit| {err:.3g} "
            f"({err / max(scale, 1e-30):.2f} of the logit range), greedy agreement "
            f"{sum(a == b for a, b in zip(got, reference[2], strict=True))}/{len(got)}"
        )
        if not err <= bound:
            raise Gemma4Error(f"the quantized model is off by {err:.4g} > {bound:.4g} in logits; nothing written")
        check |= {"dynamic_max_abs_logit_diff": err, "logit_scale": scale, "jax_greedy": reference[2]}
        check |= {"litert_greedy": got}
    del weights, float_bytes
    gc.collect()

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-litert-")
    try:
        model_path = os.path.join(tmp, "model.tflite")
        with open(model_path, "wb") as f:
            f.write(model_bytes)
        files = ["model.tflite"]
        for name, content in side.items():
            with open(os.path.join(tmp, SIDE_MODELS[name]), "wb") as f:
                f.write(content)
            files.append(SIDE_MODELS[name])
        if tokenizer_dir:
            write_bundle(os.path.join(tmp, "model.litertlm"), cfg, tmp, list(side), tokenizer_dir, args.cache_len)
            files.append("model.litertlm")
        else:
            _log("no tokenizer.model (pass --tokenizer DIR): .litertlm bundle skipped")
        summary = {
            "variant": cfg.name,
            "source": source,
            "quant": args.quant,
            "ple_bits": args.ple_bits if args.quant == "int4" else (8 if args.quant == "int8" else 32),
            "prefill_len": args.prefill_len,
            "cache_len": args.cache_len,
            "files": {name: os.path.getsize(os.path.join(tmp, name)) for name in files},
            "check": check,
            "seconds": round(time.time() - start, 1),
            "peak_rss_mb": round(_peak_rss_mb()),
        }
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(summary, f, indent=2)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(summary["files"].values())
    print(
        f"wrote {args.output}: {', '.join(files)} ({total / 2**20:.1f} MiB), {cfg.name} {args.quant}, "
        f"max |dlogit| vs JAX {err:.2g}, {time.time() - start:.0f} s, peak RSS {summary['peak_rss_mb']} MiB"
    )
    return 0
