"""The Gemma 4 vision encoder (a ViT over 16x16 patches) and its projection into the text embedding space.

`encode(params, patches, positions, config) -> (soft_tokens, valid)` is a pure function over the official
`vision_encoder` subtree (spec §5.1: layers stacked on axis 0, clip scalars per layer; its leaves, HF names and
init are in `gemma4_jax.param_spec`); `project` is the
multimodal embedder (scale-less RMSNorm, then `embedder/mm_input_projection/w`). Semantics are those of
Hugging Face transformers (spec §4.1, §6 #9, #13): padding patches are masked out of attention, pooling is
always 3x3 by position.

Shapes: B images, P patches per image (padded to `9 * budget`), M = 768 patch values, d width, N heads,
H head dim, F FFN hidden, L layers, T = P / 9 soft-token slots, D text width.

The compute dtype is the dtype of the parameters (official checkpoints keep the vision tower in float32);
norms, RoPE, softmaxes and the pooling accumulate in at least float32, and the pooled output is scaled
and standardized in at least float32, as transformers does.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.config import VisionConfig
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import _MASKED, Params, _accum_dtype, apply_rope, einsum, rms_norm

Array = jax.Array

PATCH_VALUES = 16 * 16 * 3  # one RGB patch, (row, col, channel) order
PAD_POSITION = -1  # positions (x, y) of padding patches


# ----- the encoder -----------------------------------------------------------------------------------------

# Queries are processed in blocks of this many patches, so a 1120-token image (10 080 patches) never holds
# a full [N, P, P] logits tensor (16 x 10 080² floats = 6.5 GB for the 31B encoder).
_QUERY_BLOCK = 2048


def _clipped(scope: Params, eqn: str, x: Array) -> Array:
    """`einsum(eqn, x, w)`, clamping the input and the output where the scope has clip scalars (E2B/E4B)."""
    if "clip_input_min" in scope:
        x = jnp.clip(x, scope["clip_input_min"].astype(x.dtype), scope["clip_input_max"].astype(x.dtype))
    y = einsum(eqn, x, scope["w"])
    if "clip_output_min" in scope:
        y = jnp.clip(y, scope["clip_output_min"].astype(y.dtype), scope["clip_output_max"].astype(y.dtype))
    return y


# XLA:CPU sums a float32 dot in one running total; over the entry's 768 patch values that rounds a few times worse
# than transformers' blocked BLAS, and the decoder amplifies it past the 5e-4 float32 logits parity on random
# weights. Partial sums over chunks of 32 values, added at the end, are as accurate as the reference.
_ENTRY_CHUNK = 32


def _entry_projection(x: Array, w: Array) -> Array:
    """[B, P, 768] patch values x [768, d] -> [B, P, d], summed in chunks of `_ENTRY_CHUNK` values."""
    chunks = range(0, x.shape[-1], _ENTRY_CHUNK)
    return sum(einsum("bpm,md->bpd", x[..., i : i + _ENTRY_CHUNK], w[i : i + _ENTRY_CHUNK]) for i in chunks)


def _rope_2d(x: Array, positions: Array, config: VisionConfig) -> Array:
    """2-D RoPE: the first half of each head rotates with x (column), the second half with y (row), each half
    as a half-split RoPE of dimension H/2 with base 100 (spec §4.1 step 4). x: [B, P, N, H]."""
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-2.0 * np.arange(half // 2, dtype=np.float64) / half)
    parts = [apply_rope(x[..., a * half : (a + 1) * half], positions[..., a], inv_freq) for a in (0, 1)]
    return jnp.concatenate(parts, axis=-1)


def _attend(q: Array, k: Array, v: Array, key_valid: Array) -> Array:
    """Bidirectional multi-head attention, scale 1.0, padding keys masked out (HF semantics, spec §6 #9).
    q, k, v: [B, P, N, H], key_valid: [B, P] -> [B, P, N, H]."""
    acc = _accum_dtype(q.dtype)
    mask = key_valid[:, None, None, :]
    out = []
    for start in range(0, q.shape[1], _QUERY_BLOCK):
        block = q[:, start : start + _QUERY_BLOCK]
        logits = jnp.einsum("btnh,bsnh->bnts", block, k, preferred_element_type=acc)
        probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1).astype(q.dtype)
        out.append(jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=acc).astype(q.dtype))
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]


def _block(x: Array, layer: Params, positions: Array, valid: Array, config: VisionConfig) -> Array:
    """One sandwich-normed encoder layer (spec §4.1 step 4). x: [B, P, d]; `layer` is one slice of the stack."""
    eps = config.rms_norm_eps
    attn, mlp = layer["attn"], layer["mlp"]

    a = rms_norm(x, layer["pre_attention_norm"]["scale"], eps)
    q = _clipped(attn["q_einsum"], "bpd,ndh->bpnh", a)
    k, v = _clipped(attn["kv_einsum"], "bpd,cndh->cbpnh", a)
    q = _rope_2d(rms_norm(q, attn["query_norm"]["scale"], eps), positions, config)
    k = _rope_2d(rms_norm(k, attn["key_norm"]["scale"], eps), positions, config)
    v = rms_norm(v, None, eps)
    a = _clipped(attn["attn_vec_einsum"], "bpnh,nhd->bpd", _attend(q, k, v, valid))
    h = x + rms_norm(a, layer["post_attention_norm"]["scale"], eps)

    f = rms_norm(h, layer["pre_ffw_norm"]["scale"], eps)
    gate, up = _clipped(mlp["gating_einsum"], "bpd,cfd->cbpf", f)
    f = _clipped(mlp["linear"], "bpf,fd->bpd", jax.nn.gelu(gate, approximate=True) * up)
    return h + rms_norm(f, layer["post_ffw_norm"]["scale"], eps)


def _pool(x: Array, positions: Array, valid: Array, config: VisionConfig) -> tuple[Array, Array]:
    """Average of each 3x3 block of patches, by position (spec §4.1 step 5, §6 #13).

    Soft token `floor(x/3) + (W/3) floor(y/3)` (W = patch columns of that image) gets a ninth of each of its
    patches; tokens no patch falls into are padding. The accumulation is in >= f32, the result is rounded to
    the compute dtype, as transformers does. x: [B, P, d] -> ([B, P/9, d], [B, P/9] bool)."""
    k = config.pooling_kernel
    length = x.shape[1] // (k * k)
    acc = _accum_dtype(x.dtype)
    xy = jnp.maximum(positions, 0)  # padding rows (zeroed below) land in token 0, as in transformers
    columns = jnp.max(xy[..., 0], axis=-1, keepdims=True) + 1
    token = xy[..., 0] // k + (columns // k) * (xy[..., 1] // k)
    weights = jax.nn.one_hot(token, length, dtype=acc) / (k * k)  # [B, P, T]
    pooled = jnp.einsum("bpt,bpd->btd", weights, jnp.where(valid[..., None], x, 0).astype(acc))
    return pooled.astype(x.dtype), jnp.any(weights != 0, axis=1)


def encode(params: Params, patches: Array, positions: Array, config: VisionConfig) -> tuple[Array, Array]:
    """Patches -> soft tokens, before the projection into the text space.

    params: the official `vision_encoder` subtree (its stacked block may also be a list of per-layer trees).
    patches: [B, P, 768] pixel values in [0, 1] (row, col, channel order, see `gemma4_jax.image`); positions:
    [B, P, 2] int (x = column, y = row; (-1, -1) = padding); P must be a multiple of 9 (9 x the soft-token
    budget). Returns (soft tokens [B, P/9, d] in the parameter dtype, valid [B, P/9] bool). The valid tokens of
    an image are its first `(H'/48)(W'/48)` slots, in row-major order; the other slots are zero.
    """
    c = config
    b, p, m = patches.shape
    if m != c.patch_values or positions.shape != (b, p, 2):
        raise Gemma4Error(
            f"patches {patches.shape} / positions {positions.shape} do not match [B, P, {c.patch_values}] / [B, P, 2]"
        )
    if p % (c.pooling_kernel**2):
        raise Gemma4Error(f"{p} patches per image: must be a multiple of {c.pooling_kernel**2} (9 x the budget)")
    entry = params["entry"]
    w_in = entry["input_projection"]["w"]
    dtype = jnp.dtype(w_in.dtype)
    positions = jnp.asarray(positions).astype(jnp.int32)
    valid = jnp.any(positions != PAD_POSITION, axis=-1)  # a patch is padding only if both coordinates are -1

    # Entry: [0, 1] -> [-1, 1] (in the pixels' dtype, then the compute dtype), linear, + x and y position rows.
    patches = jnp.asarray(patches)
    x = _entry_projection((2 * (patches - 0.5)).astype(dtype), w_in)
    table = entry["pos_emb"]
    xy = jnp.maximum(positions, 0)
    pos = jnp.take(table[:, 0], xy[..., 0], axis=0) + jnp.take(table[:, 1], xy[..., 1], axis=0)
    x = x + jnp.where(valid[..., None], pos.astype(dtype), 0)

    def layer(x, layer_params):
        return _block(x, layer_params, positions, valid, c), None

    blocks = params["transformer"]["stacked_layers"]["block"]
    if isinstance(blocks, (list, tuple)):  # one tree per layer: the LiteRT export, whose graphs have no loops
        for layer_params in blocks:
            x, _ = layer(x, layer_params)
    else:
        x, _ = jax.lax.scan(layer, x, blocks)

    # Exit: pool, then x sqrt(d) and standardization in >= f32 (the scaled values can exceed the fp16 range).
    tokens, token_valid = _pool(x, positions, valid, c)
    acc = _accum_dtype(dtype)
    tokens = tokens.astype(acc) * c.exit_scale
    if c.standardize:
        std = params["standardize"]
        tokens = (tokens - std["bias"].astype(acc)) * std["scale"].astype(acc)
    tokens = jnp.where(token_valid[..., None], tokens, 0).astype(dtype)
    return tokens, token_valid


def project(mm_input_projection: Params | Array, soft_tokens: Array, config: VisionConfig) -> Array:
    """The multimodal embedder: scale-less RMSNorm over d, then `[d, D]` (spec §4.1 step 7). Not scaled by sqrt(D).

    `mm_input_projection` is the official `embedder/mm_input_projection` scope ({'w': [d, D]}) or its weight.
    soft_tokens: [..., d] -> [..., D] in the soft tokens' dtype."""
    w = mm_input_projection["w"] if isinstance(mm_input_projection, Mapping) else mm_input_projection
    return einsum("...m,md->...d", rms_norm(soft_tokens, None, config.rms_norm_eps), w)


def image_embeddings(params: Params, patches: Array, positions: Array, config: VisionConfig) -> tuple[Array, Array]:
    """`encode` then `project`: params = {'vision_encoder': ..., 'embedder': {'mm_input_projection': ...}} (the
    official root tree). Returns (embeddings [B, P/9, D], valid [B, P/9]); padding slots are zero."""
    tokens, valid = encode(params["vision_encoder"], patches, positions, config)
    out = project(params["embedder"]["mm_input_projection"], tokens, config)
    return jnp.where(valid[..., None], out, 0), valid


def split_images(tokens: Array, valid: Array) -> list[np.ndarray]:
    """Per image, its valid soft tokens only ([n_i, ...] each, on the host): what transformers'
    `get_image_features(...).pooler_output` returns, and what replaces the image's n_i placeholder tokens."""
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    return [t[v] for t, v in zip(tokens, valid, strict=True)]
