"""The Gemma 4 forward pass as the LiteRT converter needs it: prefill/decode over an explicit KV cache.

This is `gemma4_jax.model` re-expressed, not a second model: the norms (`rms_norm`), RoPE (`rope_inv_freq`,
`apply_rope`), masks (`attention_mask`), PLE row selection (`per_layer_token_ids`) and every constant come
from there, and the weights are the checkpoint tree seen through the parameter spec ([out, in] views). Ops are
rewritten where the StableHLO → TFLite converter (litert-converter 0.5) fails or, worse, converts silently wrong:

- Every weight contraction is a 2-D `x @ W.T` with W stored [out, in] (`_linear`). An einsum with several
  contracting dims (`btnh,nhd->btd`, the MoE `tef,efd->td`) converts to wrong numbers; [out, in] is TFLite's
  FULLY_CONNECTED layout, so no transpose is materialized and the quantizer sees per-output-channel weights.
- Attention is two batched matmuls with one contracting dim each (`_attend`), batch = KV head, queries of a
  group stacked along rows; the model's 5-D `btkgh,bskh->btkgs` einsum is not used.
- The KV cache is the runtime's layout [1, KVH, S, Dh], one slot per position (slot = position), written with
  one `dynamic_update_slice` at `input_pos[0]` (the model's `.at[].set` scatter has no TFLite kernel).
  Sliding layers keep a cache of the full cache length and mask keys older than the window (no ring buffer),
  which is what the LiteRT-LM runtime expects of a `[1, KVH, S, Dh]` cache tensor.
- MoE routing has no `lax.top_k`/sort, no `ragged_dot` and no scatter-add: an expert is selected when fewer than
  k experts outrank it (ties to the lower index, as `lax.top_k`), all experts run densely and their outputs are
  weighted by the (mostly zero) routing matrix before one `[T, E*F] @ [E*F, D]` matmul.
- Compute is float32 (the converter rejects bf16 matmuls); the logits pass an `optimization_barrier` before
  the soft-cap so the converter cannot fold `/30` into the tied embedding table (which would duplicate it).
- No loops: layers are unrolled at trace time (the Python loop), as in the model.
- Weights may be tracers (the export passes them as signature inputs, see `named_tensors`) or `Quantized`
  (int values + scales, dequantized where used: matrices before the matmul, tables after the gather).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import model, param_spec
from gemma4_jax.config import GLOBAL, Gemma4Config
from gemma4_jax.quant.policy import TABLE_BITS, litert_bits


@dataclass(frozen=True)
class Quantized:
    """Symmetric integer weights: `values` int8 (int4 values unpacked, one per byte) times `scale`.

    Matrices [out, in] have one scale per output row (`scale` [out]: TFLite's per-channel quantization, axis 0);
    lookup tables [V, C] are a tuple of column blocks (`values`) with `scale` [V, G], one per row and group of
    C/G columns (dequantized in the graph, see `quantize_rows`).
    """

    values: np.ndarray | tuple[np.ndarray, ...]
    scale: np.ndarray
    bits: int


jax.tree_util.register_dataclass(Quantized, data_fields=["values", "scale"], meta_fields=["bits"])

# Weights are a flat dict keyed by the official leaf name ("layer_3/attn/q_einsum/w"), plus the tied embedding
# as the output projection under LM_HEAD. Each matrix is its leaf's [out, in] view (`param_spec.Leaf.matrix`):
# K and V, gate and up come as one matrix whose output the graph splits.
EMBEDDING = "embedder/input_embedding"
PLE_TABLE = "embedder/per_layer_embeddings"
LM_HEAD = "lm_head"
Weights = dict


def graph_weights(config: Gemma4Config, params, dtype=np.float32, prepare=None) -> Weights:
    """The parameters (a tree, or a `sources.WeightSource` read leaf by leaf) as the graph's weights: scales as
    float32 vectors, matrices as [out, in] in storage `dtype`, the PLE table in its HF [V, L·P] layout.

    `prepare(name, leaf, w)` (e.g. `quantizer(...)`) is applied to each matrix and table as soon as it is read
    (names as in `named_tensors`), so a quantized export never holds its float weights whole."""
    from gemma4_jax.sources import TreeSource, WeightSource

    source = params if isinstance(params, WeightSource) else TreeSource(config, params)
    prepare = prepare or (lambda name, leaf, w: w)
    out: Weights = {}
    for leaf in param_spec.param_spec(config):
        if leaf.unused or leaf.part != "text":
            continue  # the encoders are graphs of their own
        if leaf.quant == param_spec.SCALE:
            out[leaf.name] = source.read(leaf, np.float32)
            continue
        value = source.read(leaf, dtype)
        if leaf.quant == param_spec.PLE_TABLE:
            out[leaf.name] = prepare(leaf.name, leaf, value.reshape(leaf.shape[0], -1))
        elif leaf.quant == param_spec.EMBEDDING:
            out[leaf.name] = prepare(leaf.name, leaf, value)
            out[LM_HEAD] = prepare(LM_HEAD, leaf, value)
        else:
            # The dense-expert down projection sums over experts too: [D, E·F].
            view = leaf.matrix(value, contract_batch="expert_mlp" in leaf.contracts)
            out[leaf.name] = prepare(leaf.name, leaf, np.ascontiguousarray(view))
        del value
    return out


_CHUNK_ROWS = 4096  # rows quantized at once: bounds the float32 temporaries of big tables
TABLE_PART_ELEMENTS = 2**30  # elements per stored block of a quantized table (the E2B PLE table has 2.3e9)


def quantize_rows(w: np.ndarray, bits: int, groups: int | None = None) -> Quantized:
    """Symmetric round-to-nearest quantization of w [R, ...] (trailing dims flattened to C), as ai-edge-quantizer's
    min/max recipe computes it: scale = max(max|w|, 1e-9) / qmax in float32, q = clip(rint(w / scale)); 8 bits
    use the narrow range [-127, 127], 4 bits [-8, 7]. Row chunks at a time, so bf16 sources never exist in f32
    whole.

    `groups` None (a matrix): one scale per row, `values` [R, C], `scale` [R]. Else (a lookup table): one scale
    per row and group of C/groups columns, `scale` [R, groups], and `values` a tuple of column blocks of whole
    groups, each under TABLE_PART_ELEMENTS (TFLite's gathers index tensors with 32-bit flat offsets).
    """
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if bits >= 8 else -qmax - 1
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    g = groups or 1
    group_cols = cols // g
    per_part = g if groups is None else max(1, min(g, TABLE_PART_ELEMENTS // (rows * group_cols)))
    bounds = [(a * group_cols, min(g, a + per_part) * group_cols) for a in range(0, g, per_part)]
    parts = tuple(np.empty((rows, b - a), np.int8) for a, b in bounds)
    scale = np.empty((rows, g), np.float32)
    for start in range(0, rows, _CHUNK_ROWS):
        chunk = np.asarray(w[start : start + _CHUNK_ROWS], np.float32).reshape(-1, g, group_cols)  # [r, G, C/G]
        bound = np.maximum(np.abs(chunk).max(axis=2), np.float32(1e-9))
        s = (bound / np.float32(qmax)).astype(np.float32)
        scale[start : start + len(chunk)] = s
        q = np.clip(np.rint(chunk / s[:, :, None]), qmin, qmax).reshape(len(chunk), cols).astype(np.int8)
        for part, (a, b) in zip(parts, bounds, strict=True):
            part[start : start + len(chunk)] = q[:, a:b]
    if groups is None:
        return Quantized(parts[0], scale[:, 0], bits)
    return Quantized(parts, scale, bits)


def quantizer(config: Gemma4Config, bits: int, ple_bits: int):
    """The `prepare` of a quantized export (see `graph_weights`): FULLY_CONNECTED weights at the bits
    `quant.policy.litert_bits` gives, lookup tables as int8 rows (the PLE table per row and layer: its layers'
    rows differ in scale)."""

    def prepare(name: str, leaf, w) -> Quantized:
        if name == EMBEDDING:
            return quantize_rows(w, TABLE_BITS, groups=1)
        if name == PLE_TABLE:
            return quantize_rows(w, TABLE_BITS, groups=config.num_layers)
        return quantize_rows(w, litert_bits(leaf, bits, ple_bits))

    return prepare


def named_tensors(weights: Weights) -> dict[str, object]:
    """The big tensors by signature-input name: every matrix (FULLY_CONNECTED weights, `LM_HEAD` included) and the
    lookup tables `EMBEDDING`, `PLE_TABLE`; not the scale vectors."""
    return {name: w for name, w in weights.items() if isinstance(w, Quantized) or np.ndim(w) >= 2}


def with_tensors(weights: Weights, tensors: dict[str, object]) -> Weights:
    """`weights` with the named tensors (see `named_tensors`) replaced, e.g. by a signature's inputs."""
    return {**weights, **tensors}


def _linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w[out, in].T in float32 (16-bit or `Quantized` weights are widened inside the graph)."""
    if isinstance(w, Quantized):
        # A data dependence on x ties the dequantization to its dot: XLA:CPU would otherwise dequantize every
        # layer's matrix up front and hold them all (9.1 GB of temporaries for the JAX reference of an int4 E2B;
        # it drops `optimization_barrier`s before scheduling). 0·x is not folded for floats (0·inf is NaN).
        tie = jnp.zeros((), jnp.float32) * x.reshape(-1)[0].astype(jnp.float32)
        w = jnp.asarray(w.values).astype(jnp.float32) * (jnp.asarray(w.scale) + tie)[:, None]
    w = jnp.asarray(w)
    if w.dtype != jnp.float32:
        w = w.astype(jnp.float32)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _lookup(table, ids) -> jax.Array:
    """Rows table[ids] [N, C] in float32; a `Quantized` table is dequantized after the gather (rows only)."""
    if not isinstance(table, Quantized):
        return jnp.take(jnp.asarray(table), ids, axis=0).astype(jnp.float32)
    blocks = [jnp.take(jnp.asarray(block), ids, axis=0) for block in table.values]
    rows = jnp.concatenate(blocks, axis=1).astype(jnp.float32)  # [N, C]
    scale = jnp.take(jnp.asarray(table.scale), ids, axis=0)  # [N, G]
    return (rows.reshape(ids.shape[0], scale.shape[1], -1) * scale[:, :, None]).reshape(rows.shape)


def _norm(x, scale, eps):
    return model.rms_norm(x, None if scale is None else jnp.asarray(scale), eps)


def _attend(q, k_cache, v_cache, mask):
    """q [T, K, G, H], caches [K, S, H], mask [T, S] -> [T, K*G*H]."""
    t, kv, g, h = q.shape
    qs = q.transpose(1, 2, 0, 3).reshape(kv, g * t, h)  # rows of a KV head: (group member, token)
    scores = jax.lax.dot_general(qs, k_cache, (((2,), (2,)), ((0,), (0,))))  # [K, G*T, S]
    scores = scores.reshape(kv, g, t, -1)
    scores = jnp.where(mask[None, None], scores, model._MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(kv, g * t, -1)
    out = jax.lax.dot_general(probs, v_cache, (((2,), (1,)), ((0,), (0,))))  # [K, G*T, H]
    return out.reshape(kv, g, t, h).transpose(2, 0, 1, 3).reshape(t, kv * g * h)


def _feed_forward(x, gating, linear):
    gate, up = jnp.split(_linear(x, gating), 2, axis=-1)
    return _linear(jax.nn.gelu(gate, approximate=True) * up, linear)


def _moe(cfg: Gemma4Config, w, residual, x):
    """Dense-expert MoE equal to `model.MoE` (routing on the un-normed residual; experts read `x`). `w(name)` is
    the layer's weight of that official name."""
    d, e, f, top_k = cfg.embed_dim, cfg.num_experts, cfg.expert_hidden, cfg.num_experts_per_token
    routed = _norm(residual, None, cfg.rms_norm_eps) * (jnp.asarray(w("mlp/router_scale")) * d**-0.5)
    probs = jax.nn.softmax(_linear(routed, w("mlp/router_logits/w")), axis=-1)  # [T, E]
    # Rank of each expert = how many experts beat it (ties go to the lower index, as lax.top_k orders them).
    above = probs[:, None, :] > probs[:, :, None]  # [T, e, j]: j beats e
    tied_lower = (probs[:, None, :] == probs[:, :, None]) & (jnp.arange(e)[None, :] < jnp.arange(e)[:, None])[None]
    rank = jnp.sum((above | tied_lower).astype(jnp.float32), axis=-1)
    chosen = jnp.where(rank < top_k, probs, 0.0)
    weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * jnp.asarray(w("mlp/per_expert_scale"))
    gate_up = _linear(x, w("mlp/gating_einsum/w")).reshape(x.shape[0], e, 2, f)
    act = jax.nn.gelu(gate_up[:, :, 0], approximate=True) * gate_up[:, :, 1]  # [T, E, F]
    return _linear((act * weights[:, :, None]).reshape(x.shape[0], e * f), w("mlp/linear/w"))


def cache_shapes(config: Gemma4Config, cache_len: int) -> dict[str, tuple[int, ...]]:
    """The runtime's KV cache tensors `kv_cache_{k,v}_{i}` [1, KVH, S, Dh] of the layers that own K/V."""
    shapes = {}
    for i in range(config.num_layers):
        if not config.is_kv_reader(i):
            shape = (1, config.layer_kv_heads(i), cache_len, config.layer_head_dim(i))
            shapes[f"kv_cache_k_{i}"] = shapes[f"kv_cache_v_{i}"] = shape
    return shapes


def embed(config: Gemma4Config, table, tokens):
    """The embedder: token ids [1, T] -> [1, T, D] scaled embeddings (as `model.Embedder.encode`)."""
    x = _lookup(table, tokens[0])
    return (x * jnp.asarray(config.embed_scale, jnp.float32))[None]


# The mask inputs of a model whose images attend bidirectionally, by (local layer?): the names the LiteRT-LM
# engine fills (global causal; local VISION_BIDIRECTIONAL, the type the bundle's ExecutorMetadata sets).
MASK_INPUTS = {False: "attn_mask", True: "local_mask"}


def engine_masks(input_pos, cache_len: int, soft: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The masks the LiteRT-LM engine fills for a call at `input_pos` [T] ({MASK_INPUTS name: [1, 1, T, S]
    bool}): each row attends the keys up to its position; on local layers a soft-token row (`soft` [T] bool; a
    run of consecutive soft tokens is one image) also attends the rest of its run. (The engine masks its padding
    rows entirely; their outputs are unused either way.)"""
    pos = np.asarray(input_pos, np.int64)
    causal = np.arange(cache_len)[None, :] <= pos[:, None]
    local = causal.copy()
    if soft is not None:
        run = np.cumsum(np.r_[True, soft[1:] != soft[:-1]])  # run id of each row
        for i in np.flatnonzero(soft):
            local[i, pos[run == run[i]]] = True
    return {MASK_INPUTS[False]: causal[None, None], MASK_INPUTS[True]: local[None, None]}


def step(
    config: Gemma4Config,
    weights: Weights,
    tokens,
    input_pos,
    per_layer_rows,
    caches: dict,
    embeddings=None,
    engine_masks: dict | None = None,
):
    """One prefill or decode call. tokens [1, T] int32 (or None and `embeddings` [1, T, D] from `embed`),
    input_pos [T] int32 (consecutive positions), per_layer_rows [1, T, L, P] (the PLE model's output) or None,
    caches {name: [1, K, S, H]}; `engine_masks` (models whose images attend bidirectionally) {MASK_INPUTS name:
    [1, 1, T, S] bool} as the LiteRT-LM engine fills them (`engine_masks`).

    Returns ({"logits": [1, T, V]} | updated caches).
    """
    cfg, eps = config, config.rms_norm_eps
    x = (embed(cfg, weights[EMBEDDING], tokens) if embeddings is None else embeddings)[0]  # [T, D]
    t = x.shape[0]
    positions = input_pos[None, :]  # [1, T]

    per_layer = None
    if cfg.per_layer_input_dim:
        n_layers, p = cfg.num_layers, cfg.per_layer_input_dim
        with jax.named_scope("per_layer_input_context"):
            context = _linear(x, weights["embedder/per_layer_model_projection/w"])
        context = context.reshape(t, n_layers, p) * cfg.embed_dim**-0.5
        context = _norm(context, weights["embedder/per_layer_projection_norm/scale"], eps)
        per_layer = (context + per_layer_rows[0]) * 2**-0.5  # [T, L, P]

    cache_len = next(iter(caches.values())).shape[2]
    key_positions = jnp.arange(cache_len, dtype=jnp.int32)[None, :]
    masks = {}
    out_caches = {}
    kv_of: dict[int, tuple] = {}
    sources = cfg.kv_source_layers
    for i, kind in enumerate(cfg.layer_types):

        def w(name, i=i):
            return weights.get(f"layer_{i}/{name}")

        h, kh, n = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_heads
        window = cfg.layer_window(i)
        if window not in masks and engine_masks is None:
            masks[window] = model.attention_mask(positions, key_positions, window)[0]  # [T, S]
        elif window not in masks:
            # The engine's masks are causal plus, on local layers, each image's soft tokens both ways (as
            # `model.attention_mask` with blocks); the window is applied here, as the model applies it.
            masks[window] = engine_masks[MASK_INPUTS[window is not None]][0, 0]
            if window is not None:
                masks[window] &= positions[0][:, None] - key_positions < window
        inv_freq = (
            model.rope_inv_freq(h, cfg.global_rope_base, cfg.global_rope_proportion)
            if kind == GLOBAL
            else model.rope_inv_freq(h, cfg.local_rope_base)
        )
        a = _norm(x, w("pre_attention_norm/scale"), eps)
        q = _norm(_linear(a, w("attn/q_einsum/w")).reshape(1, t, n, h), w("attn/query_norm/scale"), eps)
        q = model.apply_rope(q, positions, inv_freq)[0]  # [T, N, H]
        if sources[i] == i:
            if cfg.layer_k_eq_v(i):  # one projection read as K and as V
                k = v = _linear(a, w("attn/k_einsum/w")).reshape(1, t, kh, h)
            else:  # K and V from one [2·K·H, D] matrix
                kv = _linear(a, w("attn/kv_einsum/w")).reshape(1, t, 2, kh, h)
                k, v = kv[:, :, 0], kv[:, :, 1]
            k = model.apply_rope(_norm(k, w("attn/key_norm/scale"), eps), positions, inv_freq)
            v = _norm(v, None, eps)
            start = (jnp.int32(0), jnp.int32(0), input_pos[0], jnp.int32(0))
            k_cache = jax.lax.dynamic_update_slice(caches[f"kv_cache_k_{i}"], k.transpose(0, 2, 1, 3), start)
            v_cache = jax.lax.dynamic_update_slice(caches[f"kv_cache_v_{i}"], v.transpose(0, 2, 1, 3), start)
            out_caches[f"kv_cache_k_{i}"], out_caches[f"kv_cache_v_{i}"] = k_cache, v_cache
            kv_of[i] = (k_cache[0], v_cache[0])
        k_cache, v_cache = kv_of[sources[i]]
        attn = _attend(q.reshape(t, kh, n // kh, h), k_cache, v_cache, masks[window])
        hres = x + _norm(_linear(attn, w("attn/attn_vec_einsum/w")), w("post_attention_norm/scale"), eps)

        if cfg.num_experts:  # official names are crossed: `mlp2` is the dense MLP, `mlp` the MoE
            dense = _feed_forward(_norm(hres, w("pre_ffw2_norm/scale"), eps), w("mlp2/gating_einsum"), w("mlp2/linear"))
            routed = _moe(cfg, w, hres, _norm(hres, w("pre_ffw_norm/scale"), eps))
            f = _norm(dense, w("post_ffw2_norm/scale"), eps) + _norm(routed, w("post_ffw1_norm/scale"), eps)
        else:
            f = _feed_forward(_norm(hres, w("pre_ffw_norm/scale"), eps), w("mlp/gating_einsum"), w("mlp/linear"))
        hres = hres + _norm(f, w("post_ffw_norm/scale"), eps)

        if per_layer is not None:
            with jax.named_scope(f"per_layer_input_{i}"):  # quantization recipes keep these at 8 bits
                g = jax.nn.gelu(_linear(hres, w("per_layer_input_gate/w")), approximate=True) * per_layer[:, i]
                u = _linear(g, w("per_layer_projection/w"))
            hres = hres + _norm(u, w("post_per_layer_input_norm/scale"), eps)
        x = hres * jnp.asarray(w("skip_scale"))

    x = _norm(x, weights["final_norm/scale"], eps)
    logits = _linear(x, weights[LM_HEAD])  # the tied embedding: [T, V]
    if cfg.final_logit_softcap is not None:
        logits = jax.lax.optimization_barrier(logits)
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return {"logits": logits[None]} | out_caches


def per_layer_rows(config: Gemma4Config, table, token_ids):
    """The PLE model: token ids [1, T] -> [1, T, L, P] table rows times sqrt(P) (the token part of PLE)."""
    rows = _lookup(table, model.per_layer_token_ids(config, token_ids[0]))
    rows = rows * jnp.asarray(math.sqrt(config.per_layer_input_dim), jnp.float32)
    return rows.reshape(1, token_ids.shape[1], config.num_layers, config.per_layer_input_dim)
