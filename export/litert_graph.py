"""The Gemma 4 forward pass as the LiteRT converter needs it: prefill/decode over an explicit KV cache.

This is `gemma4_jax.model` re-expressed, not a second model: the norms (`rms_norm`), RoPE (`rope_inv_freq`,
`apply_rope`), masks (`attention_mask`), PLE row selection (`per_layer_token_ids`) and every constant come
from there, and the weights are the checkpoint tree, only reshaped. Ops are rewritten where the StableHLO →
TFLite converter (litert-converter 0.5) fails or, worse, converts silently wrong:

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

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import model
from gemma4_jax.config import GLOBAL, Gemma4Config


def _np(w, dtype=np.float32) -> np.ndarray:
    """A weight as numpy `dtype`; 16-bit weights stored in `dtype` are not widened on the way (no f32 copy)."""
    if model.is_dense(w) and jnp.dtype(w.dtype) == jnp.dtype(dtype):
        return np.asarray(w)
    return np.asarray(model.dense(w, jnp.float32)).astype(dtype)


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


@jax.tree_util.register_dataclass
@dataclass
class GraphWeights:
    """The checkpoint tree reshaped to [out, in] matrices (numpy, host memory) for `_linear`. Matrices and
    tables are float arrays, or `Quantized` once `quantize_weights` ran."""

    embedding: object  # [V, D] lookup table
    lm_head: object  # [V, D]: the tied embedding as the output projection
    per_layer_table: object | None  # [V, L*P]
    per_layer_model_projection: object | None  # [L*P, D]
    per_layer_projection_norm: np.ndarray | None  # [P]
    final_norm: np.ndarray
    layers: list[dict[str, object]]


def graph_weights(config: Gemma4Config, params, dtype=np.float32, prepare=None, consume: bool = False) -> GraphWeights:
    """Reshapes the parameter tree; `dtype` is the storage dtype of the matrices (norm scales stay f32).

    `prepare(name, w)` (e.g. `quantizer(...)`) is applied to each matrix and table as soon as it is read (names
    as in `named_tensors`; the PLE table is passed as stored, [V, L, P]); `consume` pops each layer and table
    from `params` once read, so the source tree is freed while the prepared one grows (full-size exports)."""
    cfg = config

    def as_stored(name, w):
        return _np(w, dtype).reshape(cfg.vocab_size, -1) if name == "per_layer_table" else w

    prepare = prepare or as_stored
    emb = params["embedder"]
    d, n_layers, p = cfg.embed_dim, cfg.num_layers, cfg.per_layer_input_dim
    layers = []
    for i in range(n_layers):
        lp = params.pop(f"layer_{i}") if consume else params[f"layer_{i}"]
        attn = lp["attn"]
        n, h, kh = cfg.num_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        w = {
            "pre_attention_norm": _np(lp["pre_attention_norm"]["scale"]),
            "post_attention_norm": _np(lp["post_attention_norm"]["scale"]),
            "pre_ffw_norm": _np(lp["pre_ffw_norm"]["scale"]),
            "post_ffw_norm": _np(lp["post_ffw_norm"]["scale"]),
            "query_norm": _np(attn["query_norm"]["scale"]),
            "q": _np(attn["q_einsum"]["w"], dtype).transpose(0, 2, 1).reshape(n * h, d),
            "o": _np(attn["attn_vec_einsum"]["w"], dtype).reshape(n * h, d).T.copy(),
            "skip_scale": _np(lp["skip_scale"]),
        }
        if not cfg.is_kv_reader(i):
            w["key_norm"] = _np(attn["key_norm"]["scale"])
            if cfg.layer_k_eq_v(i):
                w["k"] = _np(attn["k_einsum"]["w"], dtype).transpose(0, 2, 1).reshape(kh * h, d)
            else:
                kv = _np(attn["kv_einsum"]["w"], dtype)  # [2, K, D, H]
                w["k"] = kv[0].transpose(0, 2, 1).reshape(kh * h, d)
                w["v"] = kv[1].transpose(0, 2, 1).reshape(kh * h, d)
        dense_mlp = lp["mlp2"] if cfg.num_experts else lp["mlp"]
        w["gating"] = _np(dense_mlp["gating_einsum"], dtype).reshape(-1, d)  # [2F, D]
        w["linear"] = _np(dense_mlp["linear"], dtype).T.copy()  # [D, F]
        if cfg.num_experts:
            moe = lp["mlp"]
            e, f = cfg.num_experts, cfg.expert_hidden
            w["router"] = _np(moe["router_logits"]["w"], dtype).T.copy()  # [E, D]
            w["router_scale"] = _np(moe["router_scale"])
            w["per_expert_scale"] = _np(moe["per_expert_scale"])
            w["expert_gating"] = _np(moe["gating_einsum"]["w"], dtype).reshape(e * 2 * f, d)
            w["expert_linear"] = _np(moe["linear"]["w"], dtype).reshape(e * f, d).T.copy()  # [D, E*F]
            for name in ("pre_ffw2_norm", "post_ffw2_norm", "post_ffw1_norm"):
                w[name] = _np(lp[name]["scale"])
        if p:
            w["ple_gate"] = _np(lp["per_layer_input_gate"]["w"], dtype).T.copy()  # [P, D]
            w["ple_projection"] = _np(lp["per_layer_projection"]["w"], dtype).T.copy()  # [D, P]
            w["post_per_layer_input_norm"] = _np(lp["post_per_layer_input_norm"]["scale"])
        del lp
        layers.append({name: prepare(f"layer_{i}.{name}", v) if name in MATRICES else v for name, v in w.items()})
    table = plm = plnorm = None
    if p:
        if "per_layer_embeddings" in emb:
            raw = emb.pop("per_layer_embeddings") if consume else emb["per_layer_embeddings"]
            table = prepare("per_layer_table", raw)  # as stored: a quantizer reads it in row chunks
            del raw
        plm = _np(emb["per_layer_model_projection"]["w"], dtype).reshape(d, n_layers * p).T.copy()
        plm = prepare("per_layer_model_projection", plm)
        plnorm = _np(emb["per_layer_projection_norm"]["scale"])
    embedding = _np(emb.pop("input_embedding") if consume else emb["input_embedding"], dtype)
    return GraphWeights(
        embedding=prepare("embedding", embedding),
        lm_head=prepare("lm_head", embedding),
        per_layer_table=table,
        per_layer_model_projection=plm,
        per_layer_projection_norm=plnorm,
        final_norm=_np(params["final_norm"]["scale"]),
        layers=layers,
    )


# The [out, in] matrices of FULLY_CONNECTED ops, and those kept at >= 8 bits (the per-layer-input projections:
# 4 bits there roughly doubles the error).
MATRICES = (
    "q",
    "k",
    "v",
    "o",
    "gating",
    "linear",
    "router",
    "expert_gating",
    "expert_linear",
    "ple_gate",
    "ple_projection",
)
PLE_MATRICES = ("ple_gate", "ple_projection")
# Bits of the quantized lookup tables (embedding, PLE table): GATHER reads int8 rows, dequantized in the graph.
TABLE_BITS = 8
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
    """The `prepare` of a quantized export (see `graph_weights`): FULLY_CONNECTED weights at `bits` (the
    per-layer-input projections at max(bits, ple_bits)), lookup tables int8 per row (the PLE table per row and
    layer: its layers' rows differ in scale)."""

    def prepare(name: str, w) -> Quantized:
        if name == "embedding":
            return quantize_rows(w, TABLE_BITS, groups=1)
        if name == "per_layer_table":
            return quantize_rows(w, TABLE_BITS, groups=config.num_layers)
        ple = name == "per_layer_model_projection" or name.split(".")[-1] in PLE_MATRICES
        return quantize_rows(w, max(bits, ple_bits) if ple else bits)

    return prepare


def named_tensors(weights: GraphWeights) -> dict[str, object]:
    """The big tensors by signature-input name: `layer_{i}.{q,k,...}`, `per_layer_model_projection`, `lm_head`
    (FULLY_CONNECTED weights), `embedding`, `per_layer_table` (lookup tables)."""
    out = {}
    for i, w in enumerate(weights.layers):
        out |= {f"layer_{i}.{name}": w[name] for name in MATRICES if name in w}
    if weights.per_layer_model_projection is not None:
        out["per_layer_model_projection"] = weights.per_layer_model_projection
    out["lm_head"] = weights.lm_head
    out["embedding"] = weights.embedding
    if weights.per_layer_table is not None:
        out["per_layer_table"] = weights.per_layer_table
    return out


def with_tensors(weights: GraphWeights, tensors: dict[str, object]) -> GraphWeights:
    """`weights` with the named tensors (see `named_tensors`) replaced, e.g. by a signature's inputs."""
    layers = [dict(w) for w in weights.layers]
    top = {}
    for name, value in tensors.items():
        if name.startswith("layer_"):
            i, key = name[len("layer_") :].split(".")
            layers[int(i)][key] = value
        else:
            top[name] = value
    return dataclasses.replace(weights, layers=layers, **top)


def _linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w[out, in].T in float32 (16-bit or `Quantized` weights are widened inside the graph)."""
    if isinstance(w, Quantized):
        # The barrier ties the dequantization to x: XLA would otherwise hoist every layer's dequantized float
        # matrix to the start of the program and hold them all (the JAX reference of a quantized E2B).
        x, values = jax.lax.optimization_barrier((x, jnp.asarray(w.values)))
        w = values.astype(jnp.float32) * jnp.asarray(w.scale)[:, None]
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
    """Dense-expert MoE equal to `model.MoE` (routing on the un-normed residual; experts read `x`)."""
    d, e, f, top_k = cfg.embed_dim, cfg.num_experts, cfg.expert_hidden, cfg.num_experts_per_token
    routed = _norm(residual, None, cfg.rms_norm_eps) * (jnp.asarray(w["router_scale"]) * d**-0.5)
    probs = jax.nn.softmax(_linear(routed, w["router"]), axis=-1)  # [T, E]
    # Rank of each expert = how many experts beat it (ties go to the lower index, as lax.top_k orders them).
    above = probs[:, None, :] > probs[:, :, None]  # [T, e, j]: j beats e
    tied_lower = (probs[:, None, :] == probs[:, :, None]) & (jnp.arange(e)[None, :] < jnp.arange(e)[:, None])[None]
    rank = jnp.sum((above | tied_lower).astype(jnp.float32), axis=-1)
    chosen = jnp.where(rank < top_k, probs, 0.0)
    weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * jnp.asarray(w["per_expert_scale"])
    gate_up = _linear(x, w["expert_gating"]).reshape(x.shape[0], e, 2, f)
    act = jax.nn.gelu(gate_up[:, :, 0], approximate=True) * gate_up[:, :, 1]  # [T, E, F]
    return _linear((act * weights[:, :, None]).reshape(x.shape[0], e * f), w["expert_linear"])


def cache_names(config: Gemma4Config) -> list[str]:
    """Input/output names of the KV cache tensors, owners only (KV-shared readers have none)."""
    names = []
    for i in range(config.num_layers):
        if not config.is_kv_reader(i):
            names += [f"kv_cache_k_{i}", f"kv_cache_v_{i}"]
    return names


def cache_shapes(config: Gemma4Config, cache_len: int) -> dict[str, tuple[int, ...]]:
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


def step(config: Gemma4Config, weights: GraphWeights, tokens, input_pos, per_layer_rows, caches: dict, embeddings=None):
    """One prefill or decode call. tokens [1, T] int32 (or None and `embeddings` [1, T, D] from `embed`),
    input_pos [T] int32 (consecutive positions), per_layer_rows [1, T, L, P] (the PLE model's output) or None,
    caches {name: [1, K, S, H]}.

    Returns ({"logits": [1, T, V]} | updated caches).
    """
    cfg, eps = config, config.rms_norm_eps
    x = (embed(cfg, weights.embedding, tokens) if embeddings is None else embeddings)[0]  # [T, D]
    t = x.shape[0]
    positions = input_pos[None, :]  # [1, T]

    per_layer = None
    if cfg.per_layer_input_dim:
        n_layers, p = cfg.num_layers, cfg.per_layer_input_dim
        with jax.named_scope("per_layer_input_context"):
            context = _linear(x, weights.per_layer_model_projection)
        context = context.reshape(t, n_layers, p) * cfg.embed_dim**-0.5
        context = _norm(context, weights.per_layer_projection_norm, eps)
        per_layer = (context + per_layer_rows[0]) * 2**-0.5  # [T, L, P]

    cache_len = next(iter(caches.values())).shape[2]
    key_positions = jnp.arange(cache_len, dtype=jnp.int32)[None, :]
    masks = {}
    out_caches = {}
    kv_of: dict[int, tuple] = {}
    sources = cfg.kv_source_layers
    for i, kind in enumerate(cfg.layer_types):
        w = weights.layers[i]
        h, kh, n = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_heads
        window = cfg.layer_window(i)
        if window not in masks:
            masks[window] = model.attention_mask(positions, key_positions, window)[0]  # [T, S]
        inv_freq = (
            model.rope_inv_freq(h, cfg.global_rope_base, cfg.global_rope_proportion)
            if kind == GLOBAL
            else model.rope_inv_freq(h, cfg.local_rope_base)
        )
        a = _norm(x, w["pre_attention_norm"], eps)
        q = _norm(_linear(a, w["q"]).reshape(1, t, n, h), w["query_norm"], eps)
        q = model.apply_rope(q, positions, inv_freq)[0]  # [T, N, H]
        if sources[i] == i:
            k = _linear(a, w["k"]).reshape(1, t, kh, h)
            v = k if "v" not in w else _linear(a, w["v"]).reshape(1, t, kh, h)
            k = model.apply_rope(_norm(k, w["key_norm"], eps), positions, inv_freq)
            v = _norm(v, None, eps)
            start = (jnp.int32(0), jnp.int32(0), input_pos[0], jnp.int32(0))
            k_cache = jax.lax.dynamic_update_slice(caches[f"kv_cache_k_{i}"], k.transpose(0, 2, 1, 3), start)
            v_cache = jax.lax.dynamic_update_slice(caches[f"kv_cache_v_{i}"], v.transpose(0, 2, 1, 3), start)
            out_caches[f"kv_cache_k_{i}"], out_caches[f"kv_cache_v_{i}"] = k_cache, v_cache
            kv_of[i] = (k_cache[0], v_cache[0])
        k_cache, v_cache = kv_of[sources[i]]
        attn = _attend(q.reshape(t, kh, n // kh, h), k_cache, v_cache, masks[window])
        hres = x + _norm(_linear(attn, w["o"]), w["post_attention_norm"], eps)

        if cfg.num_experts:
            dense_out = _feed_forward(_norm(hres, w["pre_ffw2_norm"], eps), w["gating"], w["linear"])
            routed = _moe(cfg, w, hres, _norm(hres, w["pre_ffw_norm"], eps))
            f = _norm(dense_out, w["post_ffw2_norm"], eps) + _norm(routed, w["post_ffw1_norm"], eps)
        else:
            f = _feed_forward(_norm(hres, w["pre_ffw_norm"], eps), w["gating"], w["linear"])
        hres = hres + _norm(f, w["post_ffw_norm"], eps)

        if per_layer is not None:
            with jax.named_scope(f"per_layer_input_{i}"):  # quantization recipes keep these at 8 bits
                g = jax.nn.gelu(_linear(hres, w["ple_gate"]), approximate=True) * per_layer[:, i]
                u = _linear(g, w["ple_projection"])
            hres = hres + _norm(u, w["post_per_layer_input_norm"], eps)
        x = hres * jnp.asarray(w["skip_scale"])

    x = _norm(x, weights.final_norm, eps)
    logits = _linear(x, weights.lm_head)  # the tied embedding: [T, V]
    if cfg.final_logit_softcap is not None:
        logits = jax.lax.optimization_barrier(logits)
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return {"logits": logits[None]} | out_caches


def per_layer_rows(config: Gemma4Config, table, token_ids):
    """The PLE model: token ids [1, T] -> [1, T, L, P] table rows times sqrt(P) (the token part of PLE)."""
    rows = _lookup(table, model.per_layer_token_ids(config, token_ids[0]))
    rows = rows * jnp.asarray(math.sqrt(config.per_layer_input_dim), jnp.float32)
    return rows.reshape(1, token_ids.shape[1], config.num_layers, config.per_layer_input_dim)
