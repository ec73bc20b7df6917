"""The Gemma 4 text decoder, top to bottom, in Flax linen.

`apply(params, tokens, positions, cache) -> (logits, cache)` is a pure function: the parameters are the
official Flax checkpoint tree (spec §5.1), the cache is a pytree, nothing is kept on the Python side.

Shapes: B batch, T query tokens, S cached keys, D width, N query heads, K KV heads, G = N/K query heads per
KV head, H head dim, F FFN hidden, L layers, P per-layer-input dim, V vocab, E experts. A position of -1
marks padding (never attended to, never cached).

The compute dtype is the dtype of the parameters (bf16, f32, or f64 under jax x64). Norms, RoPE, softmaxes and
the logits accumulate in at least float32.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import matvec, sharding
from gemma4_jax.config import GLOBAL, LOCAL, Gemma4Config

Array = jax.Array
Params = dict[str, Any]
Cache = dict[str, Any]
# The residual stream [B, T, D] on a mesh: split by example only (see `sharding.constrain`).
RESIDUAL_AXES = (sharding.BATCH, "seq", "residual")

# Masked attention logits (the reference JAX value; finite so all-masked padding rows stay NaN-free).
_MASKED = -2.3819763e38


def _accum_dtype(dtype) -> jnp.dtype:
    """At least float32: bf16 activations accumulate in f32, f64 stays f64."""
    return jnp.promote_types(dtype, jnp.float32)


# ----- weights -------------------------------------------------------------------------------------------
#
# A weight leaf of the parameter tree is either an array or a *weight object*: any pytree with
#   .shape                          the logical (official-layout) shape,
#   .dtype                          the dtype it computes in (the activations follow the embedding's),
#   .einsum(eqn, x) -> Array        the contraction `jnp.einsum(eqn, x, w)` in x's dtype,
#   .materialize(dtype) -> Array    the dense weight,
#   .reshape(*shape)                merging/splitting leading axes (the last axis stays),
# and optionally .take(ids, dtype) for embedding tables. Quantized weights (packed on device, dequantized
# inside the jitted matmul) and LoRA-adapted weights are weight objects; the model code is the same for all.


def is_dense(w) -> bool:
    return isinstance(w, (jax.Array, np.ndarray))


def einsum(eqn: str, x: Array, w) -> Array:
    """Every weight contraction of the model goes through here."""
    if not is_dense(w):
        return w.einsum(eqn, x)
    return jnp.einsum(eqn, x, w.astype(x.dtype), preferred_element_type=x.dtype)


def einsum_specs(eqn: str) -> tuple[str, str, str]:
    """The (activation, weight, output) letters of a two-operand einsum equation, spaces dropped."""
    inputs, out_spec = eqn.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    return x_spec, w_spec, out_spec


def ragged_einsum(eqn: str, x: Array, w, group_sizes: Array) -> Array:
    """A per-group `einsum` over rows sorted by group: x [M, c...] (the first `group_sizes[0]` rows belong to group
    0, ...) and w [G, ...] whose first axis is the group (the MoE experts: "md,egfd->mgf"). Weight objects (LoRA)
    contract themselves; any other weight is read through `ragged_dot_general`, once per call whatever M."""
    if not is_dense(w) and hasattr(w, "ragged_einsum"):
        return w.ragged_einsum(eqn, x, group_sizes)
    w = dense(w, x.dtype)
    x_spec, w_spec, out_spec = einsum_specs(eqn)
    rows, contracted = x_spec[0], x_spec[1:]
    kept = "".join(c for c in w_spec[1:] if c not in contracted)
    assert out_spec == rows + kept, eqn
    out_shape = tuple(w.shape[w_spec.index(c)] for c in kept)
    n_in, n_out = math.prod(x.shape[1:]), math.prod(out_shape)
    # The contracted axes are one block of w (leading or trailing after the group axis), so a reshape (free)
    # gives ragged_dot its [G, C, O] or [G, O, C] operand.
    if w_spec[1:].startswith(contracted):
        w, contract = w.reshape(w.shape[0], n_in, n_out), 1
    elif w_spec.endswith(contracted):
        w, contract = w.reshape(w.shape[0], n_out, n_in), 2
    else:
        raise NotImplementedError(f"ragged_einsum: contracted axes of {eqn} are not one block of the weight")
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [contract]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    y = jax.lax.ragged_dot_general(x.reshape(x.shape[0], n_in), w, group_sizes, dims, preferred_element_type=x.dtype)
    return y.reshape(x.shape[0], *out_shape)


def dense(w, dtype) -> Array:
    """The weight as a plain array of `dtype` (weight objects are materialized)."""
    return w.astype(dtype) if is_dense(w) else w.materialize(dtype)


def lookup(table, ids: Array, dtype) -> Array:
    """Rows `table[ids]` of an embedding table, in `dtype` (a weight object dequantizes only those rows)."""
    if is_dense(table):
        return jnp.take(table, ids, axis=0).astype(dtype)
    if hasattr(table, "take"):
        return table.take(ids, dtype)
    return jnp.take(table.materialize(dtype), ids, axis=0)


def rms_norm(x: Array, scale: Array | None, eps: float) -> Array:
    """`x * (mean(x²) + eps)^-½ * scale`, computed in >= f32. Gemma 4 uses the scale as is (no `1 + scale`)."""
    acc = _accum_dtype(x.dtype)
    xf = x.astype(acc)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(acc)
    return y.astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, proportion: float = 1.0) -> np.ndarray:
    """Inverse frequencies of half-split RoPE; p-RoPE keeps the `proportion` highest ones (spec §1.3).

    The exponent uses the full head dim, so a global layer rotates exactly the 64 pairs a full 512-dim RoPE
    would rotate fastest; the remaining pairs get frequency 0 (identity).
    """
    rotated = int(proportion * head_dim // 2)
    j = np.arange(head_dim // 2, dtype=np.float64)
    return np.where(j < rotated, base ** (-2.0 * j / head_dim), 0.0)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates pairs (x[j], x[j + H/2]) by `position * inv_freq[j]`. x: [B, T, heads, H], positions: [B, T]."""
    acc = _accum_dtype(x.dtype)
    angles = positions.astype(acc)[..., None, None] * jnp.asarray(inv_freq, acc)  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(
    query_positions: Array,
    key_positions: Array,
    sliding_window: int | None,
    query_segments: Array | None = None,
    key_segments: Array | None = None,
    query_blocks: Array | None = None,
    key_blocks: Array | None = None,
) -> Array:
    """[B, T, S] bool: key is real, not in the future, (local layers) within the last W positions, and (packed
    training sequences) in the query's segment. Keys in the query's bidirectional block (`*_blocks` >= 0: one
    image's soft tokens on 31B / 26B-A4B local layers, spec §1.7) are visible in either direction, still within
    the window as transformers applies it (keys after p_q - W)."""
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    visible = k <= q
    if query_blocks is not None:
        qb, kb = query_blocks[:, :, None], key_blocks[:, None, :]
        visible |= (qb >= 0) & (qb == kb)
    mask = (k >= 0) & visible
    if sliding_window is not None:
        mask &= q - k < sliding_window
    if query_segments is not None:
        mask &= query_segments[:, :, None] == key_segments[:, None, :]
    return mask


class KVContext(NamedTuple):
    """The keys/values one attention call sees: the cache as it was before this step, plus this step's.

    KV-shared reader layers receive their source layer's KVContext unchanged (spec §1.4), with or without a
    cache, so sharing never depends on the cache object.
    """

    k: Array  # [B, T, K, H] this step, normed + roped
    v: Array  # [B, T, K, H] this step, normed
    positions: Array  # [B, T]
    cached_k: Array | None = None  # [B, S, K, H]
    cached_v: Array | None = None
    cached_positions: Array | None = None  # [B, S]
    segments: Array | None = None  # [B, T] packed-sequence segment ids (no-cache path only)
    blocks: Array | None = None  # [B, T] bidirectional block ids of this step's keys (-1: none)


def attend(
    q: Array,
    ctx: KVContext,
    query_positions: Array,
    sliding_window: int | None,
    query_segments: Array | None = None,
    query_blocks: Array | None = None,
) -> Array:
    """Grouped-query attention with scale 1.0 and no logit soft-cap. q: [B, T, N, H] -> [B, T, N, H].

    The cached and the new keys are scored separately and share one softmax, so a step never copies the
    cache to append to it.
    """
    b, t, n, h = q.shape
    kv_heads = ctx.k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # query head n uses KV head n // G
    acc = _accum_dtype(q.dtype)
    # Bidirectional blocks are within one step (a prompt's image is prefilled in one call): cached keys have none.
    parts = [(ctx.k, ctx.v, ctx.positions, ctx.segments, ctx.blocks)]
    if ctx.cached_k is not None:
        parts.insert(0, (ctx.cached_k, ctx.cached_v, ctx.cached_positions, None, None))
    logits = []
    for k, _, key_positions, key_segments, key_blocks in parts:
        score = jnp.einsum("btkgh,bskh->btkgs", q, k.astype(q.dtype), preferred_element_type=acc)
        segments = (None, None) if key_segments is None else (query_segments, key_segments)
        blocks = (None, None) if key_blocks is None or sliding_window is None else (query_blocks, key_blocks)
        mask = attention_mask(query_positions, key_positions, sliding_window, *segments, *blocks)
        logits.append(jnp.where(mask[:, :, None, None, :], score, _MASKED))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1).astype(q.dtype)
    out = 0
    start = 0
    for _, v, key_positions, _, _ in parts:
        length = key_positions.shape[1]
        p = probs[..., start : start + length]
        out = out + jnp.einsum("btkgs,bskh->btkgh", p, v.astype(q.dtype), preferred_element_type=acc)
        start += length
    return out.reshape(b, t, n, h).astype(q.dtype)


def write_slots(positions: Array, length: int, ring: bool) -> Array:
    """Cache slot of each new token; `length` (out of range, dropped by the scatter) for tokens not stored.

    Global caches store position p at slot p. Local caches are ring buffers of W slots (p mod W) and keep only
    the newest W tokens of a step, so a prefill longer than the window writes each slot once.
    """
    keep = positions >= 0
    if ring:
        newest = jnp.max(positions, axis=1, keepdims=True)
        keep &= positions > newest - length
        slots = positions % length
    else:
        slots = positions
    return jnp.where(keep, slots, length)


def _scatter(buffer: Array, slots: Array, values: Array) -> Array:
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


# ----- modules -------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.dtype)
        return rms_norm(x, scale, self.eps)


# Modules declare parameter names and shapes only; values come from `init_params` or a checkpoint.
_WEIGHT_INIT = nn.initializers.zeros_init()


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], dtype):
    """The weight leaf `name`: an array (flax checks its shape) or a weight object (its logical shape is checked
    here, because flax compares only the first array inside a pytree)."""
    if module.has_variable("params", name):
        w = module.get_variable("params", name)
        if not is_dense(w):
            if tuple(w.shape) != tuple(shape):
                raise ValueError(f"{module.path}/{name}: weight of shape {tuple(w.shape)}, the model expects {shape}")
            return w
    return module.param(name, _WEIGHT_INIT, shape, dtype)


class Einsum(nn.Module):
    """A weight named `w` with the official layout."""

    shape: tuple[int, ...]
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, eqn: str, x: Array) -> Array:
        return einsum(eqn, x, _weight(self, "w", self.shape, self.dtype))


class Attention(nn.Module):
    config: Gemma4Config
    layer: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(
        self,
        x: Array,  # [B, T, D], pre-attention-normed
        positions: Array,  # [B, T]
        shared: KVContext | None,  # the source layer's K/V (KV-shared readers only)
        cache: dict[str, Array] | None,  # this layer's {'k', 'v'} [B, S, K, H]
        cache_positions: Array | None,  # [B, S]
        slots: Array | None,  # [B, T] where this step's K/V go in the cache
        segments: Array | None = None,  # [B, T] packed-sequence segment ids (no cache)
        blocks: Array | None = None,  # [B, T] bidirectional block ids (-1: none)
    ) -> tuple[Array, KVContext, dict[str, Array] | None]:
        cfg, i = self.config, self.layer
        d, n = cfg.embed_dim, cfg.num_heads
        h, k_heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        eps = cfg.rms_norm_eps
        inv_freq = (
            rope_inv_freq(h, cfg.global_rope_base, cfg.global_rope_proportion)
            if cfg.layer_types[i] == GLOBAL
            else rope_inv_freq(h, cfg.local_rope_base)
        )

        q = Einsum((n, d, h), self.dtype, name="q_einsum")("btd,ndh->btnh", x)
        q = apply_rope(RMSNorm(eps, self.dtype, name="query_norm")(q), positions, inv_freq)

        new_cache = None
        # Official checkpoints carry K/V weights on KV-shared reader layers too: created at init so the tree
        # matches, never used.
        if shared is None or self.is_initializing():
            if cfg.layer_k_eq_v(i):
                k = v = Einsum((k_heads, d, h), self.dtype, name="k_einsum")("btd,kdh->btkh", x)  # K, V diverge below
            else:
                k, v = Einsum((2, k_heads, d, h), self.dtype, name="kv_einsum")("btd,ckdh->cbtkh", x)
            k = apply_rope(RMSNorm(eps, self.dtype, name="key_norm")(k), positions, inv_freq)
            v = rms_norm(v, None, eps)
        if shared is not None:
            ctx = shared
        elif cache is None:
            ctx = KVContext(k, v, positions, segments=segments, blocks=blocks)
        else:
            ctx = KVContext(k, v, positions, cache["k"], cache["v"], cache_positions, blocks=blocks)
            new_cache = {"k": _scatter(cache["k"], slots, k), "v": _scatter(cache["v"], slots, v)}

        out = attend(q, ctx, positions, cfg.layer_window(i), segments, blocks)
        out = Einsum((n, h, d), self.dtype, name="attn_vec_einsum")("btnh,nhd->btd", out)
        return out, ctx, new_cache


class FeedForward(nn.Module):
    """GeGLU: `(gelu_tanh(x W_gate) * (x W_up)) W_down`. Weights sit directly in this scope (no `/w`)."""

    hidden: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        gating = _weight(self, "gating_einsum", (2, self.hidden, d), self.dtype)
        linear = _weight(self, "linear", (self.hidden, d), self.dtype)
        # One [2F, D] matmul for gate and up: slicing gating[0] / gating[1] into two einsums compiles to a
        # ~7x slower XLA:CPU kernel (measured at E2B size, f32, one token).
        gate, up = jnp.split(einsum("...d,fd->...f", x, gating.reshape(2 * self.hidden, d)), 2, axis=-1)
        return einsum("...f,fd->...d", jax.nn.gelu(gate, approximate=True) * up, linear)


class Weight(nn.Module):
    """A bare weight named `w` (the MoE expert stacks, read by `ragged_einsum`)."""

    shape: tuple[int, ...]
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self) -> Array:
        return _weight(self, "w", self.shape, self.dtype)


class MoE(nn.Module):
    """Top-k routed experts (26B-A4B), routed as HF / llama.cpp / upstream JAX do it (spec §1.6).

    The router reads the *un-normed* residual `h` (RMSNorm without scale, then `router_scale / sqrt(D)`);
    the experts read `pre_ffw_norm(h)`. Token copies are sorted by expert and run through `ragged_dot`, so
    each expert's weights are read once per call whatever the number of tokens.
    """

    config: Gemma4Config
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, residual: Array, x: Array) -> Array:  # both [..., D]
        cfg = self.config
        d, e, f, top_k = cfg.embed_dim, cfg.num_experts, cfg.expert_hidden, cfg.num_experts_per_token
        router_scale = self.param("router_scale", nn.initializers.ones_init(), (d,), self.dtype)
        per_expert_scale = self.param("per_expert_scale", nn.initializers.ones_init(), (e,), self.dtype)
        w_gating = Weight((e, 2, f, d), self.dtype, name="gating_einsum")()
        w_linear = Weight((e, f, d), self.dtype, name="linear")()

        acc = _accum_dtype(x.dtype)
        routed = rms_norm(residual, None, cfg.rms_norm_eps).astype(acc) * (router_scale.astype(acc) * d**-0.5)
        router_logits = Einsum((d, e), self.dtype, name="router_logits")("...d,de->...e", routed)
        probs = jax.nn.softmax(router_logits, axis=-1)
        top_probs, top_experts = jax.lax.top_k(probs, top_k)  # [..., k]
        weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
        weights = weights * per_expert_scale.astype(acc)[top_experts]

        # Dispatch: one row per (token, chosen expert), grouped by expert.
        x_flat = x.reshape(-1, d)
        experts = top_experts.reshape(-1)
        order = jnp.argsort(experts, stable=True)
        token_of_row = (jnp.arange(experts.shape[0]) // top_k)[order]
        group_sizes = jnp.bincount(experts, length=e).astype(jnp.int32)
        rows = x_flat[token_of_row]  # [M*k, D]
        gate_up = ragged_einsum("md,egfd->mgf", rows, w_gating, group_sizes)  # [M*k, 2, F]
        hidden = jax.nn.gelu(gate_up[:, 0], approximate=True) * gate_up[:, 1]
        out_rows = ragged_einsum("mf,efd->md", hidden, w_linear, group_sizes)
        out_rows = out_rows.astype(acc) * weights.reshape(-1)[order][:, None]
        out = jnp.zeros(x_flat.shape, acc).at[token_of_row].add(out_rows)
        return out.reshape(x.shape).astype(x.dtype)


class Block(nn.Module):
    """One decoder layer: sandwich-normed attention and FFN (or dense MLP + MoE), PLE, layer scalar (§3.2)."""

    config: Gemma4Config
    layer: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(
        self, x, positions, per_layer_input, shared, cache, cache_positions, slots, segments=None, blocks=None
    ):
        cfg, i = self.config, self.layer
        eps = cfg.rms_norm_eps

        def norm(name):
            return RMSNorm(eps, self.dtype, name=name)

        a = norm("pre_attention_norm")(x)
        a, ctx, new_cache = Attention(cfg, i, self.dtype, name="attn")(
            a, positions, shared, cache, cache_positions, slots, segments, blocks
        )
        h = x + norm("post_attention_norm")(a)

        if cfg.num_experts:
            # Official names are crossed: `mlp` is the MoE, `mlp2` the dense MLP (spec §1.6).
            dense = FeedForward(cfg.ffw_hidden, self.dtype, name="mlp2")(norm("pre_ffw2_norm")(h))
            routed = MoE(cfg, self.dtype, name="mlp")(h, norm("pre_ffw_norm")(h))
            f = norm("post_ffw2_norm")(dense) + norm("post_ffw1_norm")(routed)
        else:
            f = FeedForward(cfg.layer_ffw_hidden(i), self.dtype, name="mlp")(norm("pre_ffw_norm")(h))
        h = h + norm("post_ffw_norm")(f)

        if cfg.per_layer_input_dim:
            d, p = cfg.embed_dim, cfg.per_layer_input_dim
            g = Einsum((d, p), self.dtype, name="per_layer_input_gate")("btd,dp->btp", h)
            g = jax.nn.gelu(g, approximate=True) * per_layer_input
            u = Einsum((p, d), self.dtype, name="per_layer_projection")("btp,pd->btd", g)
            h = h + norm("post_per_layer_input_norm")(u)

        # The layer scalar multiplies the whole residual stream, not a branch (spec §6 #5).
        skip_scale = self.param("skip_scale", nn.initializers.ones_init(), (1,), self.dtype)
        return h * skip_scale.astype(h.dtype), ctx, new_cache


class Embedder(nn.Module):
    """Token embedding (tied LM head) and Per-Layer Embeddings (spec §2)."""

    config: Gemma4Config
    dtype: Any = jnp.bfloat16

    def setup(self):
        cfg = self.config
        v, d, n_layers, p = cfg.vocab_size, cfg.embed_dim, cfg.num_layers, cfg.per_layer_input_dim
        self.input_embedding = _weight(self, "input_embedding", (v, d), self.dtype)
        self.per_layer_embeddings = None
        # The PLE table may live off the device (`per_layer_tokens` then carries its rows), so it is optional.
        if p and (self.is_initializing() or self.has_variable("params", "per_layer_embeddings")):
            self.per_layer_embeddings = _weight(self, "per_layer_embeddings", (v, n_layers, p), self.dtype)
        if p:
            self.per_layer_model_projection = Einsum((d, n_layers, p), self.dtype)
            self.per_layer_projection_norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

    def encode(self, tokens: Array) -> Array:
        """[B, T] -> [B, T, D], scaled by sqrt(D) rounded to the parameter dtype (as the references do)."""
        x = lookup(self.input_embedding, tokens, self.input_embedding.dtype)
        return x * jnp.asarray(self.config.embed_scale, x.dtype)

    def per_layer_inputs(self, tokens: Array, x: Array, token_rows: Array | None = None) -> Array:
        """[B, T] tokens and their scaled embeddings -> [B, T, L, P] per-layer inputs.

        `token_rows` [B, T, L, P] are the PLE table rows of `tokens` when the table lives off the device
        (`gemma4_jax.ple`); otherwise they are gathered here.
        """
        cfg = self.config
        context = self.per_layer_model_projection("btd,dlp->btlp", x) * jnp.asarray(cfg.embed_dim**-0.5, x.dtype)
        context = self.per_layer_projection_norm(context)
        if token_rows is None:
            if self.per_layer_embeddings is None:
                raise ValueError("the PLE table is not in the parameters: pass its rows as `per_layer_tokens`")
            token_rows = lookup(self.per_layer_embeddings, per_layer_token_ids(cfg, tokens), x.dtype)
        token_part = token_rows.astype(x.dtype) * jnp.asarray(math.sqrt(cfg.per_layer_input_dim), x.dtype)
        return (context + token_part) * jnp.asarray(2**-0.5, x.dtype)

    def decode(self, x: Array) -> Array:
        """Tied LM head: [B, T, D] -> [B, T, V] logits in >= float32."""
        table = self.input_embedding
        if matvec.fused_lm_head(x, table):  # XLA:CPU: one row, or a quantized table
            return matvec.lm_head(x, table)
        if not is_dense(table):
            return table.einsum("btd,vd->btv", x).astype(_accum_dtype(x.dtype))
        return jnp.einsum("btd,vd->btv", x, table.astype(x.dtype), preferred_element_type=_accum_dtype(x.dtype))


def embedding_ids(config: Gemma4Config, tokens):
    """The embedding rows tokens read: image and audio placeholders read the pad row, filled with soft tokens or
    not (a sampled placeholder too), as transformers' multimodal model does. numpy in, numpy out."""
    if not config.multimodal:
        return tokens
    xp = np if isinstance(tokens, np.ndarray) else jnp
    placeholder = (tokens == config.image_token_id) | (tokens == config.audio_token_id)
    return xp.where(placeholder, config.pad_id, tokens)


def per_layer_token_ids(config: Gemma4Config, tokens):
    """The PLE table row of each token: ids outside the vocabulary (multimodal placeholders) use the pad row 0."""
    return jnp.where((tokens >= 0) & (tokens < config.vocab_size), tokens, 0)


class Gemma4Transformer(nn.Module):
    """The decoder. `dtype` is the dtype parameters are created in; compute follows the parameters' dtype."""

    config: Gemma4Config
    dtype: Any = jnp.bfloat16
    remat: bool = False  # recompute each layer in the backward pass (training memory)

    @nn.compact
    def __call__(
        self,
        tokens: Array,  # [B, T] int
        positions: Array,  # [B, T] int, -1 = padding
        cache: Cache | None = None,
        logits_index: Array | None = None,  # [B]: return logits only at tokens[b, logits_index[b]]
        segments: Array | None = None,  # [B, T] packed-sequence segment ids (no cache)
        per_layer_tokens: Array | None = None,  # [B, T, L, P] PLE table rows gathered off the device
        soft_tokens: Array | None = None,  # [B, T, D] embeddings from an encoder, where `soft_mask`
        soft_mask: Array | None = None,  # [B, T] bool
        blocks: Array | None = None,  # [B, T] bidirectional block ids on local layers (-1: none)
    ) -> tuple[Array, Cache | None]:
        cfg = self.config
        if segments is not None and cache is not None:
            raise ValueError("segment ids (packed sequences) are for the no-cache path")
        embedder = Embedder(cfg, self.dtype, name="embedder")
        tokens = embedding_ids(cfg, tokens)
        if soft_mask is not None:  # soft-token positions read the pad row of the PLE table (spec §6 #7)
            tokens = jnp.where(soft_mask, cfg.pad_id, tokens)
        x = embedder.encode(tokens)
        if soft_mask is not None:  # encoder embeddings replace the placeholders' as they are (not scaled by sqrt(D))
            x = jnp.where(soft_mask[..., None], soft_tokens.astype(x.dtype), x)
        x = sharding.constrain(x, RESIDUAL_AXES)
        per_layer = None
        if cfg.per_layer_input_dim:  # the context part projects the merged embeddings, soft tokens included
            per_layer = embedder.per_layer_inputs(tokens, x, per_layer_tokens)

        slots = cache_positions = new_cache = None
        if cache is not None:
            cache_positions = cache["positions"]
            slots = {
                kind: write_slots(positions, cache_positions[kind].shape[1], ring=kind == LOCAL)
                for kind in cache_positions
            }
            new_cache = {"positions": {kind: _scatter(cache_positions[kind], slots[kind], positions) for kind in slots}}

        block_cls = nn.remat(Block) if self.remat else Block
        query_blocks = blocks if cfg.vision_bidirectional else None
        sources = cfg.kv_source_layers
        contexts: dict[int, KVContext] = {}
        for i, kind in enumerate(cfg.layer_types):
            if i == cfg.first_kv_shared_layer and logits_index is not None:
                # Readers never write K/V, so only the positions whose logits are wanted go through them.
                x, positions, per_layer, segments, query_blocks = _take_rows(
                    logits_index, x, positions, per_layer, segments, query_blocks
                )
            reader = sources[i] != i
            entry = None if cache is None or reader else cache[f"layer_{i}"]
            x, ctx, new_entry = block_cls(cfg, i, self.dtype, name=f"layer_{i}")(
                x,
                positions,
                None if per_layer is None else per_layer[:, :, i],
                contexts[sources[i]] if reader else None,
                entry,
                None if cache_positions is None else cache_positions[kind],
                None if slots is None else slots[kind],
                segments,
                query_blocks,
            )
            x = sharding.constrain(x, RESIDUAL_AXES)
            if not reader:
                contexts[i] = ctx
                if new_entry is not None:
                    new_cache[f"layer_{i}"] = new_entry

        if logits_index is not None and cfg.num_kv_shared_layers == 0:
            x, positions, per_layer, segments, query_blocks = _take_rows(
                logits_index, x, positions, per_layer, segments, query_blocks
            )
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
        logits = embedder.decode(x)
        if cfg.final_logit_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits, new_cache


def _take_rows(index: Array, *arrays):
    """Per batch row b, keep position index[b] of each [B, T, ...] array (None passes through)."""
    rows = jnp.arange(index.shape[0])
    return tuple(None if a is None else a[rows, index][:, None] for a in arrays)


# ----- the functional API ----------------------------------------------------------------------------------


def init_params(config: Gemma4Config, seed: int | Array = 0, dtype=jnp.bfloat16) -> Params:
    """Random parameters in the official tree layout (spec §5.1): weights normal with std 1/sqrt(fan in), scales 1
    (each leaf as its `param_spec` entry says); the encoders in at least float32, as the official checkpoints keep
    them.

    Drawn with numpy leaf by leaf, in blocks of rows (no compilation). Each leaf
    briefly exists twice (numpy, then the JAX copy), so a full-size E2B peaks at the weights plus its largest leaf
    (~14.6 GB in bf16). `seed` is an int or a JAX PRNG key.
    """
    from gemma4_jax import param_spec

    if isinstance(seed, jax.Array):
        seed = int(jax.random.randint(seed, (), 0, 2**31 - 1))

    def draw(leaf):
        return jnp.asarray(random_leaf(seed, leaf, np.dtype(param_spec.leaf_dtype(leaf, dtype))))

    return param_spec.tree_of(config, draw)


def random_leaf(seed: int, leaf, np_dtype) -> np.ndarray:
    """One leaf (a `param_spec.Leaf`) of `init_params` as numpy, drawn in blocks of rows from the leaf's own seed
    (derived from `seed` and its path), so leaves can be drawn one at a time in any order."""
    shape, std = leaf.shape, leaf.init_std
    if std is None:
        return np.full(shape, leaf.init_value, np_dtype)
    rng = np.random.default_rng([seed, zlib.crc32(leaf.name.encode())])
    if not shape:
        return np.asarray(rng.standard_normal(np.float32) * np.float32(std), np_dtype)
    value = np.empty(shape, np_dtype)
    rows = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start), *shape[1:]), np.float32)
        value[start : start + rows] = block * np.float32(std)
    return value


def param_shapes(config: Gemma4Config, dtype=jnp.bfloat16) -> Params:
    """The whole parameter tree (text decoder and encoders) as `jax.ShapeDtypeStruct`s, without allocating
    anything; each leaf in the dtype `init_params` and the loaders give it."""
    from gemma4_jax import param_spec

    return param_spec.tree_of(config, lambda leaf: jax.ShapeDtypeStruct(leaf.shape, param_spec.leaf_dtype(leaf, dtype)))


def decoder_param_shapes(config: Gemma4Config, dtype=jnp.bfloat16) -> Params:
    """The text decoder's parameters as the Flax module declares them (what `param_spec` must agree with)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    init = lambda k, t: Gemma4Transformer(config.text_only(), dtype).init(k, t, t)["params"]  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0), tokens)


def tree_get(tree, path: tuple[str, ...]):
    """The leaf (or subtree) at `path`, e.g. ("layer_0", "attn", "q_einsum", "w")."""
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree: dict, path: tuple[str, ...], value) -> None:
    """Sets the leaf at `path`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def count_params(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def apply(
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    cache: Cache | None = None,
    *,
    config: Gemma4Config,
    logits_index: Array | None = None,
    segments: Array | None = None,
    per_layer_tokens: Array | None = None,
    soft_tokens: Array | None = None,
    soft_mask: Array | None = None,
    blocks: Array | None = None,
    remat: bool = False,
) -> tuple[Array, Cache | None]:
    """The forward pass: `(params, tokens, positions, cache) -> (logits, cache)`.

    tokens, positions: [B, T] (positions default to 0..T-1; -1 marks padding). Without a cache this is the
    training/scoring path; with one (from `init_cache`) the new K/V are written and the updated cache
    returned. Logits are [B, T, V] (or [B, 1, V] with `logits_index`), soft-capped, in >= float32.
    `segments` [B, T] (no cache) keeps packed training examples from attending to each other; give each
    example its own positions from 0. `per_layer_tokens` [B, T, L, P] are the PLE table rows of `tokens` when
    the table is kept off the device (then `params` need not contain it).

    Images and audio reach the decoder as embeddings: `soft_tokens` [B, T, D] (from `gemma4_jax.multimodal`) take
    the place of the token embeddings where `soft_mask` [B, T] is set, and `blocks` [B, T] (>= 0: one image's soft
    tokens) attend to each other in both directions on the local layers of configs with `vision_bidirectional`.
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    model = Gemma4Transformer(config, remat=remat)
    decoder = {k: v for k, v in params.items() if k not in ("vision_encoder", "audio_encoder")}
    return model.apply(
        {"params": decoder},
        tokens,
        positions,
        cache,
        logits_index,
        segments,
        per_layer_tokens,
        soft_tokens,
        soft_mask,
        blocks,
    )


def cache_lengths(config: Gemma4Config, cache_length: int) -> dict[str, int]:
    """Slots per layer type: global layers hold the whole context, local layers a ring of W."""
    lengths = {GLOBAL: cache_length, LOCAL: min(config.sliding_window, cache_length)}
    return {kind: lengths[kind] for kind in sorted(set(config.layer_types))}


def init_cache(config: Gemma4Config, batch: int, cache_length: int, dtype=jnp.bfloat16) -> Cache:
    """An empty KV cache: K and V for every layer that owns them (readers have none), positions -1."""
    lengths = cache_lengths(config, cache_length)
    cache: Cache = {"positions": {kind: jnp.full((batch, n), -1, jnp.int32) for kind, n in lengths.items()}}
    for i, kind in enumerate(config.layer_types):
        if config.is_kv_reader(i):
            continue
        shape = (batch, lengths[kind], config.layer_kv_heads(i), config.layer_head_dim(i))
        cache[f"layer_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return cache


def cache_bytes(config: Gemma4Config, cache_length: int, batch: int = 1, dtype=jnp.bfloat16) -> int:
    """K/V bytes of `init_cache` (excluding the small int32 position arrays), without allocating it."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, cache_length, dtype))
    kv = {k: v for k, v in shapes.items() if k != "positions"}
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(kv))
