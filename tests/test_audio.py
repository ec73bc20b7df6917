"""The audio tower against transformers: our encoder + embedder vs `Gemma4Model.get_audio_features` (audio tower,
then `embed_audio`) on CPU torch, identical random weights handed to us through the HF mapping.

Every audio tensor is randomised: norm scales in [0.5, 1.5) (away from 1, so a missing or offset norm shows),
`per_dim_scale` and the output bias N(0, 1), clip bounds at ±(1.5..2.5) so every clipped linear really clips.
Two clips of different lengths make a padded batch.

Tolerances (max abs over all soft tokens, which are O(2)): float64 1e-9 (the two agree to ~1e-14), float32 5e-4
(float32 rounding alone moves either side by ~1e-6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from mm_reference import AUDIO_PREFIXES, hf_mm_model, hf_state, mm_float64, params_of

from gemma4_jax import audio, config, model, param_spec
from gemma4_jax import audio_features as af
from gemma4_jax.config import AudioConfig
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import count_params, tree_get

TOLERANCE = {"float64": 1e-9, "float32": 5e-4}
CLIP_SAMPLES = (36_789, 20_000)  # 2.3 s and 1.25 s: 58 and 31 soft tokens, 231 mel frames after padding
FULL = config.TINY_MM
CFG = FULL.audio


@pytest.fixture(scope="module")
def reference():
    """(HF model, its audio tensors as numpy, features [2, T, 128], mask [2, T])."""
    hf = hf_mm_model(FULL, seed=0)
    state = {name: t for name, t in hf_state(hf).items() if name.startswith(AUDIO_PREFIXES)}
    rng = np.random.default_rng(0)
    t = np.arange(max(CLIP_SAMPLES)) / af.SAMPLE_RATE
    speechlike = 0.4 * np.sin(2 * np.pi * (200 + 300 * np.sin(3 * t)) * t) + 0.05 * rng.standard_normal(len(t))
    clips = [speechlike[:n].astype(np.float32) for n in CLIP_SAMPLES]
    features, mask = af.log_mel_features(clips)
    return hf, state, features, mask


def load(state, dtype=jnp.float32, cfg=FULL):
    return params_of(cfg, state, np.dtype(dtype), parts=("audio",))


def _hf_audio(hf, features, mask, precision):
    with torch.no_grad():
        if precision == "float64":
            with mm_float64(hf):
                out = hf.model.get_audio_features(torch.tensor(features, dtype=torch.float64), torch.tensor(mask))
        else:
            out = hf.float().model.get_audio_features(torch.tensor(features), torch.tensor(mask))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy(), out.attention_mask.numpy()


forward = jax.jit(audio.audio_soft_tokens, static_argnames="config")
encode = jax.jit(audio.encode, static_argnames="config")


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_matches_hf_get_audio_features(reference, precision):
    hf, state, features, mask = reference
    hf_embeddings, hf_tokens, hf_mask = _hf_audio(hf, features, mask, precision)
    with jax.enable_x64(precision == "float64"):
        params = load(state, precision)
        tokens, token_mask = forward(params, features, mask, config=CFG)
        embeddings, _ = encode(params, features, mask, config=CFG)
        tokens, token_mask, embeddings = np.asarray(tokens), np.asarray(token_mask), np.asarray(embeddings)
    assert tokens.dtype == np.dtype(precision) and tokens.shape == hf_tokens.shape == (2, 58, FULL.embed_dim)
    assert np.array_equal(token_mask, hf_mask)
    assert [int(m.sum()) for m in token_mask] == [af.num_audio_tokens(n) for n in CLIP_SAMPLES] == [58, 31]
    # every frame, the padding ones included: the computation is the same, not just its valid part
    token_error = np.abs(tokens - hf_tokens).max()
    embedding_error = np.abs(embeddings - hf_embeddings).max()
    assert token_error <= TOLERANCE[precision], f"{precision}: soft tokens max abs error {token_error:.3g}"
    assert embedding_error <= TOLERANCE[precision], f"{precision}: encoder output max abs error {embedding_error:.3g}"
    # HF then keeps only the valid tokens, clip after clip
    kept = audio.valid_tokens(tokens, token_mask)
    assert kept.shape == (89, FULL.embed_dim)
    assert np.abs(kept - hf_tokens[hf_mask]).max() <= TOLERANCE[precision]


def test_padding_does_not_reach_valid_tokens(reference):
    """A clip's tokens are the same alone and padded in a batch (float64, so any leak would show)."""
    _, state, features, mask = reference
    short = af.log_mel_features(np.zeros(CLIP_SAMPLES[1], np.float32))[0].shape[1]
    with jax.enable_x64(True):
        params = load(state, jnp.float64)
        batched, batched_mask = forward(params, features, mask, config=CFG)
        alone, alone_mask = forward(params, features[1:, :short], mask[1:, :short], config=CFG)
        garbage = np.where(mask[..., None], features, 7.0)  # padding frames filled with junk
        junk, _ = forward(params, garbage, mask, config=CFG)
    valid = np.asarray(alone_mask)[0]
    assert valid.sum() == 31
    assert np.abs(np.asarray(alone)[0][valid] - np.asarray(batched)[1][: valid.size][valid]).max() < 1e-12
    assert (
        np.abs(np.asarray(junk)[np.asarray(batched_mask)] - np.asarray(batched)[np.asarray(batched_mask)]).max() < 1e-12
    )


# ----- the spec's HF names -------------------------------------------------------------------------------------


def test_spec_round_trips_every_hf_tensor(reference):
    """Every HF audio tensor (clip buffers included) is one spec name, and loading then writing gives it back bit
    for bit."""
    _, state, _, _ = reference
    params = load(state)
    written = {
        "model." + name: array
        for leaf in param_spec.param_spec(FULL)
        if leaf.part == "audio"
        for name, array in zip(leaf.hf, leaf.to_hf(np.asarray(tree_get(params, leaf.path))), strict=True)
    }
    assert sorted(written) == sorted(state)
    for name, value in written.items():
        assert value.dtype == np.float32 and np.array_equal(value, state[name]), name


def test_full_size_spec_against_hf_tower():
    """The E2B entries against the real-size HF audio tower, built on torch's meta device (no memory)."""
    cfg = config.E2B
    with torch.device("meta"):
        tower = transformers.Gemma4AudioModel(transformers.Gemma4AudioConfig(**cfg.audio.to_hf_dict()))
    hf = {"audio_tower." + name: tuple(t.shape) for name, t in tower.state_dict().items()}
    hf["embed_audio.embedding_projection.weight"] = (cfg.embed_dim, cfg.audio.output_dim)
    ours = {name: shape for leaf, name, shape in param_spec.hf_tensors(cfg) if leaf.part == "audio"}
    assert ours == hf
    assert sum(math.prod(s) for n, s in hf.items() if n.startswith("audio_tower.")) == 304_825_088


def test_loader_errors(reference):
    _, state, _, _ = reference
    missing = dict(state)
    del missing["model.audio_tower.layers.1.self_attn.post.output_max"]
    with pytest.raises(Gemma4Error, match=r"missing tensors model\.audio_tower\.layers\.1\.self_attn\.post"):
        load(missing)
    wrong = dict(state)
    wrong["model.audio_tower.layers.0.self_attn.relative_k_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(Gemma4Error, match="shape mismatch for audio_encoder/conformer/stacked_layers_0/"):
        load(wrong)


# ----- config and parameter tree ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text_dim", [("e2b", 1536), ("e4b", 2560)])
def test_full_size_parameter_count(name, text_dim):
    """Spec §4.2/§7.1: 304 825 088 encoder parameters (incl. output projection and clip scalars), shapes only."""
    shapes = model.param_shapes(config.get_config(name))
    assert count_params(shapes["audio_encoder"]) == 304_825_088
    assert shapes["embedder"]["audio_input_projection"]["w"].shape == (1536, text_dim)
    encoder = shapes["audio_encoder"]
    layer = encoder["conformer/stacked_layers_11"]
    expected = {  # spec §5.1
        ("feature", "subsampling_0", "kernel"): (3, 3, 1, 128),
        ("feature", "subsampling_1", "kernel"): (3, 3, 128, 32),
        ("feature", "input_proj", "kernel"): (32, 32, 1024),
        ("output_projection", "kernel"): (1024, 1536),
        ("output_projection", "bias"): (1536,),
    }
    for path, shape in expected.items():
        assert tree_get(encoder, path).shape == shape
    assert layer["fflayer_end"]["ffn_layer1"]["kernel"].shape == (1024, 4096)
    assert layer["trans_atten"]["self_atten"]["relative_position_embedding"]["pos_proj"]["kernel"].shape == (
        1024,
        8,
        128,
    )
    assert layer["trans_atten"]["post"]["kernel"].shape == (8, 128, 1024)
    assert layer["lconv"]["depthwise_conv1d"]["kernel"].shape == (5, 1, 1024)
    assert layer["lconv"]["linear_start"]["clip_output_max"].shape == ()
    assert len(encoder) == 2 + 12  # feature, output_projection, 12 unstacked layers
    clips = [p for p, _ in jax.tree_util.tree_flatten_with_path(encoder)[0] if p[-1].key.startswith("clip_")]
    assert len(clips) == 12 * 10 * 4


def test_config_hf_roundtrip():
    for name in ("e2b", "e4b", "tiny"):
        cfg = config.get_audio_config(name)
        hf = transformers.Gemma4AudioConfig(**cfg.to_hf_dict())
        assert AudioConfig.from_hf_dict(hf.to_dict(), name=name) == cfg
    # config.json omits defaults: an empty dict is the E2B/E4B tower
    assert AudioConfig.from_hf_dict({}, name="e2b") == config.get_audio_config("e2b")
    with pytest.raises(Gemma4Error, match="unknown audio config"):
        config.get_audio_config("e9b")
    with pytest.raises(Gemma4Error, match="multiple of num_heads"):
        AudioConfig("bad", hidden_size=100, num_heads=8)
    with pytest.raises(Gemma4Error, match="cannot be expressed for transformers"):
        CFG.replace(subsampling_channels=(64, 8)).to_hf_dict()


def test_random_init_runs_in_every_dtype():
    features, mask = af.log_mel_features([np.zeros(9_000, np.float32), 0.1 * np.ones(4_000, np.float32)])
    for dtype in (jnp.float32, jnp.bfloat16):
        params = _towers(model.init_params(FULL, seed=1, dtype=dtype))
        tokens, token_mask = forward(
            jax.tree_util.tree_map(lambda a, dtype=dtype: a.astype(dtype), params), features, mask, config=CFG
        )
        assert tokens.dtype == dtype and tokens.shape == (2, -(-features.shape[1] // 4), FULL.embed_dim)
        assert [int(m.sum()) for m in token_mask] == [af.num_audio_tokens(9_000), af.num_audio_tokens(4_000)]
        assert bool(jnp.all(jnp.isfinite(tokens)))
    reference = np.asarray(forward(_towers(model.init_params(FULL, seed=1)), features, mask, config=CFG)[0])
    assert np.abs(np.asarray(tokens, np.float32) - reference)[np.asarray(token_mask)].max() < 0.1


def _towers(params):
    return {"audio_encoder": params["audio_encoder"], "embedder": params["embedder"]}


def test_bad_encoder_inputs():
    params = _towers(model.init_params(FULL, dtype=jnp.float32))
    features, mask = af.log_mel_features(np.zeros(4_000, np.float32))
    with pytest.raises(Gemma4Error, match=r"\[batch, frames, 128\]"):
        audio.encode(params, features[..., :64], mask, CFG)
    with pytest.raises(Gemma4Error, match="audio mask"):
        audio.encode(params, features, mask[:, :-1], CFG)
