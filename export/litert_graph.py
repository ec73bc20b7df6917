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
    return np.asarray(model.dense(w, jnp.float32)).astype(dtype)


@dataclass
class GraphWeights:
    """The checkpoint tree reshaped to [out, in] matrices (numpy, host memory) for `_linear`."""

    embedding: np.ndarray  # [V, D], also the tied LM head
    per_layer_table: np.ndarray | None  # [V, L*P]
    per_layer_model_projection: np.ndarray | None  # [L*P, D]
    per_layer_projection_norm: np.ndarray | None  # [P]
    final_norm: np.ndarray
    layers: list[dict[str, np.ndarray]]
    lm_head: np.ndarray | None = None  # [V, D] when it differs from `embedding` (quantized references)


def graph_weights(config: Gemma4Config, params, dtype=np.float32) -> GraphWeights:
    """Reshapes the parameter tree; `dtype` is the storage dtype of the matrices (norm scales stay f32)."""
    cfg = config
    emb = params["embedder"]
    d, n_layers, p = cfg.embed_dim, cfg.num_layers, cfg.per_layer_input_dim
    layers = []
    for i in range(n_layers):
        lp = params[f"layer_{i}"]
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
        layers.append(w)
    table = plm = plnorm = None
    if p:
        if "per_layer_embeddings" in emb:
            table = _np(emb["per_layer_embeddings"], dtype).reshape(cfg.vocab_size, n_layers * p)
        plm = _np(emb["per_layer_model_projection"]["w"], dtype).reshape(d, n_layers * p).T.copy()
        plnorm = _np(emb["per_layer_projection_norm"]["scale"])
    return GraphWeights(
        embedding=_np(emb["input_embedding"], dtype),
        per_layer_table=table,
        per_layer_model_projection=plm,
        per_layer_projection_norm=plnorm,
        final_norm=_np(params["final_norm"]["scale"]),
        layers=layers,
    )


# Matrices the quantization recipes quantize (FULLY_CONNECTED weights), and those kept at 8 bits (PLE).
QUANTIZED = ("q", "k", "v", "o", "gating", "linear", "router", "expert_gating", "expert_linear")
QUANTIZED_PLE = ("ple_gate", "ple_projection")


def fake_quantize(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel quantize + dequantize of an [out, in] matrix, as ai-edge-quantizer's
    min/max channelwise recipe does it (scale = max|w| / (2^(bits-1) - 1), round to nearest, clip)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), np.finfo(np.float32).tiny) / qmax
    return (np.clip(np.round(w / scale), -qmax - 1, qmax) * scale).astype(np.float32)


def quantized_like(weights: GraphWeights, bits: int, ple_bits: int) -> GraphWeights:
    """The weights the quantized export computes with: matmul weights at `bits`, per-layer-input projections
    at `ple_bits`, the tied LM head at `bits` while the embedding lookup stays float."""
    layers = []
    for w in weights.layers:
        w = dict(w)
        for name in QUANTIZED:
            if name in w:
                w[name] = fake_quantize(w[name], bits)
        for name in QUANTIZED_PLE:
            if name in w:
                w[name] = fake_quantize(w[name], ple_bits)
        layers.append(w)
    plm = weights.per_layer_model_projection
    return dataclasses.replace(
        weights,
        layers=layers,
        per_layer_model_projection=None if plm is None else fake_quantize(plm, ple_bits),
        lm_head=fake_quantize(weights.embedding, bits),
    )


def _linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w[out, in].T in float32 (16-bit stored weights are widened inside the graph)."""
    w = jnp.asarray(w)
    if w.dtype != jnp.float32:
        w = w.astype(jnp.float32)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


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
    x = jnp.take(jnp.asarray(table), tokens[0], axis=0).astype(jnp.float32)
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
    logits = _linear(x, weights.embedding if weights.lm_head is None else weights.lm_head)  # tied head: [T, V]
    if cfg.final_logit_softcap is not None:
        logits = jax.lax.optimization_barrier(logits)
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return {"logits": logits[None]} | out_caches


def per_layer_rows(config: Gemma4Config, table, token_ids):
    """The PLE model: token ids [1, T] -> [1, T, L, P] table rows times sqrt(P) (the token part of PLE)."""
    rows = jnp.take(jnp.asarray(table), model.per_layer_token_ids(config, token_ids[0]), axis=0)
    rows = rows.astype(jnp.float32) * jnp.asarray(math.sqrt(config.per_layer_input_dim), jnp.float32)
    return rows.reshape(1, token_ids.shape[1], config.num_layers, config.per_layer_input_dim)
