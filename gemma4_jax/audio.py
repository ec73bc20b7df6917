"""The Gemma 4 audio tower (E2B, E4B): conformer encoder and audio embedder as pure JAX functions.

    encode(params, features [B, T, 128], mask [B, T], config)  -> (embeddings [B, T', 1536], mask [B, T'])
    project(params, embeddings, config)                        -> soft tokens [B, T', D]
    audio_soft_tokens(params, features, mask, config)          -> both, = HF `get_audio_features(...).pooler_output`
    valid_tokens(tokens, mask)                                 -> [N, D], the padding frames dropped as HF does

`params` is the official Flax tree (spec §5.1): `audio_encoder/...` plus `embedder/audio_input_projection/w`, the
conformer layers under the literal keys `"conformer/stacked_layers_{i}"` (the Flax module name contains the `/`).
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

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import _accum_dtype, dense, einsum, rms_norm, tree_get, tree_set

Array = jax.Array
Params = dict[str, Any]


# ----- config ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Architecture of the audio tower. Field defaults are transformers' `Gemma4AudioConfig` defaults (= E2B/E4B).

    `text_embed_dim` (D of the text decoder) only sizes `embedder/audio_input_projection`; HF keeps it in the
    text config. `num_mel_bins` is the front end's 128; the sub-sampling reduces it 4x (to 32).
    """

    name: str
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    subsampling_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5  # weight of each half-step FFN
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logit: float = -1e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_dim: int = 1536
    text_embed_dim: int = 1536
    num_mel_bins: int = 128

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append("hidden_size must be a multiple of num_heads")
        if self.hidden_size % 2:
            problems.append("hidden_size must be even (sin|cos relative-position signal)")
        if len(self.subsampling_channels) != 2 or min(self.subsampling_channels) < 1:
            problems.append("subsampling_channels must be two positive channel counts")
        if self.attention_chunk_size < 1 or self.attention_context_left < 1 or self.attention_context_right < 0:
            problems.append("attention chunk >= 1, context_left >= 1, context_right >= 0")
        if min(self.num_layers, self.conv_kernel_size, self.output_dim, self.text_embed_dim, self.num_mel_bins) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise Gemma4Error(f"invalid audio config {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "subsampling_channels", tuple(self.subsampling_channels))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffw_hidden(self) -> int:
        return 4 * self.hidden_size

    @property
    def subsampled_mel_bins(self) -> int:
        """Frequency rows left after the two stride-2 convolutions (128 -> 64 -> 32)."""
        f = self.num_mel_bins
        for _ in range(2):
            f = (f - 1) // 2 + 1
        return f

    @property
    def max_past(self) -> int:
        return self.attention_context_left - 1

    @property
    def max_future(self) -> int:
        return self.attention_context_right

    @property
    def context_size(self) -> int:
        """Keys gathered per block of queries (HF's `context_size`): chunk + max_past + max_future = 24."""
        return self.attention_chunk_size + self.max_past + self.max_future

    @property
    def num_relative_positions(self) -> int:
        """Sinusoids of the relative-position term: HF uses `context_size // 2 + 1` (= 13, distances 12..0)."""
        return self.context_size // 2 + 1

    def replace(self, **changes) -> AudioConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of transformers' `Gemma4AudioConfig` (HF `config.json` -> `audio_config`)."""
        c0, c1 = self.subsampling_channels
        if (c0 // 4) * c1 != self.subsampled_mel_bins * c1:
            # HF sizes `input_proj_linear` as (channels[0] // 4) * channels[1], i.e. assumes 128 channels <-> 128 bins.
            raise Gemma4Error(
                f"audio config {self.name!r} cannot be expressed for transformers: it needs "
                f"subsampling_channels[0] // 4 == {self.subsampled_mel_bins} (the sub-sampled mel bins)"
            )
        return {
            "model_type": "gemma4_audio",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "hidden_act": "silu",
            "subsampling_conv_channels": list(self.subsampling_channels),
            "conv_kernel_size": self.conv_kernel_size,
            "residual_weight": self.residual_weight,
            "attention_chunk_size": self.attention_chunk_size,
            "attention_context_left": self.attention_context_left,
            "attention_context_right": self.attention_context_right,
            "attention_logit_cap": self.attention_logit_cap,
            "attention_invalid_logits_value": self.attention_invalid_logit,
            "use_clipped_linears": self.use_clipped_linears,
            "rms_norm_eps": self.rms_norm_eps,
            "gradient_clipping": self.gradient_clipping,
            "output_proj_dims": self.output_dim,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], text_embed_dim: int, name: str = "hf") -> AudioConfig:
        """From an HF `audio_config` dict (absent keys take HF's defaults, as `config.json` omits them)."""
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise Gemma4Error(f"audio config {name!r}: hidden_act {act!r} is not supported (Gemma 4 uses silu)")
        default = cls(name)
        return cls(
            name=name,
            hidden_size=d.get("hidden_size", default.hidden_size),
            num_layers=d.get("num_hidden_layers", default.num_layers),
            num_heads=d.get("num_attention_heads", default.num_heads),
            subsampling_channels=tuple(d.get("subsampling_conv_channels", default.subsampling_channels)),
            conv_kernel_size=d.get("conv_kernel_size", default.conv_kernel_size),
            residual_weight=d.get("residual_weight", default.residual_weight),
            attention_chunk_size=d.get("attention_chunk_size", default.attention_chunk_size),
            attention_context_left=d.get("attention_context_left", default.attention_context_left),
            attention_context_right=d.get("attention_context_right", default.attention_context_right),
            attention_logit_cap=d.get("attention_logit_cap", default.attention_logit_cap),
            attention_invalid_logit=d.get("attention_invalid_logits_value", default.attention_invalid_logit),
            use_clipped_linears=d.get("use_clipped_linears", default.use_clipped_linears),
            rms_norm_eps=d.get("rms_norm_eps", default.rms_norm_eps),
            gradient_clipping=d.get("gradient_clipping", default.gradient_clipping),
            output_dim=d.get("output_proj_dims", default.output_dim),
            text_embed_dim=text_embed_dim,
        )


AUDIO_CONFIGS: dict[str, AudioConfig] = {
    # spec §4.2: the same 304.8 M-parameter encoder; only the projection into the text width differs
    "e2b": AudioConfig("e2b", text_embed_dim=1536),
    "e4b": AudioConfig("e4b", text_embed_dim=2560),
    # Tests: the full-size attention geometry (chunk 12, 12 keys) on a narrow, 2-layer tower. The first
    # sub-sampling width stays 128 because transformers sizes `input_proj_linear` from it.
    "tiny": AudioConfig(
        "tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        subsampling_channels=(128, 8),
        output_dim=48,
        text_embed_dim=32,
    ),
}


def get_audio_config(name: str) -> AudioConfig:
    try:
        return AUDIO_CONFIGS[name]
    except KeyError:
        raise Gemma4Error(f"unknown audio config {name!r}; known: {', '.join(AUDIO_CONFIGS)}") from None


# ----- the official tree <-> HF mapping -------------------------------------------------------------------------
#
# One row per parameter: (official path, HF name, transform). `{i}` in either stands for the conformer layer.
# Transforms (official -> HF; the inverse is applied when loading):
#   copy       as is (norm scales: no +1 offset; clip scalars; bias; per_dim_scale)
#   transpose  kernel [in, out] -> nn.Linear weight [out, in]
#   conv2d     [kh, kw, in, out] -> Conv2d weight [out, in, kh, kw]            (transpose 3, 2, 0, 1)
#   reverse    depthwise [K, 1, D] -> Conv1d weight [D, 1, K]                  (transpose 2, 1, 0)
#   merge_in   [a, b, out] -> [out, a*b] (input_proj [32, 32, 1024], post [8, 128, 1024])
#   merge_out  [in, a, b] -> [a*b, in]  (pos_proj [1024, 8, 128])

ENCODER = "audio_encoder"
LAYER = "conformer/stacked_layers_{i}"  # one key: the Flax module name contains "/"
_TOWER = "model.audio_tower."
_HF_LAYER = _TOWER + "layers.{i}."

# (official path under `audio_encoder/`, HF name under `model.audio_tower.`, transform)
_ENCODER_ROWS = (
    ("feature/subsampling_0/kernel", "subsample_conv_projection.layer0.conv.weight", "conv2d"),
    ("feature/norm_0/scale", "subsample_conv_projection.layer0.norm.weight", "copy"),
    ("feature/subsampling_1/kernel", "subsample_conv_projection.layer1.conv.weight", "conv2d"),
    ("feature/norm_1/scale", "subsample_conv_projection.layer1.norm.weight", "copy"),
    ("feature/input_proj/kernel", "subsample_conv_projection.input_proj_linear.weight", "merge_in"),
    ("output_projection/kernel", "output_proj.weight", "transpose"),
    ("output_projection/bias", "output_proj.bias", "copy"),
)
# (official path under `audio_encoder/conformer/stacked_layers_{i}/`, HF name under `model.audio_tower.layers.{i}.`,
# transform), in the order the layer uses them.
_LAYER_ROWS = (
    ("fflayer_start/pre_layer_norm/scale", "feed_forward1.pre_layer_norm.weight", "copy"),
    ("fflayer_start/ffn_layer1/kernel", "feed_forward1.ffw_layer_1.linear.weight", "transpose"),
    ("fflayer_start/ffn_layer2/kernel", "feed_forward1.ffw_layer_2.linear.weight", "transpose"),
    ("fflayer_start/post_layer_norm/scale", "feed_forward1.post_layer_norm.weight", "copy"),
    ("trans_atten/pre_norm/scale", "norm_pre_attn.weight", "copy"),
    ("trans_atten/self_atten/query/kernel", "self_attn.q_proj.linear.weight", "transpose"),
    ("trans_atten/self_atten/key/kernel", "self_attn.k_proj.linear.weight", "transpose"),
    ("trans_atten/self_atten/value/kernel", "self_attn.v_proj.linear.weight", "transpose"),
    ("trans_atten/self_atten/per_dim_scale", "self_attn.per_dim_scale", "copy"),
    (
        "trans_atten/self_atten/relative_position_embedding/pos_proj/kernel",
        "self_attn.relative_k_proj.weight",
        "merge_out",
    ),
    ("trans_atten/post/kernel", "self_attn.post.linear.weight", "merge_in"),
    ("trans_atten/post_norm/scale", "norm_post_attn.weight", "copy"),
    ("lconv/ln/scale", "lconv1d.pre_layer_norm.weight", "copy"),
    ("lconv/linear_start/kernel", "lconv1d.linear_start.linear.weight", "transpose"),
    ("lconv/depthwise_conv1d/kernel", "lconv1d.depthwise_conv1d.weight", "reverse"),
    ("lconv/conv_norm/scale", "lconv1d.conv_norm.weight", "copy"),
    ("lconv/linear_end/kernel", "lconv1d.linear_end.linear.weight", "transpose"),
    ("fflayer_end/pre_layer_norm/scale", "feed_forward2.pre_layer_norm.weight", "copy"),
    ("fflayer_end/ffn_layer1/kernel", "feed_forward2.ffw_layer_1.linear.weight", "transpose"),
    ("fflayer_end/ffn_layer2/kernel", "feed_forward2.ffw_layer_2.linear.weight", "transpose"),
    ("fflayer_end/post_layer_norm/scale", "feed_forward2.post_layer_norm.weight", "copy"),
    ("final_ln/scale", "norm_out.weight", "copy"),
)
# The clipped linears (official ClippedEinsum scope, HF Gemma4ClippableLinear). Each has four scalars:
# official `<scope>/clip_{input,output}_{min,max}` [] <-> HF buffer `<module>.{input,output}_{min,max}` [], copied.
_CLIPPED_LINEARS = (
    ("fflayer_start/ffn_layer1", "feed_forward1.ffw_layer_1"),
    ("fflayer_start/ffn_layer2", "feed_forward1.ffw_layer_2"),
    ("trans_atten/self_atten/query", "self_attn.q_proj"),
    ("trans_atten/self_atten/key", "self_attn.k_proj"),
    ("trans_atten/self_atten/value", "self_attn.v_proj"),
    ("trans_atten/post", "self_attn.post"),
    ("lconv/linear_start", "lconv1d.linear_start"),
    ("lconv/linear_end", "lconv1d.linear_end"),
    ("fflayer_end/ffn_layer1", "feed_forward2.ffw_layer_1"),
    ("fflayer_end/ffn_layer2", "feed_forward2.ffw_layer_2"),
)
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")

# The complete table, (official path as a key tuple, HF name, transform) with `{i}` for the conformer layer: every
# leaf of `audio_param_shapes` once, every HF audio tensor (incl. the clip buffers) once.
AUDIO_HF_MAPPING: tuple[tuple[tuple[str, ...], str, str], ...] = (
    *(((ENCODER, *path.split("/")), _TOWER + name, how) for path, name, how in _ENCODER_ROWS),
    *(((ENCODER, LAYER, *path.split("/")), _HF_LAYER + name, how) for path, name, how in _LAYER_ROWS),
    *(
        ((ENCODER, LAYER, *scope.split("/"), f"clip_{bound}"), f"{_HF_LAYER}{module}.{bound}", "copy")
        for scope, module in _CLIPPED_LINEARS
        for bound in _CLIP_BOUNDS
    ),
    (("embedder", "audio_input_projection", "w"), "model.embed_audio.embedding_projection.weight", "transpose"),
)

TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda w: w,
    "transpose": lambda w: w.T,
    "conv2d": lambda w: w.transpose(3, 2, 0, 1),
    "reverse": lambda w: w.transpose(2, 1, 0),
    "merge_in": lambda w: w.reshape(-1, w.shape[-1]).T,
    "merge_out": lambda w: w.reshape(w.shape[0], -1).T,
}
FROM_HF: dict[str, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    "copy": lambda w, shape: w,
    "transpose": lambda w, shape: w.T,
    "conv2d": lambda w, shape: w.transpose(2, 3, 1, 0),
    "reverse": lambda w, shape: w.transpose(2, 1, 0),
    "merge_in": lambda w, shape: w.T.reshape(shape),
    "merge_out": lambda w, shape: w.T.reshape(shape),
}


def _expanded(cfg: AudioConfig) -> Iterator[tuple[tuple[str, ...], tuple[str, ...], str, str]]:
    """(template path, path, HF name, transform) per leaf: layers 0..L-1, clip rows only with clipped linears."""
    for template, hf_name, transform in AUDIO_HF_MAPPING:
        if template[-1].startswith("clip_") and not cfg.use_clipped_linears:
            continue
        for i in range(cfg.num_layers) if LAYER in template else [None]:
            yield template, tuple(k.format(i=i) for k in template), hf_name.format(i=i), transform


def audio_mapping(config: AudioConfig) -> list[tuple[tuple[str, ...], str, str]]:
    """`AUDIO_HF_MAPPING` expanded for `config`: (official path, HF name, transform) for every leaf."""
    return [(path, hf_name, transform) for _, path, hf_name, transform in _expanded(config)]


# ----- parameter shapes and random init ---------------------------------------------------------------------------


def _template_shapes(cfg: AudioConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Official shape of every leaf (paths with `{i}`), spec §5.1."""
    d, n, h, f, k = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.ffw_hidden, cfg.conv_kernel_size
    c0, c1 = cfg.subsampling_channels
    layer = (ENCODER, LAYER)
    shapes = {
        (ENCODER, "feature", "subsampling_0", "kernel"): (3, 3, 1, c0),
        (ENCODER, "feature", "norm_0", "scale"): (c0,),
        (ENCODER, "feature", "subsampling_1", "kernel"): (3, 3, c0, c1),
        (ENCODER, "feature", "norm_1", "scale"): (c1,),
        (ENCODER, "feature", "input_proj", "kernel"): (cfg.subsampled_mel_bins, c1, d),
        (*layer, "trans_atten", "pre_norm", "scale"): (d,),
        (*layer, "trans_atten", "self_atten", "query", "kernel"): (d, d),
        (*layer, "trans_atten", "self_atten", "key", "kernel"): (d, d),
        (*layer, "trans_atten", "self_atten", "value", "kernel"): (d, d),
        (*layer, "trans_atten", "self_atten", "per_dim_scale"): (h,),
        (*layer, "trans_atten", "self_atten", "relative_position_embedding", "pos_proj", "kernel"): (d, n, h),
        (*layer, "trans_atten", "post", "kernel"): (n, h, d),
        (*layer, "trans_atten", "post_norm", "scale"): (d,),
        (*layer, "lconv", "ln", "scale"): (d,),
        (*layer, "lconv", "linear_start", "kernel"): (d, 2 * d),
        (*layer, "lconv", "depthwise_conv1d", "kernel"): (k, 1, d),
        (*layer, "lconv", "conv_norm", "scale"): (d,),
        (*layer, "lconv", "linear_end", "kernel"): (d, d),
        (*layer, "final_ln", "scale"): (d,),
        (ENCODER, "output_projection", "kernel"): (d, cfg.output_dim),
        (ENCODER, "output_projection", "bias"): (cfg.output_dim,),
        ("embedder", "audio_input_projection", "w"): (cfg.output_dim, cfg.text_embed_dim),
    }
    for ffn in ("fflayer_start", "fflayer_end"):
        shapes[(*layer, ffn, "pre_layer_norm", "scale")] = (d,)
        shapes[(*layer, ffn, "ffn_layer1", "kernel")] = (d, f)
        shapes[(*layer, ffn, "ffn_layer2", "kernel")] = (f, d)
        shapes[(*layer, ffn, "post_layer_norm", "scale")] = (d,)
    for scope, _ in _CLIPPED_LINEARS:
        for bound in _CLIP_BOUNDS:
            shapes[(*layer, *scope.split("/"), f"clip_{bound}")] = ()
    return shapes


def _leaf_shapes(cfg: AudioConfig) -> Iterator[tuple[tuple[str, ...], tuple[int, ...], str, str]]:
    """(path, shape, HF name, transform) of every leaf, in table order."""
    templates = _template_shapes(cfg)
    for template, path, hf_name, transform in _expanded(cfg):
        yield path, templates[template], hf_name, transform


def audio_param_shapes(config: AudioConfig, dtype=jnp.float32) -> Params:
    """`{'audio_encoder': ..., 'embedder': {'audio_input_projection': {'w': ...}}}` as ShapeDtypeStructs.

    The official subtree (spec §5.1), allocation-free. `audio_encoder` alone is the 304 825 088-parameter encoder
    (incl. its output projection and the 480 clip scalars) for E2B/E4B.
    """
    tree: Params = {}
    for path, shape, _, _ in _leaf_shapes(config):
        tree_set(tree, path, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return tree


def _fan_in(path: tuple[str, ...], shape: tuple[int, ...]) -> int:
    if path[-2] in ("pos_proj", "depthwise_conv1d"):  # [D, N, H] contracts D; depthwise [K, 1, D] sums K taps
        return shape[0]
    return math.prod(shape[:-1])  # everything else contracts all but the last axis


def init_audio_params(config: AudioConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Random parameters in the official layout: weights N(0, 1/fan_in), scales 1, bias 0, per_dim_scale 0
    (softplus(0) = ln 2 makes the query scale exactly 1/sqrt(H)), clip bounds +-inf (no clipping)."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(jnp.dtype(dtype))
    tree: Params = {}
    for path, shape, _, _ in _leaf_shapes(config):
        name = path[-1]
        if name == "scale":
            value = np.ones(shape)
        elif name in ("bias", "per_dim_scale"):
            value = np.zeros(shape)
        elif name.startswith("clip_"):
            value = np.array(-np.inf if name.endswith("min") else np.inf)
        else:
            value = rng.standard_normal(shape) / math.sqrt(_fan_in(path, shape))
        tree_set(tree, path, jnp.asarray(value.astype(np_dtype)))
    return tree


# ----- HF checkpoint interchange ------------------------------------------------------------------------------------


def load_audio_from_hf(
    read: Callable[[str], np.ndarray | None], config: AudioConfig, dtype=jnp.float32, source: str = "checkpoint"
) -> Params:
    """The official audio tree from HF tensors. `read(name)` gets a full HF name (`model.audio_tower....`,
    `model.embed_audio....`) and returns a numpy array, or None when absent."""
    params: Params = {}
    missing = []
    np_dtype = np.dtype(jnp.dtype(dtype))
    for path, shape, hf_name, transform in _leaf_shapes(config):
        value = read(hf_name)
        if value is None:
            missing.append(hf_name)
            continue
        value = np.asarray(value)
        try:
            converted = FROM_HF[transform](value, shape)
        except ValueError:
            converted = None
        if converted is None or converted.shape != shape:
            raise Gemma4Error(
                f"{source}: shape mismatch for {'/'.join(path)}: {hf_name} is {value.shape}, the config expects "
                f"{shape} in the official layout"
            )
        tree_set(params, path, jnp.asarray(converted.astype(np_dtype)))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise Gemma4Error(f"{source}: missing audio tensors {', '.join(missing[:3])}{more}")
    return params


def audio_to_hf(params: Params, config: AudioConfig | None = None) -> dict[str, np.ndarray]:
    """HF name -> numpy array for every audio leaf of `params` (and the projection). Without `config`, the layer
    count and whether linears are clipped are read off the tree."""
    if config is None:
        encoder = params[ENCODER]
        layers = sum(1 for key in encoder if key.startswith("conformer/stacked_layers_"))
        clipped = "clip_input_min" in encoder["conformer/stacked_layers_0"]["fflayer_start"]["ffn_layer1"]
        config = AudioConfig("from-params", num_layers=layers, use_clipped_linears=clipped)
    out = {}
    for path, hf_name, transform in audio_mapping(config):
        out[hf_name] = np.array(TO_HF[transform](np.asarray(tree_get(params, path))), order="C")  # 0-d stays 0-d
    return out


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
