"""The vision encoder + multimodal embedder against Hugging Face transformers (CPU torch), on identical random
weights, and the official parameter tree against the spec.

The reference is `Gemma4ForConditionalGeneration.get_image_features` (vision tower, padding stripped, then
`embed_vision`). Every HF tensor is random (norm scales and standardization away from 1, clip bounds that clamp
a good share of activations) and reaches our code only through the HF <-> official mapping of
`gemma4_jax.vision`. Inputs are real photographs (scikit-image) through `gemma4_jax.image`, two per batch with
different patch counts, so padding is masked in attention, left out of pooling and stripped at the end.

Tolerances (max-abs over the projected soft tokens, which are O(1)): float64 1e-9, float32 5e-4.
"""

from __future__ import annotations

import contextlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from mm_reference import hf_mm_model, hf_state, mm_float64, one_torch_thread, params_of

from gemma4_jax import config, hf_format, image, model, param_spec, vision
from gemma4_jax.config import VisionConfig
from gemma4_jax.errors import Gemma4Error

skimage_data = pytest.importorskip("skimage.data")

TOLERANCE = {"float64": 1e-9, "float32": 5e-4}


def _photo(name):
    return os.path.join(skimage_data.data_dir, name)


def hf_image_features(hf, patches, positions, precision):
    """(soft tokens per image before the projection, after it), padding stripped, from transformers."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    ctx = mm_float64(hf) if precision == "float64" else contextlib.nullcontext()
    with torch.no_grad(), ctx, one_torch_thread():
        out = hf.get_image_features(torch.tensor(patches, dtype=dtype), torch.tensor(positions, dtype=torch.long))
    return out.last_hidden_state.numpy(), [t.numpy() for t in out.pooler_output]


def load_from_hf(hf, cfg, precision):
    return params_of(cfg, hf_state(hf), np.dtype(precision), parts=("vision",))


encode = jax.jit(vision.encode, static_argnames="config")

# (images, budget): a square and a landscape photo (both padded); a grayscale photo next to a 1x2000 strip that
# fills the budget exactly (no padding at all) and needs positions up to x = 209.
CASES = {
    "photos-70": ([_photo("astronaut.png"), _photo("rocket.jpg")], 70),
    "extreme-70": ([_photo("camera.png"), np.full((1, 2000, 3), 200, np.uint8)], 70),
    "photos-140": ([_photo("coffee.png"), _photo("chelsea.png")], 140),
}


@pytest.fixture(scope="module", params=["tiny_mm", "tiny_mm_bidi"])
def reference(request):
    """(the whole config, transformers' random model of it); its vision tower is clipped (E2B-style) or
    standardizing (31B-style)."""
    cfg = config.get_config(request.param)
    return cfg, hf_mm_model(cfg, seed=1 + cfg.vision.num_layers)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", [c if c == "extreme-70" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_image_features_match_hf(reference, precision, case):
    cfg, hf = reference
    images, budget = CASES[case]
    patches, positions, counts = image.preprocess_batch(images, budget)
    if precision == "float64":
        patches = patches.astype(np.float64)
    hidden, expected = hf_image_features(hf, patches, positions, precision)
    assert [len(e) for e in expected] == counts
    with jax.enable_x64(precision == "float64"):
        params = load_from_hf(hf, cfg, precision)
        tokens, valid = encode(params["vision_encoder"], patches, positions, config=cfg.vision)
        embeddings = vision.project(params["embedder"]["mm_input_projection"], tokens, cfg.vision)
    assert tokens.dtype == embeddings.dtype == jnp.dtype(precision)
    assert np.asarray(valid).sum(-1).tolist() == counts
    # the valid soft tokens of each image are its first n slots, in row-major order
    assert all(np.asarray(v)[:n].all() and not np.asarray(v)[n:].any() for v, n in zip(valid, counts, strict=True))
    got = vision.split_images(embeddings, valid)
    assert [g.shape for g in got] == [e.shape for e in expected]
    error = max(np.abs(g - e).max() for g, e in zip(got, expected, strict=True))
    assert error <= TOLERANCE[precision], f"{cfg.name} {precision} {case}: max-abs error {error:.3g}"
    # before the projection (HF's vision tower output, padding stripped and concatenated); O(10) values
    scale = np.abs(hidden).max()
    hidden_error = np.abs(np.concatenate(vision.split_images(tokens, valid)) - hidden).max()
    assert hidden_error <= TOLERANCE[precision] * max(1.0, scale), f"encoder output error {hidden_error:.3g}"


def test_bfloat16_is_as_close_as_hf_bfloat16(reference):
    """bf16 parameters compute in bf16 (norms, softmax, pooling, x sqrt(d) and standardization in f32, as HF
    does): no further from the float32 result than transformers' own bf16 run."""
    cfg, hf = reference
    patches, positions, _ = image.preprocess_batch(CASES["photos-70"][0], 70)
    _, exact = hf_image_features(hf, patches, positions, "float32")
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), load_from_hf(hf, cfg, "float32"))
    with torch.no_grad(), one_torch_thread():
        hf.to(torch.bfloat16)
        out = hf.get_image_features(torch.tensor(patches), torch.tensor(positions, dtype=torch.long)).pooler_output
        hf.to(torch.float32)
    hf_error = max(np.abs(t.float().numpy() - e).max() for t, e in zip(out, exact, strict=True))
    tokens, valid = encode(params["vision_encoder"], patches, positions, config=cfg.vision)
    embeddings = vision.project(params["embedder"]["mm_input_projection"], tokens, cfg.vision)
    assert tokens.dtype == embeddings.dtype == jnp.bfloat16
    got = vision.split_images(embeddings.astype(jnp.float32), valid)
    error = max(np.abs(g - e).max() for g, e in zip(got, exact, strict=True))
    assert error <= 2 * hf_error, f"bf16 error {error:.3g}, transformers' bf16 error {hf_error:.3g}"


def test_padding_does_not_change_valid_tokens(reference):
    """The same image with 630 or 1260 patch slots gives the same soft tokens (padding is masked, spec §6 #9);
    `image_embeddings` (encode + project) zeroes the padding slots."""
    full, _ = reference
    cfg = full.vision
    params = model.init_params(full, seed=3, dtype=jnp.float32)["vision_encoder"]
    w = np.random.default_rng(4).standard_normal((cfg.width, 8)).astype(np.float32)
    one = image.preprocess(_photo("rocket.jpg"), 70)
    short, valid_short = encode(params, one.patches[None], one.positions[None], config=cfg)
    patches = np.concatenate([one.patches, np.zeros_like(one.patches)])[None]
    positions = np.concatenate([one.positions, np.full_like(one.positions, -1)])[None]
    tree = {"vision_encoder": params, "embedder": {"mm_input_projection": {"w": w}}}
    long, valid_long = jax.jit(vision.image_embeddings, static_argnames="config")(tree, patches, positions, config=cfg)
    n = one.num_soft_tokens
    assert int(valid_short.sum()) == int(valid_long.sum()) == n and not np.asarray(long)[0, n:].any()
    short = np.asarray(vision.project(w, short, cfg))[0, :n]
    assert np.abs(short - np.asarray(long)[0, :n]).max() <= 1e-5 * np.abs(short).max()  # f32 summation order


def test_query_blocks_do_not_change_the_result(monkeypatch):
    """Large images attend in blocks of queries (memory); blocks of 100 over 630 patches give the same result."""
    cfg = config.TINY_VISION
    params = model.init_params(config.TINY_MM, seed=5, dtype=jnp.float32)["vision_encoder"]
    one = image.preprocess(_photo("coffee.png"), 70)
    whole, _ = jax.jit(lambda p, x, y: vision.encode(p, x, y, cfg))(params, one.patches[None], one.positions[None])
    monkeypatch.setattr(vision, "_QUERY_BLOCK", 100)  # read when tracing: a new jitted function sees it
    blocked, _ = jax.jit(lambda p, x, y: vision.encode(p, x, y, cfg))(params, one.patches[None], one.positions[None])
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_spec_round_trips_every_hf_tensor(reference):
    """Loading through the spec and writing back gives every HF vision tensor, bit for bit, and nothing else."""
    cfg, hf = reference
    state = hf_state(hf)
    names = {k for k in state if k.startswith(("model.vision_tower.", "model.embed_vision."))}
    params = load_from_hf(hf, cfg, "float32")
    written = {
        "model." + name: array
        for leaf in param_spec.param_spec(cfg)
        if leaf.part == "vision"
        for name, array in zip(leaf.hf, leaf.to_hf(np.asarray(model.tree_get(params, leaf.path))), strict=True)
    }
    assert set(written) == names
    for name, value in written.items():
        assert np.array_equal(value, state[name]), name
    shapes = model.param_shapes(cfg, jnp.float32)["vision_encoder"]
    loaded = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params["vision_encoder"])
    assert loaded == jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes)


def test_loader_errors(reference):
    cfg, hf = reference
    state = hf_state(hf)

    def load(c, read):
        return hf_format.params_from_hf(c, read, np.float32, text_prefix="model.language_model.", parts=("vision",))

    with pytest.raises(Gemma4Error, match=r"missing tensors model\.vision_tower\.encoder\.layers\.1\.mlp"):
        load(cfg, lambda name: None if "vision_tower.encoder.layers.1.mlp" in name else state.get(name))
    wider = cfg.replace(vision=cfg.vision.replace(ffw_hidden=cfg.vision.ffw_hidden + 1))
    with pytest.raises(Gemma4Error, match="shape mismatch for vision_encoder/transformer/stacked_layers/block/mlp"):
        load(wider, state.get)
    with pytest.raises(Gemma4Error, match="shape mismatch for embedder/mm_input_projection/w"):
        load(cfg.replace(embed_dim=cfg.embed_dim + 1), state.get)
    if cfg.vision.clipped_linears:
        bad = dict(state)
        bad["model.vision_tower.encoder.layers.0.self_attn.v_proj.input_min"] = np.float32(-7.0)
        with pytest.raises(Gemma4Error, match="differ; the official tree holds one value"):
            load(cfg, bad.get)


# ----- configs and parameter counts (spec §4.1, §5.1, §7.1) -------------------------------------------------

SPEC_COUNTS = {"e2b": 167_364_928, "e4b": 167_364_928, "31b": 569_550_384, "26b_a4b": 569_550_384}


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_parameter_counts_match_spec(name):
    shapes = model.param_shapes(config.get_config(name))
    assert model.count_params(shapes["vision_encoder"]) == SPEC_COUNTS[name]
    assert (
        model.count_params(shapes["vision_encoder"]["entry"]["pos_emb"])
        == 2 * 10_240 * config.get_config(name).vision.width
    )
    d_v, d = config.get_config(name).vision.width, config.get_config(name).embed_dim
    assert shapes["embedder"]["mm_input_projection"]["w"].shape == (d_v, d)


def test_e2b_tree_is_the_official_one():
    shapes = model.param_shapes(config.E2B)["vision_encoder"]
    block = shapes["transformer"]["stacked_layers"]["block"]
    assert shapes["entry"]["input_projection"]["w"].shape == (768, 768)
    assert shapes["entry"]["pos_emb"].shape == (10_240, 2, 768)
    assert block["attn"]["q_einsum"]["w"].shape == (16, 12, 768, 64)
    assert block["attn"]["kv_einsum"]["w"].shape == (16, 2, 12, 768, 64)
    assert block["attn"]["attn_vec_einsum"]["w"].shape == (16, 12, 64, 768)
    assert block["attn"]["query_norm"]["scale"].shape == block["attn"]["key_norm"]["scale"].shape == (16, 64)
    assert block["mlp"]["gating_einsum"]["w"].shape == (16, 2, 3072, 768)
    assert block["mlp"]["linear"]["w"].shape == (16, 3072, 768)
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
        assert block[norm]["scale"].shape == (16, 768)
    for scope in (block["attn"]["q_einsum"], block["attn"]["kv_einsum"], block["mlp"]["linear"]):
        assert {k: v.shape for k, v in scope.items() if k.startswith("clip")} == {
            "clip_input_min": (16,),
            "clip_input_max": (16,),
            "clip_output_min": (16,),
            "clip_output_max": (16,),
        }
    assert "standardize" not in shapes
    assert shapes["entry"]["pos_emb"].dtype == jnp.float32  # the encoders run in float32
    big = model.param_shapes(config.G31B)["vision_encoder"]
    assert big["standardize"]["bias"].shape == big["standardize"]["scale"].shape == (1152,)
    assert "clip_input_min" not in big["transformer"]["stacked_layers"]["block"]["attn"]["q_einsum"]
    assert big["transformer"]["stacked_layers"]["block"]["attn"]["q_einsum"]["w"].shape == (27, 16, 1152, 72)


@pytest.mark.parametrize("name", ["e2b", "31b", "tiny", "tiny_std"])
def test_hf_config_round_trip(name):
    cfg = config.get_vision_config(name)
    hf_config = transformers.Gemma4VisionConfig(**cfg.to_hf_dict())
    assert VisionConfig.from_hf_dict(hf_config.to_dict(), name=name) == cfg
    assert VisionConfig.from_hf_dict({"vision_config": cfg.to_hf_dict()}, name=name) == cfg
    assert hf_config.head_dim == cfg.head_dim


def test_vision_rope_constants():
    """Spec §7.3: per-axis inverse frequencies of the vision RoPE (base 100)."""
    for cfg, expected in ((config.E2B_VISION, [1, 0.74989421, 0.56234133, 0.4216965]), (config.G31B_VISION, None)):
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_base ** (-2.0 * np.arange(half // 2) / half)
        if expected:
            np.testing.assert_allclose(inv_freq[:4], expected, rtol=1e-6)
            np.testing.assert_allclose(inv_freq[15], 0.013335214, rtol=1e-6)
        else:
            np.testing.assert_allclose(inv_freq[:3], [1, 0.77426368, 0.59948425], rtol=1e-6)
            np.testing.assert_allclose(inv_freq[17], 0.012915497, rtol=1e-6)
    assert math.isclose(config.E2B_VISION.exit_scale, 27.712813, rel_tol=1e-7)
    assert math.isclose(config.G31B_VISION.exit_scale, 33.941125, rel_tol=1e-7)


def test_bad_configs_and_inputs():
    with pytest.raises(Gemma4Error, match="multiple of 4"):
        VisionConfig(name="x", width=36, num_layers=1, num_heads=6, ffw_hidden=8)
    with pytest.raises(Gemma4Error, match="pooling_kernel"):
        config.TINY_VISION.replace(pooling_kernel=2)
    with pytest.raises(Gemma4Error, match="num_key_value_heads"):
        VisionConfig.from_hf_dict({**config.TINY_VISION.to_hf_dict(), "num_key_value_heads": 1})
    with pytest.raises(Gemma4Error, match="missing the field"):
        VisionConfig.from_hf_dict({"hidden_size": 32})
    with pytest.raises(Gemma4Error, match="unknown vision variant"):
        config.get_vision_config("e3b")
    params = model.init_params(config.TINY_MM, dtype=jnp.float32)["vision_encoder"]
    with pytest.raises(Gemma4Error, match="multiple of 9"):
        vision.encode(params, np.zeros((1, 10, 768)), np.zeros((1, 10, 2), int), config.TINY_VISION)
    with pytest.raises(Gemma4Error, match="do not match"):
        vision.encode(params, np.zeros((1, 9, 700)), np.zeros((1, 9, 2), int), config.TINY_VISION)
