"""Images and audio through the whole model against transformers' `Gemma4ForConditionalGeneration` (CPU torch).

Same random weights on both sides (`mm_reference`: every text and encoder tensor random, clip bounds that clamp),
handed to us through the parameter spec's HF names. Real inputs: photographs shipped with scikit-image and speech
spoken by `espeak-ng`. Two tiny configs: `tiny_mm` (E2B-style: PLE, KV sharing, clipped vision linears, an audio
tower) and `tiny_mm_bidi` (31B-style: K=V global layers, vision standardization, bidirectional attention among an
image's soft tokens on the local layers).

Our side runs as a user's would: `multimodal.expand` widens the placeholders, `multimodal.embed` encodes each
image and clip on its own (padded to its own budget), `model.apply` / the sampler take the soft tokens.
transformers batches all images (padded to the largest budget) and all clips in one call each.

Tolerances (max-abs over all logits, O(5)), against transformers in float64: float64 1e-9, float32 5e-4.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mm_reference import hf_mm_model, hf_state, mm_float64, one_torch_thread, params_of

from gemma4_jax import audio_features, config, model, multimodal
from gemma4_jax.sampler import Sampler

skimage_data = pytest.importorskip("skimage.data")

TOLERANCE = {"float64": 1e-9, "float32": 5e-4}
PHOTOS = {"astronaut": "astronaut.png", "coffee": "coffee.png", "camera": "camera.png", "rocket": "rocket.jpg"}
SPEECH = ("Hello from Gemma.", "Two clips, one prompt.")

# (config, media): ("image", photo, budget) or ("audio", phrase index). Text ids go around and between them.
CASES = {
    "e2b-style one image": ("tiny_mm", [("image", "astronaut", 70)]),
    "e2b-style two images, two budgets": ("tiny_mm", [("image", "coffee", 140), ("image", "camera", 70)]),
    "e2b-style one clip": ("tiny_mm", [("audio", 0)]),
    "e2b-style two clips": ("tiny_mm", [("audio", 0), ("audio", 1)]),
    "e2b-style audio and image": ("tiny_mm", [("audio", 1), ("image", "rocket", 70)]),
    "31b-style one image": ("tiny_mm_bidi", [("image", "rocket", 140)]),
    "31b-style two images, two budgets": ("tiny_mm_bidi", [("image", "astronaut", 70), ("image", "coffee", 140)]),
}


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from real_media import speak

    return speak(tmp_path_factory.mktemp("speech"), SPEECH)


_MODELS: dict[str, tuple] = {}


def _reference(name):
    """(config, transformers' model, its tensors), built once per config."""
    if name not in _MODELS:
        cfg = config.get_config(name)
        hf = hf_mm_model(cfg, seed=len(name))
        _MODELS[name] = (cfg, hf, hf_state(hf))
    return _MODELS[name]


def _prompt(case, speech):
    """(config, placeholder prompt ids, media) of a case: text ids around each placeholder."""
    name, spec = CASES[case]
    cfg = config.get_config(name)
    rng = np.random.default_rng(len(case))
    text = lambda n: rng.integers(100, cfg.vocab_size, n).tolist()  # noqa: E731 (clear of the special ids)
    ids, media = [cfg.bos_id, *text(3)], []
    for kind, *what in spec:
        if kind == "image":
            photo, budget = what
            media.append(multimodal.load_image(os.path.join(skimage_data.data_dir, PHOTOS[photo]), budget))
            ids += [cfg.image_token_id, *text(2)]
        else:
            media.append(multimodal.load_audio(speech[what[0]]))
            ids += [cfg.audio_token_id, *text(2)]
    return cfg, ids, media


def _hf_inputs(cfg, ids, media, dtype):
    """What transformers' processor hands the model: all images in one padded batch, all clips in another (log-mel
    features in `dtype`: float32 values, exact in float64)."""
    inputs = {"input_ids": torch.tensor([ids])}
    images = [m for m in media if isinstance(m, multimodal.Image)]
    if images:
        width = max(len(m.patches) for m in images)
        patches = np.zeros((len(images), width, 768))
        positions = np.full((len(images), width, 2), -1)
        for i, m in enumerate(images):
            patches[i, : len(m.patches)], positions[i, : len(m.positions)] = m.patches, m.positions
        # float32 pixels, as the processor gives them: both sides map them to [-1, 1] in float32, then widen
        inputs["pixel_values"] = torch.tensor(patches, dtype=torch.float32)
        inputs["image_position_ids"] = torch.tensor(positions)
        inputs["mm_token_type_ids"] = torch.tensor([[int(t == cfg.image_token_id) for t in ids]])
    clips = [m for m in media if isinstance(m, multimodal.Audio)]
    if clips:
        frames = max(len(m.features) for m in clips)
        features = np.zeros((len(clips), frames, 128))
        mask = np.zeros((len(clips), frames), bool)
        for i, m in enumerate(clips):
            features[i, : len(m.features)], mask[i, : len(m.mask)] = m.features, m.mask
        inputs["input_features"] = torch.tensor(features, dtype=dtype)
        inputs["input_features_mask"] = torch.tensor(mask)
    return inputs


def _hf_logits(hf, cfg, ids, media, precision):
    dtype = torch.float64 if precision == "float64" else torch.float32
    context = mm_float64(hf) if precision == "float64" else contextlib.nullcontext()
    with torch.no_grad(), context, one_torch_thread():
        return hf(**_hf_inputs(cfg, ids, media, dtype)).logits[0].numpy()


forward = jax.jit(model.apply, static_argnames=("config",))


def _ours(cfg, state, ids, media, precision):
    """(params, expanded ids, soft tokens, full-forward logits [T, V])."""
    params = params_of(cfg, state, np.dtype(precision))
    expanded = multimodal.expand(ids, media, cfg)
    soft = multimodal.embed(params, cfg, expanded, media)
    embeddings, mask, blocks = multimodal.batch([soft], len(expanded), jnp.dtype(precision))
    logits, _ = forward(
        params, np.asarray([expanded]), config=cfg, soft_tokens=embeddings, soft_mask=mask, blocks=blocks
    )
    return params, expanded, soft, np.asarray(logits[0])


FAST_CASES = ("e2b-style audio and image", "31b-style two images, two budgets")  # the default tier's share


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_logits_match_hf(case, precision, speech):
    """Both precisions against transformers' float64 logits: float32 is judged by its distance from the exact
    result, not from transformers' own float32 rounding, which is as large (up to 5.3e-4 on these weights, where a
    soft token's 1e-5 rounding grows 50-fold through the random decoder)."""
    cfg, ids, media = _prompt(case, speech)
    cfg, hf, state = _reference(cfg.name)
    with jax.enable_x64(precision == "float64"):
        _, expanded, _, logits = _ours(cfg, state, ids, media, precision)
    assert len(expanded) == len(ids) - len(media) + sum(m.num_tokens + 2 for m in media)
    expected = _hf_logits(hf, cfg, expanded, media, "float64")
    assert logits.shape == expected.shape == (len(expanded), cfg.vocab_size)
    error = np.abs(logits - expected).max()
    message = f"{case} {precision}: max-abs logits error {error:.3g}"
    if precision == "float32":
        theirs = np.abs(_hf_logits(hf, cfg, expanded, media, "float32") - expected).max()
        message += f" (transformers' own float32: {theirs:.3g})"
    assert error <= TOLERANCE[precision], message


def _prefill_then_decode(cfg, params, expanded, soft, prefill, dtype):
    """Logits of `expanded` through the cache: the first `prefill` tokens (all soft tokens among them) at once, then
    one token at a time."""
    cache = model.init_cache(cfg, 1, len(expanded), dtype)
    embeddings, mask, blocks = multimodal.batch([soft], len(expanded), dtype)
    tokens = np.asarray([expanded])
    first, cache = forward(
        params,
        tokens[:, :prefill],
        np.arange(prefill)[None],
        cache,
        config=cfg,
        soft_tokens=embeddings[:, :prefill],
        soft_mask=mask[:, :prefill],
        blocks=blocks[:, :prefill],
    )
    out = [np.asarray(first[0])]
    for t in range(prefill, len(expanded)):
        step, cache = forward(params, tokens[:, t : t + 1], np.asarray([[t]]), cache, config=cfg)
        out.append(np.asarray(step[0]))
    return np.concatenate(out)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", ["e2b-style audio and image", "31b-style two images, two budgets"])
def test_prefill_then_decode_equals_full_forward(case, precision, speech):
    cfg, ids, media = _prompt(case, speech)
    cfg, _, state = _reference(cfg.name)
    with jax.enable_x64(precision == "float64"):
        params, expanded, soft, full = _ours(cfg, state, ids, media, precision)
        prefill = int(np.flatnonzero(soft.mask).max()) + 2  # past the last soft token and its end marker
        assert len(expanded) - prefill >= 2
        cached = _prefill_then_decode(cfg, params, expanded, soft, prefill, jnp.dtype(precision))
    error = np.abs(cached - full).max()
    assert error <= TOLERANCE[precision] / 10, f"{case} {precision}: cached vs full max-abs {error:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_hf(case, speech):
    """16 greedy tokens from our sampler equal transformers' `generate` on the same images and audio."""
    cfg, ids, media = _prompt(case, speech)
    cfg, hf, state = _reference(cfg.name)
    params, expanded, soft, _ = _ours(cfg, state, ids, media, "float32")
    got = Sampler(cfg, params, stop_tokens=()).generate([expanded], max_new_tokens=16, soft=[soft]).tokens[0]
    hf.generation_config.eos_token_id = None
    with torch.no_grad(), one_torch_thread():
        out = hf.float().generate(
            **_hf_inputs(cfg, expanded, media, torch.float32), max_new_tokens=16, do_sample=False, pad_token_id=0
        )
    assert got == out[0, len(expanded) :].tolist()


def test_soft_token_counts_follow_the_spec(speech):
    """Spec §7.5 / §7.6: an image has (h/48)·(w/48) soft tokens at its budget; a clip 25 per second."""
    astronaut = multimodal.load_image(os.path.join(skimage_data.data_dir, "astronaut.png"), 280)
    assert astronaut.num_tokens == 256  # 512x512 -> 768x768 -> 16 x 16 pooled
    clip = multimodal.load_audio(speech[0])
    seconds = len(audio_features.load_audio(speech[0])) / audio_features.SAMPLE_RATE
    assert abs(clip.num_tokens - 25 * seconds) <= 1.5


@pytest.fixture
def hf_processor(tmp_path, monkeypatch):
    """transformers' Gemma4Processor over the test tokenizer, a budget-70 image processor (PIL) and the audio
    feature extractor. Its video processor needs torchvision, which is not installed and not used here: the
    processor's type check for it is skipped."""
    from tokenizer_fixture import write_tokenizer
    from transformers import AutoTokenizer, ProcessorMixin
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    write_tokenizer(str(tmp_path / "tokenizer"))
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(
        ProcessorMixin,
        "check_argument_for_proper_class",
        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg),
    )
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessorPil(max_soft_tokens=70),
        tokenizer=AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")),
        video_processor=None,
    )
    return processor, str(tmp_path / "tokenizer")


def test_prompt_expansion_equals_the_processor(hf_processor, speech):
    """A prompt with two images and two clips: the same ids (`<|image>` + n x `<|image|>` + `<image|>`, audio
    likewise), pixels, patch positions and log-mel features as transformers' processor."""
    from PIL import Image as PILImage

    from gemma4_jax import api

    processor, tokenizer = hf_processor
    photos = [os.path.join(skimage_data.data_dir, PHOTOS[p]) for p in ("coffee", "camera")]
    text = "Compare <|image|> with <|image|>, then hear <|audio|> and <|audio|>."
    waves = [audio_features.load_audio(path) for path in speech]
    inputs = processor(text=[text], images=[[PILImage.open(p) for p in photos]], audio=waves, return_tensors="np")
    cfg = config.get_config("tiny_mm")
    m = api.load(config=cfg, tokenizer=tokenizer, dtype="float32")
    ids, soft = m.prepare(text, images=photos, audio=speech, image_tokens=70)
    assert ids == [cfg.bos_id, *inputs["input_ids"][0].tolist()]  # the processor's tokenizer adds no <bos>
    expected_types = [1 if t == cfg.image_token_id else 3 if t == cfg.audio_token_id else 0 for t in ids[1:]]
    assert inputs["mm_token_type_ids"][0].tolist() == expected_types
    images = [multimodal.load_image(p, 70) for p in photos]
    for i, medium in enumerate(images):
        n = len(medium.patches)
        assert np.abs(inputs["pixel_values"][i][:n] - medium.patches).max() <= 1e-6
        assert np.array_equal(inputs["image_position_ids"][i][:n], medium.positions)
    clips = [multimodal.load_audio(p) for p in speech]
    for i, clip in enumerate(clips):
        frames = len(clip.features)
        assert np.abs(inputs["input_features"][i][:frames] - clip.features).max() <= 1e-5
        assert np.array_equal(inputs["input_features_mask"][i][:frames], clip.mask)
    assert sum(soft.mask) == sum(m.num_tokens for m in images + clips)
