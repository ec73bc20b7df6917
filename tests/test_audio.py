"""The audio tower against transformers: our encoder + embedder vs `Gemma4Model.get_audio_features` (audio tower,
then `embed_audio`) on CPU torch, identical random weights handed to us through the HF mapping.

Every audio tensor is randomised: norm scales in [0.5, 1.5) (away from 1, so a missing or offset norm shows),
`per_dim_scale` and the output bias N(0, 1), clip bounds at ±(1.5..2.5) so every clipped linear really clips.
Two clips of different lengths make a padded batch.

Tolerances (max abs over all soft tokens, which are O(2)): float64 1e-9 (the two agree to ~1e-14), float32 5e-4
(float32 rounding alone moves either side by ~1e-6).
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import full_float64

from gemma4_jax import audio
from gemma4_jax import audio_features as af
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import count_params, tree_get

TOLERANCE = {"float64": 1e-9, "float32": 5e-4}
CLIP_SAMPLES = (36_789, 20_000)  # 2.3 s and 1.25 s: 58 and 31 soft tokens, 231 mel frames after padding
CFG = audio.get_audio_config("tiny")


def _hf_config(cfg: audio.AudioConfig) -> transformers.Gemma4Config:
    text = transformers.Gemma4TextConfig(
        vocab_size=64,
        hidden_size=cfg.text_embed_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        layer_types=["full_attention"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=64,
        sliding_window=8,
    )
    audio_config = transformers.Gemma4AudioConfig(**cfg.to_hf_dict())
    return transformers.Gemma4Config(text_config=text, audio_config=audio_config, vision_config=None)


def _is_audio(name: str) -> bool:
    return name.startswith(("model.audio_tower.", "model.embed_audio."))


@pytest.fixture(scope="module")
def reference():
    """(HF model, its audio tensors as numpy, features [2, T, 128], mask [2, T])."""
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(_hf_config(CFG)).eval()
    generator = torch.Generator().manual_seed(0)

    def uniform(lo, hi, shape=()):
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not _is_audio(name):
                continue
            if name.endswith(("input_min", "output_min")):
                tensor.copy_(-uniform(1.5, 2.5))
            elif name.endswith(("input_max", "output_max")):
                tensor.copy_(uniform(1.5, 2.5))
            elif name.endswith(("per_dim_scale", ".bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1:  # norm scales
                tensor.copy_(uniform(0.5, 1.5, tensor.shape))
            else:
                taps = tensor.shape[-1] if name.endswith("depthwise_conv1d.weight") else tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(taps))
    state = {name: t.numpy().copy() for name, t in model.state_dict().items() if _is_audio(name)}

    rng = np.random.default_rng(0)
    t = np.arange(max(CLIP_SAMPLES)) / af.SAMPLE_RATE
    speechlike = 0.4 * np.sin(2 * np.pi * (200 + 300 * np.sin(3 * t)) * t) + 0.05 * rng.standard_normal(len(t))
    clips = [speechlike[:n].astype(np.float32) for n in CLIP_SAMPLES]
    features, mask = af.log_mel_features(clips)
    return model, state, features, mask


@contextlib.contextmanager
def audio_float64(model):
    """transformers in float64 throughout: `full_float64` keeps RMSNorm's and the attention's `.float()` and the
    softmax in float64; the relative-position timescales, a buffer computed in float32 at construction, are
    recomputed in float64 (left in float32 they move the soft tokens by ~1.5e-8)."""
    encoding = model.model.audio_tower.rel_pos_enc
    saved = encoding.inv_timescales.clone()
    half = encoding.hidden_size // 2
    increment = math.log(1e4) / max(half - 1, 1)
    with full_float64(), torch.no_grad():
        model.double()
        encoding.inv_timescales.copy_(torch.exp(torch.arange(half, dtype=torch.float64) * -increment)[None, None])
        try:
            yield
        finally:
            encoding.inv_timescales.copy_(saved)
            model.float()


def _hf_audio(model, features, mask, precision):
    with torch.no_grad():
        if precision == "float64":
            with audio_float64(model):
                out = model.model.get_audio_features(torch.tensor(features, dtype=torch.float64), torch.tensor(mask))
        else:
            out = model.float().model.get_audio_features(torch.tensor(features), torch.tensor(mask))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy(), out.attention_mask.numpy()


forward = jax.jit(audio.audio_soft_tokens, static_argnames="config")
encode = jax.jit(audio.encode, static_argnames="config")


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_matches_hf_get_audio_features(reference, precision):
    model, state, features, mask = reference
    hf_embeddings, hf_tokens, hf_mask = _hf_audio(model, features, mask, precision)
    with jax.enable_x64(precision == "float64"):
        params = audio.load_audio_from_hf(state.get, CFG, dtype=jnp.dtype(precision))
        tokens, token_mask = forward(params, features, mask, config=CFG)
        embeddings, _ = encode(params, features, mask, config=CFG)
        tokens, token_mask, embeddings = np.asarray(tokens), np.asarray(token_mask), np.asarray(embeddings)
    assert tokens.dtype == np.dtype(precision) and tokens.shape == hf_tokens.shape == (2, 58, CFG.text_embed_dim)
    assert np.array_equal(token_mask, hf_mask)
    assert [int(m.sum()) for m in token_mask] == [af.num_audio_tokens(n) for n in CLIP_SAMPLES] == [58, 31]
    # every frame, the padding ones included: the computation is the same, not just its valid part
    token_error = np.abs(tokens - hf_tokens).max()
    embedding_error = np.abs(embeddings - hf_embeddings).max()
    assert token_error <= TOLERANCE[precision], f"{precision}: soft tokens max abs error {token_error:.3g}"
    assert embedding_error <= TOLERANCE[precision], f"{precision}: encoder output max abs error {embedding_error:.3g}"
    # HF then keeps only the valid tokens, clip after clip
    kept = audio.valid_tokens(tokens, token_mask)
    assert kept.shape == (89, CFG.text_embed_dim)
    assert np.abs(kept - hf_tokens[hf_mask]).max() <= TOLERANCE[precision]


def test_padding_does_not_reach_valid_tokens(reference):
    """A clip's tokens are the same alone and padded in a batch (float64, so any leak would show)."""
    _, state, features, mask = reference
    short = af.log_mel_features(np.zeros(CLIP_SAMPLES[1], np.float32))[0].shape[1]
    with jax.enable_x64(True):
        params = audio.load_audio_from_hf(state.get, CFG, dtype=jnp.float64)
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


# ----- the mapping ---------------------------------------------------------------------------------------------


def test_mapping_covers_hf_state_dict(reference):
    """Every HF audio tensor (clip buffers included) has exactly one row, with the right shape both ways."""
    _, state, _, _ = reference
    rows = audio.audio_mapping(CFG)
    assert sorted(name for _, name, _ in rows) == sorted(state)
    assert len({path for path, _, _ in rows}) == len(rows)
    shapes = audio.audio_param_shapes(CFG)
    for path, name, transform in rows:
        leaf = tree_get(shapes, path)
        assert audio.TO_HF[transform](np.zeros(leaf.shape)).shape == state[name].shape, name


def test_mapping_full_size_against_hf_tower():
    """The E2B table against the real-size HF audio tower, built on torch's meta device (no memory)."""
    cfg = audio.get_audio_config("e2b")
    with torch.device("meta"):
        tower = transformers.Gemma4AudioModel(transformers.Gemma4AudioConfig(**cfg.to_hf_dict()))
    hf = {"model.audio_tower." + name: tuple(t.shape) for name, t in tower.state_dict().items()}
    hf["model.embed_audio.embedding_projection.weight"] = (cfg.text_embed_dim, cfg.output_dim)
    shapes = audio.audio_param_shapes(cfg)
    rows = audio.audio_mapping(cfg)
    assert sorted(name for _, name, _ in rows) == sorted(hf)
    for path, name, transform in rows:
        leaf = tree_get(shapes, path)
        assert audio.TO_HF[transform](np.zeros(leaf.shape, np.int8)).shape == hf[name], name
    assert sum(math.prod(s) for n, s in hf.items() if n.startswith("model.audio_tower.")) == 304_825_088


def test_hf_roundtrip(reference):
    _, state, _, _ = reference
    params = audio.load_audio_from_hf(state.get, CFG)
    for out in (audio.audio_to_hf(params, CFG), audio.audio_to_hf(params)):
        assert sorted(out) == sorted(state)
        for name, value in out.items():
            assert value.dtype == np.float32 and np.array_equal(value, state[name]), name


def test_loader_errors(reference):
    _, state, _, _ = reference
    missing = dict(state)
    del missing["model.audio_tower.layers.1.self_attn.post.output_max"]
    with pytest.raises(Gemma4Error, match=r"missing audio tensors model\.audio_tower\.layers\.1\.self_attn\.post"):
        audio.load_audio_from_hf(missing.get, CFG)
    wrong = dict(state)
    wrong["model.audio_tower.layers.0.self_attn.relative_k_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(Gemma4Error, match="shape mismatch for audio_encoder/conformer/stacked_layers_0/"):
        audio.load_audio_from_hf(wrong.get, CFG)


# ----- config and parameter tree ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text_dim", [("e2b", 1536), ("e4b", 2560)])
def test_full_size_parameter_count(name, text_dim):
    """Spec §4.2/§7.1: 304 825 088 encoder parameters (incl. output projection and clip scalars), shapes only."""
    cfg = audio.get_audio_config(name)
    shapes = audio.audio_param_shapes(cfg)
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
        cfg = audio.get_audio_config(name)
        hf = transformers.Gemma4AudioConfig(**cfg.to_hf_dict())
        back = audio.AudioConfig.from_hf_dict(hf.to_dict(), text_embed_dim=cfg.text_embed_dim, name=name)
        assert back == cfg
    # config.json omits defaults: an empty dict is the E2B/E4B tower
    assert audio.AudioConfig.from_hf_dict({}, 1536, name="e2b") == audio.get_audio_config("e2b")
    with pytest.raises(Gemma4Error, match="unknown audio config"):
        audio.get_audio_config("e9b")
    with pytest.raises(Gemma4Error, match="multiple of num_heads"):
        audio.AudioConfig("bad", hidden_size=100, num_heads=8)
    with pytest.raises(Gemma4Error, match="cannot be expressed for transformers"):
        CFG.replace(subsampling_channels=(64, 8)).to_hf_dict()


def test_random_init_runs_in_every_dtype():
    features, mask = af.log_mel_features([np.zeros(9_000, np.float32), 0.1 * np.ones(4_000, np.float32)])
    for dtype in (jnp.float32, jnp.bfloat16):
        params = audio.init_audio_params(CFG, seed=1, dtype=dtype)
        tokens, token_mask = forward(params, features, mask, config=CFG)
        assert tokens.dtype == dtype and tokens.shape == (2, -(-features.shape[1] // 4), CFG.text_embed_dim)
        assert [int(m.sum()) for m in token_mask] == [af.num_audio_tokens(9_000), af.num_audio_tokens(4_000)]
        assert bool(jnp.all(jnp.isfinite(tokens)))
    reference = np.asarray(forward(audio.init_audio_params(CFG, seed=1), features, mask, config=CFG)[0])
    assert np.abs(np.asarray(tokens, np.float32) - reference)[np.asarray(token_mask)].max() < 0.1


def test_bad_encoder_inputs():
    params = audio.init_audio_params(CFG)
    features, mask = af.log_mel_features(np.zeros(4_000, np.float32))
    with pytest.raises(Gemma4Error, match=r"\[batch, frames, 128\]"):
        audio.encode(params, features[..., :64], mask, CFG)
    with pytest.raises(Gemma4Error, match="audio mask"):
        audio.encode(params, features, mask[:, :-1], CFG)
