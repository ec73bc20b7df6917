"""The Gemma 4 vision encoder (a ViT over 16x16 patches) and its projection into the text embedding space.

`encode(params, patches, positions, config) -> (soft_tokens, valid)` is a pure function over the official
`vision_encoder` subtree (spec §5.1: layers stacked on axis 0, clip scalars per layer); `project` is the
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

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import _MASKED, Params, _accum_dtype, apply_rope, einsum, rms_norm, tree_get, tree_set

Array = jax.Array

PATCH_VALUES = 16 * 16 * 3  # one RGB patch, (row, col, channel) order
PAD_POSITION = -1  # positions (x, y) of padding patches


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Architecture of one Gemma 4 vision encoder (spec §4.1).

    Attention is multi-head (as many K/V heads as query heads) with head dim `width // num_heads`, as in the
    official module (`key_size = d_model // num_heads`).
    """

    name: str
    width: int  # d_v
    num_layers: int
    num_heads: int
    ffw_hidden: int
    patch_size: int = 16
    position_table_size: int = 10_240  # rows of each of the x and y position tables
    pooling_kernel: int = 3  # soft token = average of a kernel x kernel block of patches
    clipped_linears: bool = False  # E2B/E4B: every linear clamps its input and output
    standardize: bool = False  # 31B/26B-A4B: (x - bias) * scale after pooling
    rope_base: float = 100.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        problems = []
        if self.width % self.num_heads:
            problems.append("width must be a multiple of num_heads")
        elif self.head_dim % 4:
            problems.append("head_dim must be a multiple of 4 (2-D RoPE rotates two half-split halves)")
        if self.pooling_kernel != 3:
            problems.append("pooling_kernel must be 3 (spec §6 #13)")
        if min(self.num_layers, self.ffw_hidden, self.patch_size, self.position_table_size) < 1:
            problems.append("num_layers, ffw_hidden, patch_size and position_table_size must be >= 1")
        if problems:
            raise Gemma4Error(f"invalid vision config {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_values(self) -> int:
        return self.patch_size * self.patch_size * 3

    @property
    def exit_scale(self) -> float:
        """The pooled soft tokens are multiplied by sqrt(width) (27.7128 / 33.9411)."""
        return math.sqrt(self.width)

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)

    # ----- HF `Gemma4VisionConfig` interchange ---------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of transformers' `Gemma4VisionConfig` (the `vision_config` of a Gemma 4 config.json)."""
        return {
            "model_type": "gemma4_vision",
            "hidden_size": self.width,
            "intermediate_size": self.ffw_hidden,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_base},
            "pooling_kernel_size": self.pooling_kernel,
            "patch_size": self.patch_size,
            "position_embedding_size": self.position_table_size,
            "use_clipped_linears": self.clipped_linears,
            "standardize": self.standardize,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], name: str = "hf") -> VisionConfig:
        """Reads a `Gemma4VisionConfig` dict (or a whole Gemma 4 config.json with a `vision_config`)."""
        if "vision_config" in d:
            if not isinstance(d["vision_config"], Mapping):
                raise Gemma4Error("config.json has no vision_config (a text-only model)")
            d = d["vision_config"]
        if d.get("model_type", "gemma4_vision") != "gemma4_vision":
            raise Gemma4Error(f"vision_config describes a {d['model_type']!r} model, not a Gemma 4 vision encoder")
        try:
            width, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            unsupported = {
                "hidden_activation": ("gelu_pytorch_tanh", d.get("hidden_activation", "gelu_pytorch_tanh")),
                "attention_bias": (False, bool(d.get("attention_bias") or False)),
                "num_key_value_heads": (heads, int(d.get("num_key_value_heads", heads))),
                "head_dim": (width // heads, int(d.get("head_dim") or width // heads)),
                "rope_type": ("axial", (d.get("rope_parameters") or {}).get("rope_type", "axial")),
            }
            for key, (want, got) in unsupported.items():
                if got != want:
                    raise Gemma4Error(f"vision_config: {key}={got!r} is not supported (Gemma 4 uses {want!r})")
            return cls(
                name=name,
                width=width,
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                ffw_hidden=int(d["intermediate_size"]),
                patch_size=int(d.get("patch_size", 16)),
                position_table_size=int(d.get("position_embedding_size", 10_240)),
                pooling_kernel=int(d.get("pooling_kernel_size") or 3),
                clipped_linears=bool(d.get("use_clipped_linears", False)),
                standardize=bool(d.get("standardize", False)),
                rope_base=float((d.get("rope_parameters") or {}).get("rope_theta", 100.0)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            )
        except KeyError as e:
            raise Gemma4Error(f"vision_config is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise Gemma4Error(f"vision_config has an invalid value: {e}") from None


# ----- presets (spec §4.1) ---------------------------------------------------------------------------------

E2B_VISION = VisionConfig(name="e2b", width=768, num_layers=16, num_heads=12, ffw_hidden=3072, clipped_linears=True)
E4B_VISION = E2B_VISION.replace(name="e4b")
G31B_VISION = VisionConfig(name="31b", width=1152, num_layers=27, num_heads=16, ffw_hidden=4304, standardize=True)
G26B_A4B_VISION = G31B_VISION.replace(name="26b_a4b")
# Toy encoders with the features of each family; head dims 16 and 24 keep 4 and 6 RoPE frequencies per axis.
TINY_VISION = VisionConfig(name="tiny", width=32, num_layers=2, num_heads=2, ffw_hidden=64, clipped_linears=True)
TINY_VISION_STD = VisionConfig(name="tiny_std", width=48, num_layers=3, num_heads=2, ffw_hidden=80, standardize=True)

VISION_PRESETS: dict[str, VisionConfig] = {
    c.name: c for c in (E2B_VISION, E4B_VISION, G31B_VISION, G26B_A4B_VISION, TINY_VISION, TINY_VISION_STD)
}


def get_vision_config(name: str) -> VisionConfig:
    key = name.lower().replace("-", "_")
    if key not in VISION_PRESETS:
        raise Gemma4Error(f"unknown vision variant {name!r}; choose one of: {', '.join(VISION_PRESETS)}")
    return VISION_PRESETS[key]


# ----- parameters ------------------------------------------------------------------------------------------

_CLIPS = ("clip_input_min", "clip_input_max", "clip_output_min", "clip_output_max")
_CLIPPED_EINSUMS = (("attn", "q_einsum"), ("attn", "kv_einsum"), ("attn", "attn_vec_einsum"))
_CLIPPED_EINSUMS += (("mlp", "gating_einsum"), ("mlp", "linear"))


def _shape_table(config: VisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Official leaf path (inside `vision_encoder`) -> shape. Stacked block leaves lead with the layer axis."""
    c = config
    n_layers, d, n, h, f = c.num_layers, c.width, c.num_heads, c.head_dim, c.ffw_hidden
    block = ("transformer", "stacked_layers", "block")
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {
        ("entry", "input_projection", "w"): (c.patch_values, d),
        ("entry", "pos_emb"): (c.position_table_size, 2, d),
        (*block, "pre_attention_norm", "scale"): (n_layers, d),
        (*block, "attn", "q_einsum", "w"): (n_layers, n, d, h),
        (*block, "attn", "kv_einsum", "w"): (n_layers, 2, n, d, h),
        (*block, "attn", "query_norm", "scale"): (n_layers, h),
        (*block, "attn", "key_norm", "scale"): (n_layers, h),
        (*block, "attn", "attn_vec_einsum", "w"): (n_layers, n, h, d),
        (*block, "post_attention_norm", "scale"): (n_layers, d),
        (*block, "pre_ffw_norm", "scale"): (n_layers, d),
        (*block, "mlp", "gating_einsum", "w"): (n_layers, 2, f, d),
        (*block, "mlp", "linear", "w"): (n_layers, f, d),
        (*block, "post_ffw_norm", "scale"): (n_layers, d),
    }
    if c.clipped_linears:
        for scope in _CLIPPED_EINSUMS:
            for clip in _CLIPS:
                shapes[(*block, *scope, clip)] = (n_layers,)
    if c.standardize:
        shapes[("standardize", "bias")] = (d,)
        shapes[("standardize", "scale")] = (d,)
    return shapes


def vision_param_shapes(config: VisionConfig, dtype=jnp.float32) -> Params:
    """The official `vision_encoder` subtree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
    tree: Params = {}
    for path, shape in _shape_table(config).items():
        tree_set(tree, path, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return tree


def init_vision_params(config: VisionConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Random `vision_encoder` parameters: weights ~ N(0, 1/fan_in), position tables ~ N(0, 0.02²), norm and
    standardize scales 1, standardize bias 0, clips unbounded (±inf, the official initial values)."""
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(jnp.dtype(dtype))
    tree: Params = {}
    for path, shape in _shape_table(config).items():
        name = path[-2] if path[-1] == "w" else path[-1]
        if name in ("scale",):
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        elif name.startswith("clip_"):
            value = np.full(shape, -np.inf if name.endswith("_min") else np.inf)
        elif name == "pos_emb":
            value = 0.02 * rng.standard_normal(shape)
        else:
            # contracted axes of the official layouts: [M, d], [L, N, d, H], [L, 2, N, d, H], [L, N, H, d],
            # [L, 2, F, d] (contracts d), [L, F, d] (contracts F)
            if name == "attn_vec_einsum":
                fan_in = shape[-3] * shape[-2]
            else:
                fan_in = shape[-1] if name == "gating_einsum" else shape[-2]
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
        tree_set(tree, path, jnp.asarray(value.astype(np_dtype)))
    return tree


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

    params: the official `vision_encoder` subtree. patches: [B, P, 768] pixel values in [0, 1] (row, col,
    channel order, see `gemma4_jax.image`); positions: [B, P, 2] int (x = column, y = row; (-1, -1) = padding);
    P must be a multiple of 9 (9 x the soft-token budget). Returns (soft tokens [B, P/9, d] in the parameter
    dtype, valid [B, P/9] bool). The valid tokens of an image are its first `(H'/48)(W'/48)` slots, in
    row-major order; the other slots are zero.
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
    x = (2 * (patches - 0.5)).astype(dtype)
    x = einsum("bpm,md->bpd", x, w_in)
    table = entry["pos_emb"]
    xy = jnp.maximum(positions, 0)
    pos = jnp.take(table[:, 0], xy[..., 0], axis=0) + jnp.take(table[:, 1], xy[..., 1], axis=0)
    x = x + jnp.where(valid[..., None], pos.astype(dtype), 0)

    def layer(x, layer_params):
        return _block(x, layer_params, positions, valid, c), None

    x, _ = jax.lax.scan(layer, x, params["transformer"]["stacked_layers"]["block"])

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


# ----- official tree <-> HF names (spec §5.3) -----------------------------------------------------------------
#
# One row per official leaf: (official path from the checkpoint root, HF names relative to the `model.` prefix
# of Gemma4ForConditionalGeneration with `{i}` = layer, layout transform, when present). Rows whose path runs
# through `stacked_layers` have a leading layer axis that becomes one HF tensor per layer ({i} = 0..L-1); the
# transform then applies to each layer's slice. Transforms (official -> HF; each has an exact inverse):
#   copy        as is
#   transpose   [in, out] -> Linear [out, in]
#   swap01      pos_emb [10240, 2, d] -> position_embedding_table [2, 10240, d]
#   heads_in    [N, d, H] -> Linear [N*H, d]
#   kv          [2, N, d, H] -> k, v Linears [N*H, d] each
#   heads_out   [N, H, d] -> Linear [d, N*H]
#   split2      [2, F, d] -> gate [F, d], up [F, d]
#   replicate   one clip scalar -> the same value in every HF projection it guards (k and v; gate and up);
#               HF -> official requires them equal
# `when`: "clipped" rows exist only with `clipped_linears` (E2B/E4B), "standardize" rows only with
# `standardize` (31B/26B-A4B).

_BLOCK = "vision_encoder/transformer/stacked_layers/block/"
_LAYER = "vision_tower.encoder.layers.{i}."
_CLIP_HF = {"clip_input_min": "input_min", "clip_input_max": "input_max"}
_CLIP_HF |= {"clip_output_min": "output_min", "clip_output_max": "output_max"}
_CLIP_TARGETS = (
    ("attn/q_einsum", ("self_attn.q_proj",)),
    ("attn/kv_einsum", ("self_attn.k_proj", "self_attn.v_proj")),
    ("attn/attn_vec_einsum", ("self_attn.o_proj",)),
    ("mlp/gating_einsum", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp/linear", ("mlp.down_proj",)),
)

VISION_HF_TABLE: list[tuple[str, tuple[str, ...], str, str | None]] = [
    ("vision_encoder/entry/input_projection/w", ("vision_tower.patch_embedder.input_proj.weight",), "transpose", None),
    ("vision_encoder/entry/pos_emb", ("vision_tower.patch_embedder.position_embedding_table",), "swap01", None),
    (_BLOCK + "pre_attention_norm/scale", (_LAYER + "input_layernorm.weight",), "copy", None),
    (_BLOCK + "attn/q_einsum/w", (_LAYER + "self_attn.q_proj.linear.weight",), "heads_in", None),
    (
        _BLOCK + "attn/kv_einsum/w",
        (_LAYER + "self_attn.k_proj.linear.weight", _LAYER + "self_attn.v_proj.linear.weight"),
        "kv",
        None,
    ),
    (_BLOCK + "attn/query_norm/scale", (_LAYER + "self_attn.q_norm.weight",), "copy", None),
    (_BLOCK + "attn/key_norm/scale", (_LAYER + "self_attn.k_norm.weight",), "copy", None),
    (_BLOCK + "attn/attn_vec_einsum/w", (_LAYER + "self_attn.o_proj.linear.weight",), "heads_out", None),
    (_BLOCK + "post_attention_norm/scale", (_LAYER + "post_attention_layernorm.weight",), "copy", None),
    (_BLOCK + "pre_ffw_norm/scale", (_LAYER + "pre_feedforward_layernorm.weight",), "copy", None),
    (
        _BLOCK + "mlp/gating_einsum/w",
        (_LAYER + "mlp.gate_proj.linear.weight", _LAYER + "mlp.up_proj.linear.weight"),
        "split2",
        None,
    ),
    (_BLOCK + "mlp/linear/w", (_LAYER + "mlp.down_proj.linear.weight",), "transpose", None),
    (_BLOCK + "post_ffw_norm/scale", (_LAYER + "post_feedforward_layernorm.weight",), "copy", None),
    *(
        (
            f"{_BLOCK}{scope}/{clip}",
            tuple(f"{_LAYER}{proj}.{hf_clip}" for proj in projs),
            "replicate" if len(projs) > 1 else "copy",
            "clipped",
        )
        for scope, projs in _CLIP_TARGETS
        for clip, hf_clip in _CLIP_HF.items()
    ),
    ("vision_encoder/standardize/bias", ("vision_tower.std_bias",), "copy", "standardize"),
    ("vision_encoder/standardize/scale", ("vision_tower.std_scale",), "copy", "standardize"),
    ("embedder/mm_input_projection/w", ("embed_vision.embedding_projection.weight",), "transpose", None),
]


def _transforms(config: VisionConfig) -> dict[str, tuple[Callable, Callable]]:
    """name -> (official -> tuple of HF arrays, HF arrays -> official), on one layer's slice."""
    n, h = config.num_heads, config.head_dim

    def heads_in_inv(w):
        return w.reshape(n, h, -1).transpose(0, 2, 1)

    def replicate_inv(*values):
        if any(not np.array_equal(values[0], v) for v in values[1:]):
            raise Gemma4Error("clip bounds of k/v (or gate/up) differ; the official tree has one per einsum")
        return values[0]

    return {
        "copy": (lambda w: (w,), lambda w: w),
        "transpose": (lambda w: (w.T,), lambda w: w.T),
        "swap01": (lambda w: (w.transpose(1, 0, 2),), lambda w: w.transpose(1, 0, 2)),
        "heads_in": (lambda w: (w.transpose(0, 2, 1).reshape(-1, w.shape[1]),), heads_in_inv),
        "kv": (
            lambda w: tuple(x.transpose(0, 2, 1).reshape(-1, x.shape[1]) for x in w),
            lambda k, v: np.stack([heads_in_inv(k), heads_in_inv(v)]),
        ),
        "heads_out": (lambda w: (w.reshape(-1, w.shape[-1]).T,), lambda w: w.T.reshape(n, h, -1)),
        "split2": (lambda w: (w[0], w[1]), lambda gate, up: np.stack([gate, up])),
        "replicate": (lambda w: (w, w), replicate_inv),
    }


@dataclasses.dataclass(frozen=True)
class VisionEntry:
    """One official leaf <-> its HF tensors (for stacked leaves: per layer, `{i}` in the names)."""

    path: tuple[str, ...]  # from the checkpoint root
    hf_names: tuple[str, ...]  # relative to `model.`
    transform: str
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    from_hf: Callable[..., np.ndarray]

    @property
    def stacked(self) -> bool:
        return "stacked_layers" in self.path


def vision_mapping(config: VisionConfig) -> list[VisionEntry]:
    """The rows of `VISION_HF_TABLE` that exist for `config`, with their transforms."""
    transforms = _transforms(config)
    flags = {None: True, "clipped": config.clipped_linears, "standardize": config.standardize}
    return [
        VisionEntry(tuple(path.split("/")), names, name, *transforms[name])
        for path, names, name, when in VISION_HF_TABLE
        if flags[when]
    ]


def vision_to_hf(params: Params, config: VisionConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name relative to `model.`, array) for every vision tensor, from the official root tree
    ({'vision_encoder': ..., 'embedder': {'mm_input_projection': ...}})."""
    for entry in vision_mapping(config):
        value = np.asarray(tree_get(params, entry.path))
        layers = range(config.num_layers) if entry.stacked else [None]
        for i in layers:
            arrays = entry.to_hf(value if i is None else value[i])
            for name, array in zip(entry.hf_names, arrays, strict=True):
                yield name.format(i=i), np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d clips 0-d


def load_vision_from_hf(
    read: Callable[[str], np.ndarray | None], config: VisionConfig, dtype=None, text_dim: int | None = None
) -> Params:
    """The official root tree {'vision_encoder': ..., 'embedder': {'mm_input_projection': {'w'}}} from HF tensors.

    `read(name)` returns the tensor `model.<name>` of a Gemma4ForConditionalGeneration checkpoint (or None if
    absent). `dtype=None` keeps the stored dtypes. `text_dim`, if given, checks the projection's output width.
    """
    shapes = _shape_table(config)
    params: Params = {}
    missing: list[str] = []
    for entry in vision_mapping(config):
        layers = range(config.num_layers) if entry.stacked else [None]
        slices = []
        for i in layers:
            names = [n.format(i=i) for n in entry.hf_names]
            arrays = [read(n) for n in names]
            if any(a is None for a in arrays):
                missing += [n for n, a in zip(names, arrays, strict=True) if a is None]
                continue
            try:
                slices.append(entry.from_hf(*[np.asarray(a) for a in arrays]))
            except ValueError:
                got = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, arrays, strict=True))
                raise Gemma4Error(f"vision tensors {got} do not fit config {config.name!r}") from None
        if len(slices) != len(layers):
            continue
        value = np.stack(slices) if entry.stacked else slices[0]
        if entry.path[0] == "vision_encoder":
            expected = shapes[entry.path[1:]]
        else:  # mm_input_projection [d, D]: D is the text model's
            expected = (config.width, text_dim or (value.shape[1] if value.ndim == 2 else -1))
        if value.shape != expected:
            raise Gemma4Error(f"shape mismatch for {'/'.join(entry.path)}: {value.shape}, config expects {expected}")
        tree_set(params, entry.path, jnp.asarray(value if dtype is None else value.astype(np.dtype(dtype))))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise Gemma4Error(f"missing vision tensors model.{', model.'.join(missing[:3])}{more}")
    return params
