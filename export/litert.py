"""`gemma4-jax export litert`: LiteRT models + a .litertlm bundle, straight from the JAX parameters.

Writes to the output directory (built in a temp dir next to it, then renamed):
- `model.tflite`: signatures `prefill` (T = --prefill-len) and `decode` (T = 1); inputs `tokens` [1, T],
  `input_pos` [T], `per_layer_embeddings` [1, T, L, P] (PLE models), `kv_cache_{k,v}_{i}` [1, KVH, S, Dh] for
  every layer that owns K/V; outputs `logits` [1, T, V] and the updated caches under the same names. With
  the vision tower of a model whose images attend bidirectionally (31B, 26B-A4B) also the engine's masks
  `attn_mask` / `local_mask` [1, 1, T, S] bool (`litert_graph.MASK_INPUTS`), which the bundle's
  ExecutorMetadata asks the engine to fill (`executor_metadata`).
- `per_layer_embedder.tflite` (PLE models): signature `per_layer_embedder`, `token_ids` [1, 1] ->
  `embeddings` [1, 1, L, P], the PLE table on its own so the runtime can mmap it (as Google's E2B file does).
- `embedder.tflite` (PLE models, and any export with towers): signature `embedder`, `token_ids` [1, 1] ->
  `embeddings` [1, 1, D] (scaled). The main model then takes `embeddings` instead of `tokens`: the LiteRT-LM
  engine puts soft tokens into the prompt only on that path (with a `tokens` model it silently drops images).
- the vision/audio tower models (`--modalities`, default: the towers the checkpoint has), see
  `litert_towers`.
- `model.litertlm`: all models in the section order of Google's Gemma 4 E2B bundle, LlmMetadata (gemma4 with
  the image/audio marker tokens, patch size, patch budget and pooling kernel; start/stop tokens; a chat
  template that renders image/audio parts as `<|image|>`/`<|audio|>`) and the SentencePiece tokenizer, when the
  checkpoint (or --tokenizer) has a `tokenizer.model`.
- `export.json`: what was exported and the measured agreement with JAX.

Weights never pass through the converter: every matrix and lookup table is a signature input while the graph
is converted (`weight_inputs`), then those inputs become constant tensors holding the exported data
(`litert_convert.bind_constants`), so the converter's memory does not grow with the model. `--quant int8/int4`
writes the FULLY_CONNECTED weights exactly as ai-edge-quantizer's dynamic recipe would (per-channel symmetric,
activations quantized at run time; tests/test_litert.py checks them bit for bit) and the lookup tables as
int8 rows with float scales, dequantized in the graph after the gather (the PLE table per row and layer).
Quantized exports read the parameters in bf16 and quantize them tensor by tensor (no float32 model is held).

Before the output directory appears, the models run a short prefill + decode in the LiteRT interpreter and
are compared with JAX (`gemma4_jax.model.apply`, or `litert_graph.step` on the same quantized weights), and each
tower model runs on a sample image / clip against our JAX encoders; a mismatch fails the export and leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import time

from gemma4_jax import files
from gemma4_jax.errors import Gemma4Error

# Max |logit difference| of the built-in check, float compute (float export, or the weight-only twin of a
# quantized export against JAX on the same dequantized weights): converter round-off only (measured ~2e-5 on
# tiny models). The twin's bound is also at least TWIN_RELATIVE x the logit range: random full-size weights
# amplify round-off over the layers (E2B int4, seed 0: 4.6e-3 on a range of 5.3, i.e. 0.9e-3 of it).
# Dynamic-range exports also quantize activations at run time; on random tiny models that moves logits by up to
# ~0.9x their range (MoE routing flips), so their bound (DYNAMIC_BOUND x range) only catches broken graphs.
TOLERANCE = 1e-3
TWIN_RELATIVE = 5e-3
DYNAMIC_BOUND = 1.5
_CHECK_DECODE_STEPS = 8
DEFAULT_PREFILL = 128
# Side models of PLE configs (signature name -> file name), fed to the main model as `embeddings` and
# `per_layer_embeddings`.
SIDE_MODELS = {"embedder": "embedder.tflite", "per_layer_embedder": "per_layer_embedder.tflite"}


def _log(msg: str) -> None:
    print(f"[litert] {msg}", file=sys.stderr, flush=True)


def weight_inputs(tensors: dict) -> list[tuple[str, tuple[int, ...], object]]:
    """Signature inputs that carry the named weight tensors (`litert_graph.named_tensors`), so the converter sees
    no weight constants: a float32 input per matrix (quantized when bound), per quantized lookup table its int8
    blocks `{name}.{k}` and float32 `{name}.scale` (dequantized in the graph)."""
    import numpy as np

    from gemma4_jax.export.litert_graph import Quantized

    inputs = []
    for name, w in tensors.items():
        if isinstance(w, Quantized) and w.scale.ndim == 2:
            inputs += [(f"{name}.{k}", block.shape, np.int8) for k, block in enumerate(w.values)]
            inputs.append((f"{name}.scale", w.scale.shape, np.float32))
        else:
            inputs.append((name, (w.values if isinstance(w, Quantized) else w).shape, np.float32))
    return inputs


def _tensors_from_args(tensors: dict, args) -> dict:
    """The traced signature arguments of `weight_inputs(tensors)`, regrouped by tensor name."""
    from gemma4_jax.export.litert_graph import Quantized

    args, out = iter(args), {}
    for name, w in tensors.items():
        if isinstance(w, Quantized) and w.scale.ndim == 2:
            out[name] = Quantized(tuple(next(args) for _ in w.values), next(args), w.bits)
        else:
            out[name] = next(args)
    return out


def pack_int4(values):
    """int4 values (int8 array, one per byte) -> bytes holding two each: element 2i in the low nibble, 2i+1
    in the high one (TFLite's INT4 layout: `quant.pack_nibbles` with blocks of 2; an odd tail is zero-padded)."""
    import numpy as np

    from gemma4_jax.quant.codecs import pack_nibbles

    nibbles = values.reshape(-1).view(np.uint8) & np.uint8(0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return pack_nibbles(nibbles, 2)


def weight_constants(tensors: dict) -> dict:
    """The constants `litert_convert.bind_constants` puts in place of `weight_inputs(tensors)`."""
    import numpy as np
    from ai_edge_litert.schema_py_generated import TensorType

    from gemma4_jax.export.litert_convert import Constant
    from gemma4_jax.export.litert_graph import Quantized

    out = {}
    for name, w in tensors.items():
        if not isinstance(w, Quantized):
            out[name] = Constant(np.asarray(w, np.float32), TensorType.FLOAT32)
        elif w.scale.ndim == 2:  # lookup table: plain int8 rows, scaled in the graph
            out |= {f"{name}.{k}": Constant(block, TensorType.INT8) for k, block in enumerate(w.values)}
            out[f"{name}.scale"] = Constant(w.scale, TensorType.FLOAT32)
        elif w.bits == 4:
            out[name] = Constant(pack_int4(w.values), TensorType.INT4, w.scale)
        else:
            out[name] = Constant(w.values, TensorType.INT8, w.scale)
    return out


def side_models(config, towers: bool = False) -> list[str]:
    """The side models the main model reads its inputs from (signature names of SIDE_MODELS): the embedder when
    the main model takes `embeddings` (PLE configs: the LiteRT-LM runtime fills `per_layer_embeddings` only on
    its embeddings path; exports with towers: soft tokens reach the model only there), plus the PLE model."""
    if not (config.per_layer_input_dim or towers):
        return []
    return ["embedder", "per_layer_embedder"] if config.per_layer_input_dim else ["embedder"]


def main_signatures(config, weights, prefill_len: int, cache_len: int, towers: bool = False):
    """The prefill and decode signatures of the main model (see module doc), weights as trailing inputs, and
    the weight tensors they take ({name: tensor}). With the vision tower of a model whose images attend
    bidirectionally, both take the engine's masks (`litert_graph.MASK_INPUTS`)."""
    import numpy as np

    from gemma4_jax.export import litert_convert, litert_graph

    shapes = litert_graph.cache_shapes(config, cache_len)
    names = list(shapes)
    ple = bool(config.per_layer_input_dim)
    embeddings = bool(side_models(config, towers))
    masked = bidirectional_masks(config, towers)
    tensors = litert_graph.named_tensors(weights)
    tensors.pop(litert_graph.PLE_TABLE, None)  # the PLE model's
    if embeddings:
        tensors.pop(litert_graph.EMBEDDING)  # the embedder model's (the LM head is its own tensor)
    extra = weight_inputs(tensors)

    def signature(name: str, t: int):
        if embeddings:
            inputs = [("embeddings", (1, t, config.embed_dim), np.float32)]
            if ple:
                inputs.append(
                    ("per_layer_embeddings", (1, t, config.num_layers, config.per_layer_input_dim), np.float32)
                )
        else:
            inputs = [("tokens", (1, t), np.int32)]
        inputs.append(("input_pos", (t,), np.int32))
        if masked:
            inputs += [(n, (1, 1, t, cache_len), np.bool_) for n in litert_graph.MASK_INPUTS.values()]
        inputs += [(n, shapes[n], np.float32) for n in names]
        n_fixed = len(inputs)

        def fn(*args):
            given = {n: a for (n, _, _), a in zip(inputs, args[:n_fixed], strict=True)}
            w = litert_graph.with_tensors(weights, _tensors_from_args(tensors, args[n_fixed:]))
            return litert_graph.step(
                config,
                w,
                given.get("tokens"),
                given["input_pos"],
                given.get("per_layer_embeddings"),
                {n: given[n] for n in names},
                given.get("embeddings"),
                {n: given[n] for n in litert_graph.MASK_INPUTS.values()} if masked else None,
            )

        return litert_convert.Signature(name, fn, inputs + extra, ["logits", *names])

    return [signature("prefill", prefill_len), signature("decode", 1)], tensors


def bidirectional_masks(config, towers: bool) -> bool:
    """Whether the main model takes the engine's masks: images attend bidirectionally (31B, 26B-A4B) and the
    export has towers (the bundle then carries the ExecutorMetadata that asks the engine for them)."""
    return bool(towers and config.vision is not None and config.vision_bidirectional)


def side_signature(config, weights, name: str):
    """A side model (`embedder` or `per_layer_embedder`): token_ids [1, 1] -> `embeddings`, its
    table as an input; and {table name: table}."""
    import numpy as np

    from gemma4_jax.export import litert_convert, litert_graph

    table_name = {"embedder": litert_graph.EMBEDDING, "per_layer_embedder": litert_graph.PLE_TABLE}[name]
    tensors = {table_name: weights[table_name]}

    def fn(token_ids, *args):
        table = _tensors_from_args(tensors, args)[table_name]
        if name == "embedder":
            return {"embeddings": litert_graph.embed(config, table, token_ids)}
        return {"embeddings": litert_graph.per_layer_rows(config, table, token_ids)}

    inputs = [("token_ids", (1, 1), np.int32), *weight_inputs(tensors)]
    return litert_convert.Signature(name, fn, inputs, ["embeddings"]), tensors


def convert_models(config, weights, prefill_len: int, cache_len: int, towers: bool = False) -> dict:
    """Converts the main model (and its `side_models`) without weight constants:
    {file name: (converted bytes, {input name: litert_convert.Constant})}, for `write_models`."""
    from gemma4_jax.export import litert_convert

    out = {}
    for name in side_models(config, towers):
        t0 = time.time()
        signature, tensors = side_signature(config, weights, name)
        out[SIDE_MODELS[name]] = (litert_convert.convert([signature]), weight_constants(tensors))
        _log(f"{name} converted in {time.time() - t0:.0f} s")
    t0 = time.time()
    signatures, tensors = main_signatures(config, weights, prefill_len, cache_len, towers)
    out["model.tflite"] = (litert_convert.convert(signatures), weight_constants(tensors))
    _log(f"prefill/decode model converted in {time.time() - t0:.0f} s")
    return out


def write_models(converted: dict, directory: str, weight_only: bool = False, signatures=None) -> dict[str, str]:
    """Writes the converted models with their weights bound ({file name: path}); `weight_only`: the checks'
    twin (quantized weights dequantized to float at run time); `signatures`: keep only these."""
    from gemma4_jax.export import litert_convert

    paths = {}
    for file, (model_bytes, constants) in converted.items():
        paths[file] = os.path.join(directory, file)
        litert_convert.bind_constants(model_bytes, constants, paths[file], weight_only, signatures)
    return paths


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


def graph_reference(config, weights, prompt, n_decode: int, cache_len: int):
    """As `jax_reference`, but through `litert_graph.step` in JAX (equal to `model.apply` to float round-off,
    see tests/test_litert.py) on the exported weights (`litert_graph.Quantized` ones are jit arguments,
    dequantized inside the jit, so memory stays ~ the quantized bytes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gemma4_jax.export import litert_graph

    caches = {n: jnp.zeros(s, jnp.float32) for n, s in litert_graph.cache_shapes(config, cache_len).items()}

    @jax.jit
    def step(weights, tokens, pos, caches):
        x = litert_graph.embed(config, weights[litert_graph.EMBEDDING], tokens)
        rows = None
        if config.per_layer_input_dim:
            rows = litert_graph.per_layer_rows(config, weights[litert_graph.PLE_TABLE], tokens)
        out = litert_graph.step(config, weights, None, pos, rows, caches, x)
        return out.pop("logits")[0], out

    t = len(prompt)
    prefill, caches = step(weights, jnp.asarray([prompt], jnp.int32), jnp.arange(t, dtype=jnp.int32), caches)
    prefill = np.asarray(prefill)
    token = int(prefill[-1].argmax())
    decode, tokens = [], [token]
    for i in range(n_decode - 1):
        logits, caches = step(weights, jnp.asarray([[token]], jnp.int32), jnp.asarray([t + i], jnp.int32), caches)
        decode.append(np.asarray(logits[0]))
        token = int(decode[-1].argmax())
        tokens.append(token)
    return prefill, np.stack(decode) if decode else np.zeros((0, config.vocab_size)), tokens


class LiteRTRunner:
    """Runs the exported models in the ai-edge-litert interpreter (the reference runtime), feeding the main
    model the way the LiteRT-LM runtime does (side models one token at a time, prompt padded with zeros)."""

    def __init__(self, config, model, side: dict, prefill_len: int, cache_len: int, xnnpack: bool = True):
        """`model` and the `side` models ({signature name: model}): .tflite paths or bytes. `xnnpack` False:
        TFLite's builtin kernels only (XNNPACK would repack a twin's dequantized float weights: a second copy)."""
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        from gemma4_jax.export import litert_graph

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES

        def interpreter(m):
            if isinstance(m, str):
                return Interpreter(model_path=m, experimental_op_resolver_type=resolver)
            return Interpreter(model_content=m, experimental_op_resolver_type=resolver)

        self.config, self.prefill_len = config, prefill_len
        self._interpreters = [interpreter(model)]
        # A model without `prefill` (the decode-only twin of a full-size check) prefills token by token.
        has_prefill = "prefill" in self._interpreters[0].get_signature_list()
        self._prefill = self._interpreters[0].get_signature_runner("prefill") if has_prefill else None
        self._decode = self._interpreters[0].get_signature_runner("decode")
        self._side = {}
        for name, content in side.items():
            self._interpreters.append(interpreter(content))
            self._side[name] = self._interpreters[-1].get_signature_runner(name)
        shapes = litert_graph.cache_shapes(config, cache_len)
        self.caches = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        # Models whose images attend bidirectionally take the engine's masks (text prompts here: causal).
        self._masked = litert_graph.MASK_INPUTS[False] in self._decode.get_input_details()
        self.cache_len = cache_len

    def _inputs(self, tokens, pos):
        """The main model's inputs at positions `pos`: `tokens`, or `embeddings` + `per_layer_embeddings` (PLE),
        and the masks of a bidirectional model."""
        import numpy as np

        from gemma4_jax.export import litert_graph

        out = {"input_pos": np.asarray(pos, np.int32)}
        if self._masked:
            out |= litert_graph.engine_masks(pos, self.cache_len)
        if not self._side:
            return out | {"tokens": np.asarray(tokens, np.int32)[None]}
        for name, input_name in (("embedder", "embeddings"), ("per_layer_embedder", "per_layer_embeddings")):
            if name not in self._side:
                continue
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
        if self._prefill is None:
            return np.stack([self.decode(token, start + i) for i, token in enumerate(prompt)])
        tokens = np.zeros(self.prefill_len, np.int32)
        tokens[:t] = prompt
        pos = np.zeros(self.prefill_len, np.int32)
        pos[:t] = np.arange(start, start + t)
        out = self._prefill(**self._inputs(tokens, pos), **self.caches)
        self.caches = {n: out[n] for n in self.caches}
        return out["logits"][0, :t]

    def decode(self, token: int, position: int):

        out = self._decode(**self._inputs([token], [position]), **self.caches)
        self.caches = {n: out[n] for n in self.caches}
        return out["logits"][0, 0]


def _require(err, tol, got, want, what) -> None:
    if not err <= tol:
        raise Gemma4Error(
            f"the exported model disagrees with {what}: max |logit diff| {err:.4g} > {tol:.4g}; nothing written"
        )
    if got != want:
        raise Gemma4Error(f"greedy tokens differ from {what}: {got} vs {want}; nothing written")


def compare(config, model, side, prefill_len, cache_len, prompt, reference, xnnpack: bool = True):
    """Prefills `prompt` and decodes in the interpreter, fed the reference's greedy tokens.

    `reference` is (prefill logits, decode logits, greedy tokens) from `jax_reference`/`graph_reference`.
    Returns (max |logit diff| over prefill and decode, max |reference logit|, LiteRT greedy tokens (argmax of
    its own logits at each step)).
    """
    import numpy as np

    ref_prefill, ref_decode, ref_tokens = reference
    runner = LiteRTRunner(config, model, side, prefill_len, cache_len, xnnpack)
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


# The chat template of bundles with towers when the checkpoint's own does not render media parts as the engine's
# placeholders: the Gemma 4 turn format of `tokenizer.render_gemma4` (user/model/system turns, text, image and
# audio parts). The engine adds <bos> itself (LlmMetadata.start_token) and finds `<|image|>` / `<|audio|>` in the
# rendered text by regex, replacing each with the marker tokens and the tower's soft tokens.
GEMMA4_MEDIA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] in ['assistant', 'model'] else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)
# The marker tokens of the Gemma4 LlmMetadata (the engine takes their strings, not ids): (field, config id).
_MARKERS = {
    "vision": (("start_of_image_token", "boi_token_id"), ("end_of_image_token", "eoi_token_id")),
    "audio": (("start_of_audio_token", "boa_token_id"), ("end_of_audio_token", "eoa_token_id")),
}
# Section order of Google's Gemma 4 E2B bundle (litert-community/gemma-4-E2B-it-litert-lm): after the metadata
# and tokenizer, the embedders, the audio sections, the vision sections, then prefill/decode. The engine finds
# sections by type; the order only makes our bundle read like theirs.
BUNDLE_ORDER = (
    "embedder.tflite",
    "per_layer_embedder.tflite",
    "audio_encoder.tflite",
    "audio_adapter.tflite",
    "end_of_audio.tflite",
    "vision_encoder.tflite",
    "vision_adapter.tflite",
    "end_of_vision.tflite",
    "model.tflite",
)


def bundle_template(tokenizer, parts) -> str | None:
    """The bundle's chat template: the checkpoint's, unless the export has towers and that template does not
    render image/audio parts as `<|image|>`/`<|audio|>` (or there is none); then GEMMA4_MEDIA_TEMPLATE."""
    from gemma4_jax.tokenizer import render_jinja

    if not parts or tokenizer.chat_template is None:
        return GEMMA4_MEDIA_TEMPLATE if parts else None
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "x"}]}]
    try:
        text = render_jinja(tokenizer.chat_template, probe, add_generation_prompt=True, bos_token="", eos_token="")
    except Gemma4Error:
        text = ""
    if all(marker in text for marker in ("<|image|>", "<|audio|>")):
        return tokenizer.chat_template
    _log("the checkpoint's chat template does not render media parts as <|image|>/<|audio|>: bundling Gemma 4's")
    return GEMMA4_MEDIA_TEMPLATE


def executor_metadata(config, cache_len: int):
    """The bundle's ExecutorMetadata for a model that takes the engine's masks (`bidirectional_masks`): the
    engine fills `attn_mask` causal and `local_mask` VISION_BIDIRECTIONAL (each image's soft tokens see each
    other; no sliding window is declared, so the engine keeps absolute key columns and the graph applies the
    window). With this section the engine finds the KV cache from `state_buffers` only, so every cache tensor
    is listed (sequence axis 2 of [1, KVH, S, Dh], same name in and out of both signatures)."""
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as pb

    from gemma4_jax.config import GLOBAL
    from gemma4_jax.export import litert_graph

    meta = pb.ExecutorMetadata()
    llm = meta.llm_executor_metadata
    llm.attention_mask_settings.attention_mask_type = pb.ATTENTION_MASK_TYPE_CAUSAL
    llm.attention_mask_settings.local_attention_mask_type = pb.ATTENTION_MASK_TYPE_VISION_BIDIRECTIONAL
    for name in litert_graph.cache_shapes(config, cache_len):
        kind, layer = name.split("_")[-2:]
        scope = "GLOBAL" if config.layer_types[int(layer)] == GLOBAL else "LOCAL"
        buffer = llm.state_buffers.add(sequence_axis=2)
        buffer.prefill_input_name = buffer.prefill_output_name = name
        buffer.decode_input_name = buffer.decode_output_name = name
        buffer.type = getattr(pb.StateBuffer, f"TYPE_{scope}_{'KEY' if kind == 'k' else 'VALUE'}_CACHE")
    return meta


def write_bundle(path, config, model_dir, tokenizer_dir, cache_len, sections, parts=(), image_tokens=0) -> None:
    """The .litertlm: LlmMetadata, SentencePiece tokenizer and the models `sections` ({file in `model_dir`:
    (litertlm_builder.TfLiteModelType name, backend constraint or None)}) in BUNDLE_ORDER. `parts`: the towers
    ("vision", "audio"), whose marker tokens and (vision) patch geometry go into the Gemma4 metadata."""
    from litert_lm_builder import litertlm_builder as builder
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    from gemma4_jax.sampler import DEFAULT_STOP_TOKENS
    from gemma4_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    meta = llm_metadata_pb2.LlmMetadata()
    gemma4 = llm_model_type_pb2.Gemma4()
    for part in parts:
        for field, id_name in _MARKERS[part]:
            token = getattr(config, id_name)
            piece = tokenizer.id_to_piece(token)
            if tokenizer.encode(piece) != [token]:
                raise Gemma4Error(f"the tokenizer has no single token for {id_name} {token} ({piece!r})")
            getattr(gemma4, field).token_str = piece
    if "vision" in parts:
        from gemma4_jax.export.litert_towers import image_patches

        gemma4.patch_width = gemma4.patch_height = config.vision.patch_size
        gemma4.max_num_patches = image_patches(image_tokens)
        gemma4.pooling_kernel_size = config.vision.pooling_kernel
    meta.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(gemma4=gemma4))
    meta.start_token.token_ids.ids.append(config.bos_id)
    for stop in dict.fromkeys((config.eos_id, *DEFAULT_STOP_TOKENS)):
        meta.stop_tokens.add().token_ids.ids.append(stop)
    meta.max_num_tokens = cache_len
    template = bundle_template(tokenizer, parts)
    if template:
        meta.jinja_prompt_template = template
    work = os.path.dirname(path)
    meta_path = os.path.join(work, ".llm_metadata.pb")
    with open(meta_path, "wb") as f:
        f.write(meta.SerializeToString())
    b = builder.LitertLmFileBuilder()
    b.add_llm_metadata(meta_path)
    if bidirectional_masks(config, "vision" in parts):
        executor_path = os.path.join(work, ".executor_metadata.pb")
        with open(executor_path, "wb") as f:
            f.write(executor_metadata(config, cache_len).SerializeToString())
        b.add_executor_metadata(executor_path)
    b.add_sentencepiece_tokenizer(os.path.join(tokenizer_dir, "tokenizer.model"))
    for file in sorted(sections, key=BUNDLE_ORDER.index):
        kind, backend = sections[file]
        b.add_tflite_model(
            os.path.join(model_dir, file), getattr(builder.TfLiteModelType, kind), backend_constraint=backend
        )
    with open(path, "wb") as f, _reproducible_stamps(builder, meta_path, model_dir, sections, tokenizer_dir):
        b.build(f)
    os.remove(meta_path)
    if bidirectional_masks(config, "vision" in parts):
        os.remove(executor_path)


@contextlib.contextmanager
def _reproducible_stamps(builder, meta_path, model_dir, sections, tokenizer_dir):
    """Google's builder stamps every bundle with a fresh uuid4 and the current time, so two builds of the same
    models differ. Here the uuid is derived from what the bundle holds (uuid5 of the sections' bytes), and the time
    is $SOURCE_DATE_EPOCH when that is set (the reproducible-builds convention), else now: the same inputs then
    give the same bytes (a resumed `ship` equals an uninterrupted one)."""
    import datetime
    import hashlib
    import uuid

    digest = hashlib.sha256()
    for file in [meta_path, os.path.join(tokenizer_dir, "tokenizer.model")] + [
        os.path.join(model_dir, f) for f in sorted(sections)
    ]:
        digest.update(files.sha256_file(file).encode())
    original = builder.populate_system_metadata

    def populate(system_metadata):
        out = original(system_metadata)
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        for entry in out:
            if entry.key == "uuid":
                entry.value = str(uuid.uuid5(uuid.NAMESPACE_URL, "gemma4-jax:" + digest.hexdigest()))
            elif entry.key == "creation_timestamp" and epoch:
                entry.value = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).isoformat()
        return out

    builder.populate_system_metadata = populate
    try:
        yield
    finally:
        builder.populate_system_metadata = original


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- the task, in steps ----------------------------------------------------------------------------------

QUANTS = ("none", "int8", "int4")


def _check_options(quant: str, ple_bits: int, prefill_len: int, cache_len: int) -> None:
    if quant not in QUANTS:
        raise Gemma4Error(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if ple_bits not in (4, 8):
        raise Gemma4Error(f"--ple-bits must be 4 or 8, got {ple_bits}")
    if ple_bits != 8 and quant != "int4":
        raise Gemma4Error("--ple-bits applies to --quant int4")
    if prefill_len < 1 or cache_len < 2:
        raise Gemma4Error("--prefill-len must be >= 1 and --cache-len >= 2")
    if prefill_len > cache_len:
        raise Gemma4Error(f"--prefill-len {prefill_len} exceeds --cache-len {cache_len}")


def _find_tokenizer(tokenizer_dir: str | None, source) -> str | None:
    """The directory with tokenizer.model for the bundle: the given one (required to have it), else the source's."""
    if tokenizer_dir is not None:
        if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.model")):
            raise Gemma4Error(f"no tokenizer.model in {tokenizer_dir}")
        return tokenizer_dir
    d = source.directory
    return d if d and os.path.isfile(os.path.join(d, "tokenizer.model")) else None


def prepare_weights(source, quant: str, ple_bits: int):
    """Step 1: the graph's weights. Float exports read float32; quantized ones read bf16 and quantize one tensor
    at a time (full-size E2B is never held in f32: 18.6 GB)."""
    import jax.numpy as jnp
    import numpy as np

    from gemma4_jax.export import litert_graph

    if quant == "none":
        return litert_graph.graph_weights(source.config, source, np.float32)
    t0 = time.time()
    prepare = litert_graph.quantizer(source.config, {"int8": 8, "int4": 4}[quant], ple_bits)
    weights = litert_graph.graph_weights(source.config, source, np.dtype(jnp.bfloat16), prepare)
    _log(f"quantized ({quant}, per-layer inputs {ple_bits}-bit) in {time.time() - t0:.0f} s")
    return weights


@dataclasses.dataclass(frozen=True)
class CheckPlan:
    """What the check needs from the weights, made before they are released (`prepare_check`): the prompt, and
    for quantized exports the JAX reference on the exported weights and the decode-only weight-only twin."""

    prompt: list[int]
    n_decode: int
    reference: tuple | None = None
    twin: str | None = None


def prepare_check(config, weights, converted, work: str, quant: str, prefill_len, cache_len) -> CheckPlan:
    """Step 4a (quantized exports): the reference greedy run of `graph_reference` on the exported weights and the
    decode-only twin written into `work` (each signature's DEQUANTIZE ops hold their own float copy of the
    weights: 2 x 8 GB for E2B with both; the prompt goes through decode token by token). The caller then drops
    the weights, so they are not held while the interpreter runs (full-size E2B: ~5 GB less at the peak)."""
    import gc

    import jax
    import numpy as np

    prompt_len = min(prefill_len, 12)
    prompt = [config.bos_id, *np.random.default_rng(0).integers(3, config.vocab_size, prompt_len - 1).tolist()]
    n_decode = min(_CHECK_DECODE_STEPS, cache_len - prompt_len)
    if quant == "none":
        return CheckPlan(prompt, n_decode)
    twin = write_models({"model.tflite": converted["model.tflite"]}, tempfile.mkdtemp(dir=work), True, ("decode",))
    t0 = time.time()
    reference = graph_reference(config, jax.device_put(weights), prompt, n_decode, cache_len)
    gc.collect()
    _log(f"JAX reference on the quantized weights in {time.time() - t0:.0f} s")
    return CheckPlan(prompt, n_decode, reference, twin["model.tflite"])


def check_against_jax(source, plan: CheckPlan, paths, quant: str, prefill_len, cache_len) -> dict:
    """Step 4b: run the written models in the LiteRT interpreter against JAX; raise (nothing is kept) on a mismatch.

    Float exports are compared with `model.apply` on the source's weights. Quantized exports: the weight-only twin
    (same quantized weights, float compute) must equal `litert_graph.step` on the dequantized weights to round-off;
    the shipped dynamic-range model is only bounded against gross breakage (it quantizes activations too)."""
    import gc

    import numpy as np

    cfg, prompt, reference = source.config, plan.prompt, plan.reference
    check: dict = {"prompt_tokens": len(prompt), "decode_steps": plan.n_decode}
    side = {name: paths[file] for name, file in SIDE_MODELS.items() if file in paths}
    model_path = paths["model.tflite"]
    if quant == "none":
        from gemma4_jax.api import read_params

        params = read_params(source, np.float32, progress=False)
        reference = jax_reference(cfg, params, prompt, plan.n_decode, cache_len)
        del params
        err, scale, got = compare(cfg, model_path, side, prefill_len, cache_len, prompt, reference)
        _log(f"check vs model.apply: max |dlogit| {err:.3g} (tol {TOLERANCE:.3g}), greedy equal {got == reference[2]}")
        _require(err, TOLERANCE, got, reference[2], "model.apply")
        return check | {
            "max_abs_logit_diff": err,
            "tolerance": TOLERANCE,
            "jax_greedy": reference[2],
            "litert_greedy": got,
        }
    err, scale, got = compare(cfg, plan.twin, side, prefill_len, cache_len, prompt, reference, xnnpack=False)
    shutil.rmtree(os.path.dirname(plan.twin))
    gc.collect()
    tol = max(TOLERANCE, TWIN_RELATIVE * scale)
    _log(
        f"weights check (decode-only weight-only twin vs JAX, same weights): max |dlogit| {err:.3g} "
        f"(tol {tol:.3g}, logit range {scale:.3g})"
    )
    _require(err, tol, got, reference[2], "JAX on the dequantized weights")
    check |= {"weights_max_abs_logit_diff": err, "weights_tolerance": tol}
    err, scale, got = compare(cfg, model_path, side, prefill_len, cache_len, prompt, reference)
    bound = DYNAMIC_BOUND * scale
    agree = sum(a == b for a, b in zip(got, reference[2], strict=True))
    _log(
        f"dynamic-range model vs JAX on dequantized weights: max |dlogit| {err:.3g} "
        f"({err / max(scale, 1e-30):.2f} of the logit range), greedy agreement {agree}/{len(got)}"
    )
    if not err <= bound:
        raise Gemma4Error(f"the quantized model is off by {err:.4g} > {bound:.4g} in logits; nothing written")
    return check | {
        "dynamic_max_abs_logit_diff": err,
        "logit_scale": scale,
        "jax_greedy": reference[2],
        "litert_greedy": got,
    }


def export_towers(source, parts, tmp: str, quant: str, tower_quant, image_tokens: int, frames: int, markers):
    """Step 5: the tower models of `parts`, converted, written into `tmp` and checked against our JAX encoders
    (float or weight-only twin: <= litert_towers.TOLERANCE x max(1, max |output|); the dynamic-range int8 models
    ship with a bound against gross breakage). `markers` {part: the embedder's row of its end marker}.
    Returns ({file: (model type, backend)}, check summary)."""
    import gc

    import numpy as np

    from gemma4_jax.export import litert_towers as towers
    from gemma4_jax.quant.policy import litert_tower_bits

    bits = litert_tower_bits(quant, tower_quant)
    sections, check = {}, {"tower_bits": bits or 32}
    for part in parts:
        t0 = time.time()
        weights = towers.read_tower(source, part, bits)
        if part == "vision":
            models = towers.vision_models(source.config, weights, markers[part], image_tokens)
        else:
            models = towers.audio_models(source.config, weights, markers[part], frames)
        converted = towers.convert(models)
        paths = write_models(converted, tmp)
        _log(f"{part} tower converted and bound in {time.time() - t0:.0f} s (peak RSS so far {_peak_rss_mb():.0f} MiB)")
        for m in models:
            sections[m.file] = (m.kind, m.backend)
        end_of_media = models[-1]
        got = towers.run_model(paths[end_of_media.file], {})[end_of_media.signature.outputs[0]]
        if not np.array_equal(got.reshape(-1), np.asarray(markers[part], np.float32)):
            raise Gemma4Error(f"{end_of_media.file} does not return the embedder's row; nothing written")
        twin_dir = tempfile.mkdtemp(dir=tmp)
        for file, (inputs, expected) in towers.references(source.config, {part: weights}, image_tokens, frames).items():
            checked = write_models({file: converted[file]}, twin_dir, True)[file] if bits else paths[file]
            err, scale = towers.compare(checked, inputs, expected)
            tol = towers.TOLERANCE * max(1.0, scale)
            entry = {"max_abs_diff": err, "max_abs_output": scale, "tolerance": tol}
            _log(f"{file} vs JAX{' (weight-only twin)' if bits else ''}: max |diff| {err:.3g} (tol {tol:.3g})")
            if not err <= tol:
                raise Gemma4Error(
                    f"{file} disagrees with our JAX encoder: max |diff| {err:.4g} > {tol:.4g}; nothing written"
                )
            if bits:
                err, _ = towers.compare(paths[file], inputs, expected)
                bound = towers.DYNAMIC_BOUND * max(1.0, scale)
                _log(
                    f"{file} dynamic-range int8 vs JAX: max |diff| {err:.3g} ({err / max(1.0, scale):.3g} of the scale)"
                )
                if not err <= bound:
                    raise Gemma4Error(f"the int8 {file} is off by {err:.4g} > {bound:.4g}; nothing written")
                entry |= {"dynamic_max_abs_diff": err, "dynamic_bound": bound}
            check[file] = entry
        shutil.rmtree(twin_dir)
        del weights, converted
        gc.collect()
        _log(f"{part} tower checked (peak RSS so far {_peak_rss_mb():.0f} MiB)")
    return sections, check


def export_litert(
    source,
    out: str,
    *,
    quant: str = "none",
    ple_bits: int = 8,
    prefill_len: int | None = None,
    cache_len: int = 1024,
    tokenizer_dir: str | None = None,
    modalities: str | None = None,
    image_tokens: int | None = None,
    audio_frames: int | None = None,
    tower_quant: str | None = None,
) -> str:
    """Writes the LiteRT models of `source` (a `sources.WeightSource`) and, with a SentencePiece tokenizer, the
    .litertlm bundle into the new directory `out` (see the module doc). `modalities`: "text,vision,audio" or a
    part of it (default: the towers the checkpoint has); `image_tokens` (default 280) and `audio_frames` (default
    3000) size the towers' inputs (`litert_towers`); `tower_quant` "float"/"int8" (default: int8 when quantized).
    Returns a one-line summary."""
    import gc

    import numpy as np

    from gemma4_jax import files
    from gemma4_jax.errors import require_packages
    from gemma4_jax.export import litert_graph
    from gemma4_jax.export import litert_towers as towers
    from gemma4_jax.quant.policy import litert_tower_bits

    start = time.time()
    require_packages("ai_edge_litert", "litert_converter", "litert_lm_builder", extra="litert", what="export litert")
    cfg = source.config
    parts = towers.select_parts(cfg, modalities)
    image_tokens, audio_frames = towers.check_sizes(parts, image_tokens, audio_frames)
    # An image whose tokens attend each other must reach the engine in one prefill call (it fills the
    # bidirectional mask within a call): room for its tokens and markers.
    whole_image = image_tokens + 2 if bidirectional_masks(cfg, "vision" in parts) else 0
    if prefill_len is None:
        prefill_len = max(DEFAULT_PREFILL, whole_image)
    elif prefill_len < whole_image:
        raise Gemma4Error(
            f"--prefill-len {prefill_len} < {whole_image}: this model's image tokens attend each other, which the "
            f"engine computes only within one prefill call; use >= --image-tokens + 2"
        )
    _check_options(quant, ple_bits, prefill_len, cache_len)
    litert_tower_bits(quant, tower_quant)  # an unsupported tower quant fails before any work
    out = files.check_output(out, directory=True)
    tokenizer_dir = _find_tokenizer(tokenizer_dir, source)
    ple_bits = {"none": 32, "int8": 8, "int4": ple_bits}[quant]
    _log(
        f"{cfg.name}: {source.description}, quant {quant}, prefill {prefill_len}, cache {cache_len}, "
        f"modalities {','.join(['text', *parts])}"
    )
    weights = prepare_weights(source, quant, ple_bits)
    # The end-of-media models return the embedder's rows of `<image|>` / `<audio|>`, as the embedder gives them.
    ends = {"vision": cfg.eoi_token_id, "audio": cfg.eoa_token_id}
    markers = {
        part: np.asarray(litert_graph.embed(cfg, weights[litert_graph.EMBEDDING], np.asarray([[ends[part]]])))[0, 0]
        for part in parts
    }
    converted = convert_models(cfg, weights, prefill_len, cache_len, towers=bool(parts))
    with files.atomic_output(out, directory=True) as tmp:
        t0 = time.time()
        paths = write_models(converted, tmp)
        _log(f"weights bound in {time.time() - t0:.0f} s")
        plan = prepare_check(cfg, weights, converted, tmp, quant, prefill_len, cache_len)
        del converted, weights  # not held while the interpreter runs (a float check reads the source again)
        gc.collect()
        check = check_against_jax(source, plan, paths, quant, prefill_len, cache_len)
        _log(f"text models checked (peak RSS so far {_peak_rss_mb():.0f} MiB)")
        kinds = {"embedder": "EMBEDDER", "per_layer_embedder": "PER_LAYER_EMBEDDER"}
        sections = {SIDE_MODELS[name]: (kinds[name], None) for name in side_models(cfg, bool(parts))}
        sections["model.tflite"] = ("PREFILL_DECODE", None)
        tower_sections, tower_check = export_towers(
            source, parts, tmp, quant, tower_quant, image_tokens, audio_frames, markers
        )
        sections |= tower_sections
        if parts:
            check["towers"] = tower_check
        names = sorted(sections, key=BUNDLE_ORDER.index)
        if tokenizer_dir:
            bundle = os.path.join(tmp, "model.litertlm")
            write_bundle(bundle, cfg, tmp, tokenizer_dir, cache_len, sections, parts, image_tokens)
            names.append("model.litertlm")
        else:
            _log("no tokenizer.model (pass --tokenizer DIR): .litertlm bundle skipped")
        summary = {
            "variant": cfg.name,
            "source": source.description,
            "quant": quant,
            "ple_bits": ple_bits,
            "prefill_len": prefill_len,
            "cache_len": cache_len,
            "modalities": ["text", *parts],
            **(
                {"image_tokens": image_tokens, "max_num_patches": towers.image_patches(image_tokens)}
                if "vision" in parts
                else {}
            ),
            **({"audio_frames": audio_frames} if "audio" in parts else {}),
            "files": {name: os.path.getsize(os.path.join(tmp, name)) for name in names},
            "check": check,
            "seconds": round(time.time() - start, 1),
            "peak_rss_mb": round(_peak_rss_mb()),
        }
        files.write_json(os.path.join(tmp, "export.json"), summary)
    total = sum(summary["files"].values())
    err = check.get("max_abs_logit_diff", check.get("weights_max_abs_logit_diff"))
    return (
        f"wrote {out}: {', '.join(names)} ({files.human_bytes(total)}), {cfg.name} {quant}, "
        f"max |dlogit| vs JAX {err:.2g}, {time.time() - start:.0f} s, peak RSS {summary['peak_rss_mb']} MiB"
    )
