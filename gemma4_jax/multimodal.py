"""Images and audio into the text decoder (spec §4.3): placeholders become soft-token slots, encoders fill them.

A prompt holds one placeholder token per image (`<|image|>`) or audio clip (`<|audio|>`), as the chat template
renders image and audio content parts. `expand` widens each to `<|image>` + n x `<|image|>` + `<image|>` (audio:
`<|audio>` + n x `<|audio|>` + `<audio|>`), n being that image's or clip's soft tokens, exactly as transformers'
`Gemma4Processor` does. `embed` runs the encoders and returns what the decoder takes (`model.apply`'s
`soft_tokens`, `soft_mask`, `blocks`): the decoder itself has no image or audio code.

Images are encoded one at a time (each padded to its own budget's patch count), clips likewise; transformers
batches them, which gives the same soft tokens because padding never reaches a valid token in either encoder.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import audio as audio_tower
from gemma4_jax import audio_features, image
from gemma4_jax import vision as vision_tower
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error


@dataclasses.dataclass(frozen=True)
class Image:
    """A preprocessed image (`image.preprocess`): patches [9 * budget, 768], positions [9 * budget, 2]."""

    patches: np.ndarray
    positions: np.ndarray
    num_tokens: int
    source: str = "image"


@dataclasses.dataclass(frozen=True)
class Audio:
    """A clip's log-mel features [T, 128] and their mask [T] (`audio_features`)."""

    features: np.ndarray
    mask: np.ndarray
    num_tokens: int
    source: str = "audio"


Media = Image | Audio


def load_image(source, budget: int = image.DEFAULT_BUDGET) -> Image:
    """A path, PIL image or uint8 array, resized to `budget` soft tokens (70, 140, 280, 560 or 1120)."""
    done = image.preprocess(source, budget)
    return Image(
        done.patches, done.positions, done.num_soft_tokens, str(source) if isinstance(source, str) else "image"
    )


def load_audio(source, sample_rate: int | None = None) -> Audio:
    """A file (WAV, FLAC, OGG, MP3; any rate, stereo mixed down) or mono float samples at `sample_rate` (default
    16 kHz). Audio past 30 s is dropped, as transformers' feature extractor drops it."""
    if isinstance(source, str):
        samples = audio_features.load_audio(source)
        name = source
    else:
        samples = np.asarray(source)
        if sample_rate not in (None, audio_features.SAMPLE_RATE):
            samples = audio_features.resample(samples, sample_rate)
        name = "audio"
    features, mask = audio_features.log_mel_features([samples])
    tokens = audio_features.num_audio_tokens(min(len(samples), audio_features.MAX_SAMPLES))
    return Audio(features[0], mask[0], tokens, name)


def check_support(config: Gemma4Config, media: Sequence[Media]) -> None:
    """One error line when the model has no encoder for some of `media`."""
    if any(isinstance(m, Image) for m in media) and config.vision is None:
        raise Gemma4Error(f"{config.name} has no vision encoder: it cannot take images")
    if any(isinstance(m, Audio) for m in media) and config.audio is None:
        raise Gemma4Error(f"{config.name} has no audio encoder: audio needs E2B or E4B")


def expand(ids: Sequence[int], media: Sequence[Media], config: Gemma4Config) -> list[int]:
    """The prompt with each placeholder widened to its medium's soft-token slots (in order: the k-th image
    placeholder takes the k-th image of `media`, clips likewise). The counts must match."""
    check_support(config, media)
    images = [m for m in media if isinstance(m, Image)]
    clips = [m for m in media if isinstance(m, Audio)]
    found = {
        "image": sum(t == config.image_token_id for t in ids),
        "audio": sum(t == config.audio_token_id for t in ids),
    }
    for kind, given in (("image", images), ("audio", clips)):
        if found[kind] != len(given):
            placeholder = "<|image|>" if kind == "image" else "<|audio|>"
            raise Gemma4Error(
                f"the prompt has {found[kind]} {kind} placeholder(s) ({placeholder}) but {len(given)} {kind}(s) were "
                "given"
            )
    out: list[int] = []
    pending = {"image": iter(images), "audio": iter(clips)}
    for token in ids:
        if token == config.image_token_id:
            n = next(pending["image"]).num_tokens
            out += [config.boi_token_id, *[config.image_token_id] * n, config.eoi_token_id]
        elif token == config.audio_token_id:
            n = next(pending["audio"]).num_tokens
            out += [config.boa_token_id, *[config.audio_token_id] * n, config.eoa_token_id]
        else:
            out.append(int(token))
    return out


@functools.lru_cache(maxsize=16)
def _vision_fn(config):
    def fn(params, patches, positions):
        tokens, valid = vision_tower.encode(params["vision_encoder"], patches, positions, config.vision)
        return vision_tower.project(params["embedder"]["mm_input_projection"], tokens, config.vision), valid

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _audio_fn(config):
    def fn(params, features, mask):
        return audio_tower.audio_soft_tokens(params, features, mask, config.audio)

    return jax.jit(fn)


def encode(params, config: Gemma4Config, medium: Media) -> np.ndarray:
    """One image's or clip's soft tokens [n, D] (float32, or float64 when the encoder runs in it), padding
    dropped."""
    check_support(config, [medium])
    towers = {k: params[k] for k in ("vision_encoder", "audio_encoder", "embedder") if k in params}
    if isinstance(medium, Image):
        tokens, valid = _vision_fn(config)(towers, medium.patches[None], medium.positions[None])
    else:
        tokens, valid = _audio_fn(config)(towers, medium.features[None], medium.mask[None])
    tokens = np.asarray(tokens[0])
    out = tokens.astype(np.result_type(tokens.dtype, np.float32), copy=False)[np.asarray(valid[0])]
    if len(out) != medium.num_tokens:
        raise Gemma4Error(f"{medium.source}: the encoder gave {len(out)} soft tokens, {medium.num_tokens} expected")
    return out


@dataclasses.dataclass
class SoftTokens:
    """One prompt's encoder inputs for the decoder, aligned with its (expanded) token ids."""

    embeddings: np.ndarray  # [T, D] float32 or float64 (0 where mask is False)
    mask: np.ndarray  # [T] bool: soft-token slots
    blocks: np.ndarray  # [T] int32: the image a slot belongs to (0, 1, ...), -1 elsewhere (audio: causal)


def embed(params, config: Gemma4Config, ids: Sequence[int], media: Sequence[Media]) -> SoftTokens:
    """The soft tokens of an expanded prompt: the k-th run of image (or audio) slots gets the k-th image's (clip's)
    embeddings."""
    ids = np.asarray(ids)
    slots = {
        "image": np.flatnonzero(ids == config.image_token_id),
        "audio": np.flatnonzero(ids == config.audio_token_id),
    }
    width = config.embed_dim
    embeddings = np.zeros((len(ids), width), np.float32)
    blocks = np.full(len(ids), -1, np.int32)
    offsets = {"image": 0, "audio": 0}
    image_index = 0
    for medium in media:
        kind = "image" if isinstance(medium, Image) else "audio"
        where = slots[kind][offsets[kind] : offsets[kind] + medium.num_tokens]
        if len(where) != medium.num_tokens:
            raise Gemma4Error(f"the prompt has fewer {kind} slots than its {kind}s need (was it expanded?)")
        tokens = encode(params, config, medium)
        embeddings = embeddings.astype(np.result_type(embeddings.dtype, tokens.dtype), copy=False)
        embeddings[where] = tokens
        if kind == "image":
            blocks[where] = image_index
            image_index += 1
        offsets[kind] += medium.num_tokens
    for kind in ("image", "audio"):
        if offsets[kind] != len(slots[kind]):
            raise Gemma4Error(f"the prompt has {len(slots[kind])} {kind} slots, its {kind}s fill {offsets[kind]}")
    mask = np.zeros(len(ids), bool)
    for where in slots.values():
        mask[where] = True
    return SoftTokens(embeddings, mask, blocks)


def batch(rows: Sequence[SoftTokens | None], width: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row soft tokens as [B, width, D], [B, width], [B, width] arrays, right-padded like the prompts."""
    d = next(r.embeddings.shape[1] for r in rows if r is not None)
    kind = np.result_type(np.float32, *[r.embeddings.dtype for r in rows if r is not None])
    embeddings = np.zeros((len(rows), width, d), kind)
    mask = np.zeros((len(rows), width), bool)
    blocks = np.full((len(rows), width), -1, np.int32)
    for b, row in enumerate(rows):
        if row is not None:
            n = len(row.mask)
            embeddings[b, :n], mask[b, :n], blocks[b, :n] = row.embeddings, row.mask, row.blocks
    return jnp.asarray(embeddings, dtype), jnp.asarray(mask), jnp.asarray(blocks)
