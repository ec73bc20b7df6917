"""The vision and audio towers as the LiteRT-LM engine runs them: six single-signature .tflite models.

The engine's contract (LiteRT-LM 0.18.1; `runtime/executor/vision_litert_compiled_model_executor.cc`,
`audio_litert_compiled_model_executor.cc`, `embedding_lookup_end_of_multi_modal.cc`, and litert-torch's Gemma 4
exporter), batch 1 and static shapes everywhere:

- `vision_encoder.tflite` (TF_LITE_VISION_ENCODER): `images` f32 [1, MAXP, 768] (pixels / 255, 16x16 patches
  row-major, each in (row, col, channel) order), `positions_xy` i32 [1, MAXP, 2] (x = column, y = row; padding
  rows -1) -> `features` f32 [1, MAXP/9, Dv] (`vision.encode`: pooled, standardized where the config
  standardizes; the valid tokens first), `mask` bool [1, MAXP/9].
- `vision_adapter.tflite` (TF_LITE_VISION_ADAPTER): `soft_tokens` [1, MAXP/9, Dv] -> `mm_embedding`
  [1, MAXP/9, D] (`vision.project`, not scaled by sqrt D).
- `end_of_vision.tflite` (TF_LITE_END_OF_VISION): no input -> `eoi_embedding` [1, 1, D], the embedder's (scaled)
  row of `<image|>`.
- `audio_encoder.tflite` (TF_LITE_AUDIO_ENCODER_HW): `src_inputs` f32 [1, F, 128] log-mel, `mask` bool
  [1, 1, F] -> `features` [1, F/4, Da] (`audio.encode`), `mask` bool [1, F/4].
- `audio_adapter.tflite` (TF_LITE_AUDIO_ADAPTER): `features`, `mask` -> `features` [1, F/4, D]
  (`audio.project(features) * mask`).
- `end_of_audio.tflite` (TF_LITE_END_OF_AUDIO): no input -> `eoa_embedding` [1, 1, D], the row of `<audio|>`.

Sizes: MAXP = 9 x `--image-tokens` (default 280 -> 2520 patches: transformers' default budget, which our
preprocessing and `generate` use, and the engine's default `max_num_patches`, so an image gets the same resize
and soft tokens in the engine as in JAX; Google's exporter uses 140 -> 1260, a cheaper encoder for smaller
images). F = `--audio-frames` (default 3000 = 30 s = 750 tokens, the longest clip transformers encodes): the
engine encodes longer audio as independent chunks of F frames, whose boundaries no JAX/HF forward has, so
every clip we accept is one chunk; the cost is a full 30-s encoder pass per clip (the conformer is linear in F),
which a smaller F (Google's sample: 816) trades for exactness on clips longer than F.

The graphs are our encoders (`gemma4_jax.vision`, `gemma4_jax.audio`) traced as they are; only their weights are
swapped for converter-friendly objects. Each matrix the encoders contract through `model.einsum` becomes a
`Matrix`: its [out, in] view (TFLite's FULLY_CONNECTED layout, what the dynamic-range quantizer quantizes per
output channel) fed as a signature input and bound as a constant after conversion, as the text models' weights
are (`litert.weight_inputs`); its `einsum` flattens the contracted axes and calls one 2-D matmul (an einsum with
several contracting dims converts to wrong numbers, see `litert_graph`). The vision layers are passed as a list
of per-layer trees (`vision.encode` unrolls them: the converter gets no loop). The other big tensors (the patch
projection, which `vision` reads in 32-row chunks, and the position table) are float signature inputs; vectors,
clip bounds and the small convolution kernels are constants of the converted graph.

Quantized exports store the tower matrices as int8 per output channel, as ai-edge-quantizer's dynamic recipe
writes FULLY_CONNECTED weights (`quant.policy.litert_tower_bits`: int4 exports too); the other tensors and the
end-of-media rows stay float.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import audio, vision
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.param_spec import SCALE, Leaf

MODALITIES = ("text", "vision", "audio")
# What the vision encoder takes per image: `--image-tokens` soft tokens = 9x as many 16x16 patches.
DEFAULT_IMAGE_TOKENS = 280
# Audio frames (10 ms each) per encoder call; the engine splits longer clips into independent chunks of F.
DEFAULT_AUDIO_FRAMES = 3000
_AUDIO_SHRINK = 4  # two stride-2 convolutions

# Built-in check bounds, relative to max(1, max |JAX output|). Float graphs (and the weight-only twin of an int8
# export) differ from our JAX encoder by round-off only: <= 5.3e-6 on the tiny test models, but random full-size
# weights amplify it over the layers (E2B vision encoder, 16 layers, seed 0: 1.6e-4), so the export allows 1e-3.
# The dynamic-range int8 towers also quantize activations at run time (tiny models: 0.005 .. 0.04; random E2B
# vision encoder: 0.34, its attention saturated as no trained model's is); their bound only catches broken graphs.
TOLERANCE = 1e-3
DYNAMIC_BOUND = 1.0


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A tower weight as a FULLY_CONNECTED weight: `w` is its [out, in] view ([prod(kept axes), prod(contracted
    axes)], both in stored order) — a tracer during conversion, an array, or a `litert_graph.Quantized` (the
    JAX twin of a quantized export). `axes`/`shape` are the stored (per-layer) axes and sizes."""

    w: object
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    contracts: tuple[str, ...]

    dtype = np.dtype(np.float32)

    def einsum(self, eqn: str, x):
        """`jnp.einsum(eqn, x, stored weight)` as transposes, reshapes and one `x2 @ w.T`."""
        from gemma4_jax.export.litert_graph import _linear

        inputs, out = eqn.replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
        if "..." in lhs:  # name the leading axes
            spare = [c for c in string.ascii_letters if c not in eqn][: x.ndim - len(lhs) + 3]
            lhs, out = lhs.replace("...", "".join(spare)), out.replace("...", "".join(spare))
        letter = dict(zip(self.axes, rhs, strict=True))
        size = dict(zip(rhs, self.shape, strict=True))
        contracted = [letter[a] for a in self.axes if a in self.contracts]
        kept = [letter[a] for a in self.axes if a not in self.contracts]
        lead = [c for c in lhs if c not in contracted]
        xt = jnp.transpose(x, [lhs.index(c) for c in lead + contracted])
        lead_shape = xt.shape[: len(lead)]
        y = _linear(xt.reshape(-1, math.prod(size[c] for c in contracted)).astype(jnp.float32), self.w)
        y = y.reshape(*lead_shape, *(size[c] for c in kept))
        return jnp.transpose(y, [(lead + kept).index(c) for c in out]).astype(x.dtype)


# Leaves with contracted axes that the encoders do not read through `model.einsum`.
def _is_convolution(leaf: Leaf) -> bool:
    return any(p.startswith("subsampling_") or p == "depthwise_conv1d" for p in leaf.path)


def _is_chunked(leaf: Leaf) -> bool:
    return leaf.path[:3] == ("vision_encoder", "entry", "input_projection")  # `vision._entry_projection`


def _is_weight_product(leaf: Leaf) -> bool:
    """The audio relative-position projection multiplies a constant signal: the converter does not make that a
    FULLY_CONNECTED with the weight in the weight slot, so it stays a float input."""
    return "relative_position_embedding" in leaf.path


def role(leaf: Leaf) -> str:
    """ "matrix" (a `Matrix` signature input, int8 in quantized exports), "input" (a float signature input) or
    "constant" (in the converted graph: vectors, scalars, convolution kernels)."""
    if leaf.quant == SCALE or len(leaf.shape) < 2 or _is_convolution(leaf):
        return "constant"
    if leaf.contracts and leaf.path[-1] in ("w", "kernel") and not (_is_chunked(leaf) or _is_weight_product(leaf)):
        return "matrix"
    return "input"


def tower_leaves(config, part: str) -> list[Leaf]:
    from gemma4_jax import param_spec

    return [leaf for leaf in param_spec.param_spec(config) if leaf.part == part and not leaf.unused]


def _input_names(leaf: Leaf) -> list[str]:
    """The signature input names of a leaf: one per layer of a stacked leaf."""
    if leaf.stack is None:
        return [leaf.name]
    return [f"{leaf.name}/{i}" for i in range(leaf.size(leaf.stack))]


def _stored_axes(leaf: Leaf) -> tuple[str, ...]:
    return tuple(a for a in leaf.axes if a != leaf.stack)


def _matrix_view(leaf: Leaf, value: np.ndarray) -> np.ndarray:
    """A per-layer stored value -> [out, in] (kept axes, then contracted axes, in stored order)."""
    axes = _stored_axes(leaf)
    kept = [k for k, a in enumerate(axes) if a not in leaf.contracts]
    contracted = [k for k, a in enumerate(axes) if a in leaf.contracts]
    rows = math.prod(value.shape[k] for k in kept)
    return np.ascontiguousarray(np.transpose(value, kept + contracted).reshape(rows, -1))


def _stored_value(leaf: Leaf, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `_matrix_view`."""
    axes = _stored_axes(leaf)
    order = [k for k, a in enumerate(axes) if a not in leaf.contracts] + [
        k for k, a in enumerate(axes) if a in leaf.contracts
    ]
    return np.transpose(matrix.reshape([shape[k] for k in order]), np.argsort(order))


@dataclasses.dataclass
class TowerWeights:
    """One tower's weights (part "vision" or "audio"): `tensors` {signature input name: [out, in] matrix (float32
    or `Quantized`) or float input}, `constants` {leaf name: value}, and the leaves they came from."""

    part: str
    leaves: list[Leaf]
    tensors: dict
    constants: dict


def read_tower(source, part: str, bits: int | None) -> TowerWeights:
    """The tower's weights from a `sources.WeightSource` (float32; matrices quantized to `bits` if given)."""
    from gemma4_jax.export.litert_graph import quantize_rows

    leaves = tower_leaves(source.config, part)
    tensors, constants = {}, {}
    for leaf in leaves:
        value = source.read(leaf, np.float32)
        kind = role(leaf)
        if kind == "constant":
            constants[leaf.name] = value
            continue
        for name, v in zip(_input_names(leaf), [value] if leaf.stack is None else value, strict=True):
            if kind == "matrix":
                v = _matrix_view(leaf, v)
                tensors[name] = quantize_rows(v, bits) if bits else v
            else:
                tensors[name] = np.ascontiguousarray(v)
        del value
    return TowerWeights(part, leaves, tensors, constants)


def _put(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def graph_tree(weights: TowerWeights, tensors: dict) -> dict:
    """The official parameter tree the encoders read, with `tensors` (e.g. the signature's traced inputs) in
    place: matrices as `Matrix`, stacked vision layers as a list of per-layer trees."""
    tree: dict = {}
    for leaf in weights.leaves:
        kind = role(leaf)
        if leaf.stack is None:
            values = [weights.constants[leaf.name] if kind == "constant" else tensors[leaf.name]]
        elif kind == "constant":
            values = list(weights.constants[leaf.name])
        else:
            values = [tensors[name] for name in _input_names(leaf)]
        if kind == "matrix":
            shape = tuple(s for a, s in zip(leaf.axes, leaf.shape, strict=True) if a != leaf.stack)
            values = [Matrix(v, _stored_axes(leaf), shape, leaf.contracts) for v in values]
        if leaf.stack is None:
            _put(tree, leaf.path, jnp.asarray(values[0]) if kind != "matrix" else values[0])
            continue
        at = leaf.path.index("block") + 1  # vision.encode takes per-layer trees at .../stacked_layers/block
        layers = _get_list(tree, leaf.path[:at], len(values))
        for layer, v in zip(layers, values, strict=True):
            _put(layer, leaf.path[at:], jnp.asarray(v) if kind != "matrix" else v)
    return tree


def _get_list(tree: dict, path, n: int) -> list:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    return tree.setdefault(path[-1], [{} for _ in range(n)])


def plain_tree(weights: TowerWeights) -> dict:
    """The official tree with plain stored-layout arrays (quantized matrices dequantized): what our JAX encoders
    take, the reference of the built-in check."""
    from gemma4_jax.export.litert_graph import Quantized

    tree: dict = {}
    for leaf in weights.leaves:
        kind = role(leaf)
        if kind == "constant":
            _put(tree, leaf.path, jnp.asarray(weights.constants[leaf.name]))
            continue
        shape = tuple(s for a, s in zip(leaf.axes, leaf.shape, strict=True) if a != leaf.stack)
        parts = []
        for name in _input_names(leaf):
            v = weights.tensors[name]
            if isinstance(v, Quantized):
                v = v.values.astype(np.float32) * v.scale[:, None]
            parts.append(_stored_value(leaf, v, shape) if kind == "matrix" else v)
        _put(tree, leaf.path, jnp.asarray(np.stack(parts) if leaf.stack else parts[0]))
    return tree


# ----- the signatures ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TowerModel:
    """One section of the bundle: file name, `litertlm_builder.TfLiteModelType` member, the converter signature,
    the weight tensors bound after conversion, and the builder's backend constraint."""

    file: str
    kind: str
    signature: object
    tensors: dict
    backend: str | None = None


def image_patches(image_tokens: int) -> int:
    """MAXP: the encoder's patch rows for a soft-token budget (9 patches per token)."""
    return image_tokens * 9


def vision_models(config, weights: TowerWeights, eoi_row: np.ndarray, image_tokens: int) -> list[TowerModel]:
    """Encoder, adapter and end-of-image models (see the module doc). `eoi_row`: the embedder's [D] row of
    `<image|>`, scaled as the embedder scales it."""
    from gemma4_jax.export.litert import _tensors_from_args, weight_inputs
    from gemma4_jax.export.litert_convert import Signature

    vc = config.vision
    maxp, t = image_patches(image_tokens), image_tokens
    projection = "embedder/mm_input_projection/w"
    encoder_tensors = {k: v for k, v in weights.tensors.items() if k != projection}
    adapter_tensors = {projection: weights.tensors[projection]}

    def encoder(images, positions_xy, *args):
        tree = graph_tree(weights, _tensors_from_args(encoder_tensors, args) | adapter_tensors)
        tokens, valid = vision.encode(tree["vision_encoder"], images, positions_xy, vc)
        return {"features": tokens.astype(jnp.float32), "mask": valid}

    def adapter(soft_tokens, *args):
        tree = graph_tree(weights, encoder_tensors | _tensors_from_args(adapter_tensors, args))
        return {"mm_embedding": vision.project(tree["embedder"]["mm_input_projection"], soft_tokens, vc)}

    enc_inputs = [("images", (1, maxp, vc.patch_values), np.float32), ("positions_xy", (1, maxp, 2), np.int32)]
    return [
        TowerModel(
            "vision_encoder.tflite",
            "VISION_ENCODER",
            Signature(f"vision_{t}", encoder, enc_inputs + weight_inputs(encoder_tensors), ["features", "mask"]),
            encoder_tensors,
        ),
        TowerModel(
            "vision_adapter.tflite",
            "VISION_ADAPTER",
            Signature(
                f"vision_adapter_{t}",
                adapter,
                [("soft_tokens", (1, t, vc.width), np.float32), *weight_inputs(adapter_tensors)],
                ["mm_embedding"],
            ),
            adapter_tensors,
            "cpu",
        ),
        _end_of_media("end_of_vision.tflite", "END_OF_VISION", "eoi", eoi_row),
    ]


def audio_models(config, weights: TowerWeights, eoa_row: np.ndarray, frames: int) -> list[TowerModel]:
    """Encoder, adapter and end-of-audio models (see the module doc) for chunks of `frames` mel frames."""
    from gemma4_jax.export.litert import _tensors_from_args, weight_inputs
    from gemma4_jax.export.litert_convert import Signature

    ac = config.audio
    t = audio_tokens(frames)
    projection = "embedder/audio_input_projection/w"
    encoder_tensors = {k: v for k, v in weights.tensors.items() if k != projection}
    adapter_tensors = {projection: weights.tensors[projection]}

    def encoder(src_inputs, mask, *args):
        tree = graph_tree(weights, _tensors_from_args(encoder_tensors, args) | adapter_tensors)
        features, valid = audio.encode(tree, src_inputs, mask[:, 0], ac)
        return {"features": features.astype(jnp.float32), "mask": valid}

    def adapter(features, mask, *args):
        tree = graph_tree(weights, encoder_tensors | _tensors_from_args(adapter_tensors, args))
        out = audio.project(tree, features, ac) * mask[..., None].astype(jnp.float32)
        return {"features": out}

    enc_inputs = [("src_inputs", (1, frames, ac.num_mel_bins), np.float32), ("mask", (1, 1, frames), np.bool_)]
    adapter_inputs = [("features", (1, t, ac.output_dim), np.float32), ("mask", (1, t), np.bool_)]
    return [
        TowerModel(
            "audio_encoder.tflite",
            "AUDIO_ENCODER_HW",
            Signature(f"audio_{t}", encoder, enc_inputs + weight_inputs(encoder_tensors), ["features", "mask"]),
            encoder_tensors,
            "cpu",
        ),
        TowerModel(
            "audio_adapter.tflite",
            "AUDIO_ADAPTER",
            Signature(f"audio_adapter_{t}", adapter, adapter_inputs + weight_inputs(adapter_tensors), ["features"]),
            adapter_tensors,
            "cpu",
        ),
        _end_of_media("end_of_audio.tflite", "END_OF_AUDIO", "eoa", eoa_row),
    ]


def _end_of_media(file: str, section: str, name: str, row: np.ndarray) -> TowerModel:
    """A model without inputs whose output `{name}_embedding` [1, 1, D] is the embedder's row of the end marker."""
    from gemma4_jax.export.litert_convert import Signature

    value = np.asarray(row, np.float32).reshape(1, 1, -1)
    output = f"{name}_embedding"
    return TowerModel(file, section, Signature(name, lambda: {output: jnp.asarray(value)}, [], [output]), {})


def select_parts(config, modalities: str | None) -> list[str]:
    """The towers to export from "--modalities text,vision,audio" (None: every tower the config has); one error
    line for an unknown name, a missing text part, or a tower the checkpoint does not have."""
    has = {"vision": config.vision is not None, "audio": config.audio is not None}
    if modalities is None:
        return [part for part in ("vision", "audio") if has[part]]
    asked = [m.strip() for m in modalities.split(",") if m.strip()]
    unknown = [m for m in asked if m not in MODALITIES]
    if unknown or "text" not in asked:
        raise Gemma4Error(
            f"--modalities takes text plus vision and/or audio (comma-separated, text required), got {modalities!r}"
        )
    for part in ("vision", "audio"):
        if part in asked and not has[part]:
            raise Gemma4Error(f"--modalities {part}: {config.name} has no {part} tower in this checkpoint")
    return [part for part in ("vision", "audio") if part in asked]


def check_sizes(parts, image_tokens: int | None, frames: int | None) -> tuple[int, int]:
    """(image tokens, audio frames) with their defaults, validated (one error line)."""
    from gemma4_jax.image import SOFT_TOKEN_BUDGETS

    image_tokens = DEFAULT_IMAGE_TOKENS if image_tokens is None else image_tokens
    frames = DEFAULT_AUDIO_FRAMES if frames is None else frames
    if "vision" in parts and image_tokens not in SOFT_TOKEN_BUDGETS:
        budgets = ", ".join(map(str, SOFT_TOKEN_BUDGETS))
        raise Gemma4Error(
            f"--image-tokens must be one of {budgets} (the budgets our preprocessing takes), got {image_tokens}"
        )
    if "audio" in parts:
        check_frames(frames)
    return image_tokens, frames


def audio_tokens(frames: int) -> int:
    """Encoder output rows for `frames` input frames (two stride-2 convolutions, kernel 3, pad 1)."""
    for _ in range(2):
        frames = (frames - 1) // 2 + 1
    return frames


def check_frames(frames: int) -> None:
    from gemma4_jax.audio_features import MAX_SAMPLES, num_mel_frames

    longest = num_mel_frames(MAX_SAMPLES) + 1
    if frames < _AUDIO_SHRINK or frames % _AUDIO_SHRINK or frames > longest:
        raise Gemma4Error(
            f"--audio-frames must be a multiple of {_AUDIO_SHRINK} from {_AUDIO_SHRINK} to {longest - longest % 4} "
            f"(10 ms frames; the engine needs F / (encoder rows) = {_AUDIO_SHRINK}), got {frames}"
        )


def convert(models: list[TowerModel]) -> dict:
    """{file: (converted bytes, constants to bind)}, as `litert.convert_models` returns for the text models."""
    from gemma4_jax.export import litert_convert
    from gemma4_jax.export.litert import weight_constants

    return {m.file: (litert_convert.convert([m.signature]), weight_constants(m.tensors)) for m in models}


# ----- the built-in check ------------------------------------------------------------------------------------


def sample_image(image_tokens: int):
    """A deterministic photo-like test image (smooth gradients, edges, texture) preprocessed for the encoder:
    (patches [1, MAXP, 768], positions [1, MAXP, 2]); it fills part of the budget, so padding rows are exercised."""
    from gemma4_jax import image

    h, w = 200, 290
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack(
        [
            127 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0),
            255 * (x / w),
            np.where((x - 140) ** 2 + (y - 90) ** 2 < 50**2, 230, 30) + 20 * np.sin(x * y / 50.0),
        ],
        axis=-1,
    )
    done = image.preprocess(np.clip(rgb, 0, 255).astype(np.uint8), image_tokens)
    return done.patches[None], done.positions[None]


def sample_audio(frames: int):
    """A deterministic voiced test clip (a gliding harmonic tone with vibrato and noise) as encoder inputs, about
    half the chunk long: (log-mel [1, F, 128], mask [1, F] bool)."""
    from gemma4_jax import audio_features

    n = max(audio_features.MIN_SAMPLES, frames // 2 * audio_features.HOP_LENGTH)
    t = np.arange(n) / audio_features.SAMPLE_RATE
    f0 = 140 + 60 * t / max(t[-1], 1e-3) + 5 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / audio_features.SAMPLE_RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.2
    wave = wave + 0.01 * np.random.default_rng(0).standard_normal(n)
    features, mask = audio_features.log_mel_features(wave.astype(np.float32))
    out = np.zeros((1, frames, features.shape[-1]), np.float32)
    valid = np.zeros((1, frames), bool)
    k = min(frames, features.shape[1])
    out[:, :k], valid[:, :k] = features[:, :k], mask[:, :k]
    return out, valid


def references(config, weights: dict, image_tokens: int, frames: int) -> dict:
    """Our JAX encoders (`vision.encode`/`project`, `audio.encode`/`project` on plain trees) on the sample inputs:
    {file: (inputs, outputs)} for the encoder and adapter models present in `weights` ({part: TowerWeights})."""
    out = {}
    if "vision" in weights:
        tree = plain_tree(weights["vision"])
        patches, positions = sample_image(image_tokens)
        tokens, valid = jax.jit(lambda p, x, q: vision.encode(p, x, q, config.vision))(
            tree["vision_encoder"], patches, positions
        )
        tokens = np.asarray(tokens, np.float32)
        out["vision_encoder.tflite"] = (
            {"images": patches, "positions_xy": positions},
            {"features": tokens, "mask": np.asarray(valid)},
        )
        embedded = vision.project(tree["embedder"]["mm_input_projection"], jnp.asarray(tokens), config.vision)
        out["vision_adapter.tflite"] = ({"soft_tokens": tokens}, {"mm_embedding": np.asarray(embedded)})
    if "audio" in weights:
        tree = plain_tree(weights["audio"])
        features, mask = sample_audio(frames)
        encoded, valid = jax.jit(lambda p, x, m: audio.encode(p, x, m, config.audio))(tree, features, mask)
        encoded, valid = np.asarray(encoded, np.float32), np.asarray(valid)
        out["audio_encoder.tflite"] = (
            {"src_inputs": features, "mask": mask[:, None]},
            {"features": encoded, "mask": valid},
        )
        projected = np.asarray(audio.project(tree, jnp.asarray(encoded), config.audio)) * valid[..., None]
        out["audio_adapter.tflite"] = ({"features": encoded, "mask": valid}, {"features": projected})
    return out


def run_model(path: str, inputs: dict) -> dict:
    """The model's one signature in the ai-edge-litert interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner(next(iter(interpreter.get_signature_list())))
    return runner(**inputs)


def compare(path: str, inputs: dict, expected: dict) -> tuple[float, float]:
    """(max |diff| over the float outputs, max |expected|); boolean outputs must be equal."""
    got = run_model(path, inputs)
    err, scale = 0.0, 0.0
    for name, want in expected.items():
        have = np.asarray(got[name])
        if want.dtype == bool:
            if not np.array_equal(have.astype(bool), want):
                raise Gemma4Error(f"{path}: output {name!r} differs from JAX; nothing written")
            continue
        if name == "features" and "mask" in expected:  # padding rows of an encoder are not used by the engine
            keep = expected["mask"].astype(bool)
            have, want = have[keep], want[keep]
        err = max(err, float(np.max(np.abs(have - want))))
        scale = max(scale, float(np.max(np.abs(want))))
    return err, scale
