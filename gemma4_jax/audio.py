"""The Gemma 4 audio tower (E2B, E4B): conformer encoder and audio embedder as pure JAX functions.

    encode(params, features [B, T, 128], mask [B, T], config)  -> (embeddings [B, T', 1536], mask [B, T'])
    project(params, embeddings, config)                        -> soft tokens [B, T', D]
    audio_soft_tokens(params, features, mask, config)          -> both, = HF `get_audio_features(...).pooler_output`
    valid_tokens(tokens, mask)                                 -> [N, D], the padding frames dropped as HF does

`params` is the official Flax tree (spec §5.1): `audio_encoder/...` plus `embedder/audio_input_projection/w`, the
conformer layers under the literal keys `"conformer/stacked_layers_{i}"` (the Flax module name contains the `/`);
its leaves, HF names and init are in `gemma4_jax.param_spec`.
Features come from `gemma4_jax.audio_features`. T' = ceil(ceil(T / 2) / 2): one token per 40 ms.

Numerics follow transformers 5.23 (`Gemma4AudioModel`, `Gemma4MultimodalEmbedder`) wherever the references
disagree, and the parity tests hold us to it:
- attention context (spec §6 #11): a query sees itself and the previous `attention_context_left - 2` = 11 frames
  (12 keys), not the 13 keys of the JAX OSS code; the relative-position table has `context // 2 + 1` = 13
  sinusoids (distances 12..0) and is "rel-shifted" exactly as HF does;
- masked logits are `attention_invalid_logits_value` (-1e9) after the soft cap, so a query whose whole window is
  padding gets uniform weights (HF semantics; such queries are padding frames and dropped later);
- the embedder normalises first (scale-less RMSNorm over 1536) and then projects (spec §6 #8, HF order; the
  JAX OSS code projects first);
- padded frames are not zeroed inside the encoder (JAX zeroes them after each attention block). They cannot reach
  valid frames either way: attention masks them, the depthwise convolution is causal and padding sits at the
  end, and the sub-sampling zeroes them before each convolution. `valid_tokens` drops them like HF's
  `audio_features[mask]`.

The compute dtype is the parameters' dtype (the official checkpoint keeps the audio tower in float32). Norms,
attention logits/softmax and the depthwise convolution accumulate in >= float32, as HF does (it upcasts q, k, v).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.config import AudioConfig
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import _accum_dtype, dense, einsum, rms_norm
from gemma4_jax.param_spec import AUDIO_LAYER as LAYER

ENCODER = "audio_encoder"

Array = jax.Array
Params = dict[str, Any]


# ----- config ------------------------------------------------------------------------------------------------


# ----- the encoder ----------------------------------------------------------------------------------------------


def _clamp(x: Array, limit: float) -> Array:
    """The conformer's +-1e10 "gradient clipping" of activations (never beyond the dtype's range)."""
    limit = min(limit, float(jnp.finfo(x.dtype).max))
    return jnp.clip(x, -limit, limit)


def _clipped(p: Params, eqn: str, x: Array, cfg: AudioConfig) -> Array:
    """A clipped linear: input clamped to [clip_input_min, clip_input_max], einsum, output clamped likewise.
    The bounds are checkpoint scalars calibrated for quantization (±inf when unused)."""
    if cfg.use_clipped_linears:
        x = jnp.clip(x, p["clip_input_min"].astype(x.dtype), p["clip_input_max"].astype(x.dtype))
    y = einsum(eqn, x, p["kernel"])
    if cfg.use_clipped_linears:
        y = jnp.clip(y, p["clip_output_min"].astype(y.dtype), p["clip_output_max"].astype(y.dtype))
    return y


def _layer_norm(x: Array, scale: Array, eps: float) -> Array:
    """Mean-centred LayerNorm with a scale and no bias (the sub-sampling's), in >= float32."""
    acc = _accum_dtype(x.dtype)
    xf = x.astype(acc)
    centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps) * scale.astype(acc)).astype(x.dtype)


def _subsample(p: Params, x: Array, mask: Array, cfg: AudioConfig) -> tuple[Array, Array]:
    """SSCP: two (Conv2d 3x3 stride 2 -> LayerNorm over channels -> ReLU) over (time, freq), then a linear over
    (freq, channel). Padding frames are zeroed before each convolution so they never leak into valid ones."""
    h = x[..., None]  # [B, T, F, 1]: NHWC with H = time, W = frequency
    for j in (0, 1):
        h = h * mask[:, :, None, None].astype(h.dtype)
        kernel = dense(p[f"subsampling_{j}"]["kernel"], h.dtype)  # HWIO
        h = jax.lax.conv_general_dilated(
            h, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(_layer_norm(h, p[f"norm_{j}"]["scale"], cfg.rms_norm_eps))
        mask = mask[:, ::2]  # a sub-sampled frame is valid when the centre of its kernel is
    return einsum("btfc,fcd->btd", h, p["input_proj"]["kernel"]), mask


def _ffn(p: Params, x: Array, cfg: AudioConfig) -> Array:
    """Half-step FFN: x + 0.5 * post_norm(W2 swish(W1 pre_norm(x)))."""
    eps, g = cfg.rms_norm_eps, cfg.gradient_clipping
    h = rms_norm(_clamp(x, g), p["pre_layer_norm"]["scale"], eps)
    h = jax.nn.silu(_clipped(p["ffn_layer1"], "btd,df->btf", h, cfg))
    h = _clipped(p["ffn_layer2"], "btf,fd->btd", h, cfg)
    h = rms_norm(_clamp(h, g), p["post_layer_norm"]["scale"], eps)
    return x + h * jnp.asarray(cfg.residual_weight, h.dtype)


def _relative_position_signal(cfg: AudioConfig, dtype) -> Array:
    """[P, D] sinusoids of the relative distances P-1 .. 0, channels [sin | cos], timescales 1 .. 1e4."""
    acc = _accum_dtype(dtype)
    half = cfg.hidden_size // 2
    increment = math.log(1e4) / max(half - 1, 1)
    inv_timescales = jnp.exp(jnp.arange(half, dtype=acc) * -increment)
    distances = jnp.arange(cfg.num_relative_positions - 1, -1, -1, dtype=acc)
    angles = distances[:, None] * inv_timescales[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).astype(dtype)


def _blocks(x: Array, chunk: int) -> Array:
    """[B, T, ...] -> [B, U, W, ...]: non-overlapping query blocks, zero-padded to U*W frames."""
    b, t = x.shape[:2]
    u = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, u * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, u, chunk, *x.shape[2:])


def _context(x: Array, cfg: AudioConfig) -> Array:
    """[B, T, ...] -> [B, U, C, ...]: for block u the frames u*W - max_past .. u*W + W + max_future - 1 (zeros
    outside the sequence)."""
    w, t = cfg.attention_chunk_size, x.shape[1]
    u = -(-t // w)
    x = jnp.pad(x, [(0, 0), (cfg.max_past, cfg.max_future + w - 1)] + [(0, 0)] * (x.ndim - 2))
    index = np.arange(u)[:, None] * w + np.arange(cfg.context_size)[None, :]
    return jnp.take(x, index, axis=1)


def _block_mask(mask: Array, cfg: AudioConfig) -> Array:
    """[B, U, W, C] bool: which context slot each query may attend to (HF's blocked 5-D mask).

    Query q = u*W + w, context slot c holds key k = u*W + c - max_past; allowed when the key is a valid frame and
    0 <= q - k < max_past (self + the 11 previous frames; spec §6 #11, transformers semantics), or
    0 < k - q < max_future. Queries past the end of the sequence see nothing.
    """
    t = mask.shape[1]
    w, c = cfg.attention_chunk_size, cfg.context_size
    u = -(-t // w)
    query = np.arange(u)[:, None, None] * w + np.arange(w)[None, :, None]  # [U, W, 1]
    key = np.arange(u)[:, None, None] * w + np.arange(c)[None, None, :] - cfg.max_past  # [U, 1, C]
    distance = query - key
    window = ((distance >= 0) & (distance < cfg.max_past)) | ((distance < 0) & (-distance < cfg.max_future))
    static = window & (query < t) & (key >= 0) & (key < t)  # [U, W, C]
    key_valid = mask[:, np.clip(key, 0, t - 1)]  # [B, U, 1, C]
    return static[None] & key_valid


def _rel_shift(x: Array, context: int) -> Array:
    """Transformer-XL relative shift as HF does it: [..., W, P] (P distances) -> [..., W, C], row w moved right by
    w, zero where no distance applies."""
    *lead, w, p = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, context + 1 - p)])
    x = x.reshape(*lead, w * (context + 1))[..., : w * context]
    return x.reshape(*lead, w, context)


def _local_attention(p: Params, x: Array, block_mask: Array, rel_signal: Array, cfg: AudioConfig) -> Array:
    """Chunked local self-attention with a relative-position term. x [B, T, D] -> [B, T, N, H] (x's dtype)."""
    b, t, _ = x.shape
    n, h = cfg.num_heads, cfg.head_dim
    acc = _accum_dtype(x.dtype)  # HF runs the attention in float32 whatever the weights' dtype

    def project(name):
        return _clipped(p[name], "btd,df->btf", x, cfg).astype(acc).reshape(b, t, n, h)

    q, k, v = project("query"), project("key"), project("value")
    # Learned per-channel query scale: softplus(per_dim_scale) / (sqrt(H) ln 2); keys get softplus(1) / ln 2.
    q = q * (h**-0.5 / math.log(2)) * jax.nn.softplus(p["per_dim_scale"].astype(acc))
    k = k * (math.log(1 + math.e) / math.log(2))

    q_blocks = _blocks(q, cfg.attention_chunk_size)  # [B, U, W, N, H]
    k_context, v_context = _context(k, cfg), _context(v, cfg)  # [B, U, C, N, H]
    rel = einsum("pd,dnh->pnh", rel_signal, p["relative_position_embedding"]["pos_proj"]["kernel"]).astype(acc)

    content = jnp.einsum("buwnh,bucnh->bnuwc", q_blocks, k_context)
    position = _rel_shift(jnp.einsum("buwnh,pnh->bnuwp", q_blocks, rel), cfg.context_size)
    cap = cfg.attention_logit_cap
    logits = jnp.tanh((content + position) / cap) * cap
    logits = jnp.where(block_mask[:, None], logits, jnp.asarray(cfg.attention_invalid_logit, acc))
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnuwc,bucnh->buwnh", probs, v_context)
    return out.reshape(b, -1, n, h)[:, :t].astype(x.dtype)


def _attention_block(p: Params, x: Array, block_mask: Array, rel_signal: Array, cfg: AudioConfig) -> Array:
    eps, g = cfg.rms_norm_eps, cfg.gradient_clipping
    h = rms_norm(_clamp(x, g), p["pre_norm"]["scale"], eps)
    h = _local_attention(p["self_atten"], h, block_mask, rel_signal, cfg)
    h = _clipped(p["post"], "btnh,nhd->btd", h, cfg)
    return x + rms_norm(_clamp(h, g), p["post_norm"]["scale"], eps)


def _light_conv(p: Params, x: Array, cfg: AudioConfig) -> Array:
    """x + W_end swish(conv_norm(causal depthwise conv(GLU(W_start ln(x)))))."""
    eps = cfg.rms_norm_eps
    h = _clipped(p["linear_start"], "btd,df->btf", rms_norm(x, p["ln"]["scale"], eps), cfg)
    a, gate = jnp.split(h, 2, axis=-1)
    h = a * jax.nn.sigmoid(gate)
    # Causal depthwise convolution: output t sums taps over inputs t-K+1 .. t (left zero padding K-1).
    acc = _accum_dtype(h.dtype)
    kernel = dense(p["depthwise_conv1d"]["kernel"], acc)[:, 0, :]  # [K, D]
    taps, t = kernel.shape[0], h.shape[1]
    padded = jnp.pad(h.astype(acc), ((0, 0), (taps - 1, 0), (0, 0)))
    h = sum(padded[:, j : j + t] * kernel[j] for j in range(taps)).astype(h.dtype)
    h = jax.nn.silu(rms_norm(_clamp(h, cfg.gradient_clipping), p["conv_norm"]["scale"], eps))
    return x + _clipped(p["linear_end"], "btd,df->btf", h, cfg)


def _conformer_layer(p: Params, x: Array, block_mask: Array, rel_signal: Array, cfg: AudioConfig) -> Array:
    x = _ffn(p["fflayer_start"], x, cfg)
    x = _attention_block(p["trans_atten"], x, block_mask, rel_signal, cfg)
    x = _light_conv(p["lconv"], x, cfg)
    x = _ffn(p["fflayer_end"], x, cfg)
    return rms_norm(_clamp(x, cfg.gradient_clipping), p["final_ln"]["scale"], cfg.rms_norm_eps)


def _check_inputs(features, mask, cfg: AudioConfig) -> None:
    if features.ndim != 3 or features.shape[-1] != cfg.num_mel_bins:
        raise Gemma4Error(f"audio features must be [batch, frames, {cfg.num_mel_bins}], got {tuple(features.shape)}")
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise Gemma4Error(f"audio mask must be [batch, frames] = {tuple(features.shape[:2])}, got {tuple(mask.shape)}")
    if features.shape[1] == 0:
        raise Gemma4Error("audio features have no frames")


def encode(params: Params, features: Array, mask: Array, config: AudioConfig) -> tuple[Array, Array]:
    """The audio encoder: log-mel `features` [B, T, 128] with `mask` [B, T] (True = valid frame) ->
    (embeddings [B, T', output_dim], mask [B, T']), T' = ceil(ceil(T / 2) / 2).

    Embeddings of invalid frames are computed but meaningless; they never influence valid ones.
    """
    cfg = config
    _check_inputs(features, mask, cfg)
    p = params[ENCODER]
    dtype = p["output_projection"]["bias"].dtype
    mask = jnp.asarray(mask, bool)
    x, mask = _subsample(p["feature"], jnp.asarray(features).astype(dtype), mask, cfg)
    block_mask = _block_mask(mask, cfg)
    rel_signal = _relative_position_signal(cfg, x.dtype)
    for i in range(cfg.num_layers):
        x = _conformer_layer(p[LAYER.format(i=i)], x, block_mask, rel_signal, cfg)
    out = p["output_projection"]
    return einsum("btd,do->bto", x, out["kernel"]) + out["bias"].astype(x.dtype), mask


def project(params: Params, embeddings: Array, config: AudioConfig) -> Array:
    """The audio embedder, transformers' order: scale-less RMSNorm over the 1536 encoder channels, then
    `audio_input_projection` [1536, D] (no bias). The result replaces the audio placeholder embeddings as is."""
    x = rms_norm(embeddings, None, config.rms_norm_eps)
    return einsum("...o,od->...d", x, params["embedder"]["audio_input_projection"]["w"])


def audio_soft_tokens(params: Params, features: Array, mask: Array, config: AudioConfig) -> tuple[Array, Array]:
    """`encode` then `project`: ([B, T', D] soft tokens, [B, T'] mask), HF's `get_audio_features` pooler output."""
    embeddings, mask = encode(params, features, mask, config)
    return project(params, embeddings, config), mask


def valid_tokens(tokens, mask) -> np.ndarray:
    """[B, T', D], [B, T'] -> [N, D]: the valid tokens of every clip, clip after clip (HF's `features[mask]`).

    Clip b contributes `num_audio_tokens(samples_b)` rows, the placeholders its prompt gets."""
    return np.asarray(tokens)[np.asarray(mask, bool)]
