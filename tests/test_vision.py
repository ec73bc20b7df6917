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
import torch.nn.functional as F
import transformers
from hf_reference import full_float64
from transformers.models.gemma4 import modeling_gemma4

from gemma4_jax import config as text_config
from gemma4_jax import image, model, vision
from gemma4_jax.errors import Gemma4Error

skimage_data = pytest.importorskip("skimage.data")

TOLERANCE = {"float64": 1e-9, "float32": 5e-4}
TEXT = text_config.TINY_KEQV  # only its width (64) matters: the projection's output size


def _photo(name):
    return os.path.join(skimage_data.data_dir, name)


def hf_vision_model(cfg: vision.VisionConfig, seed: int = 0) -> transformers.Gemma4ForConditionalGeneration:
    hf_config = transformers.Gemma4Config(
        text_config=TEXT.to_hf_dict(), vision_config=cfg.to_hf_dict(), audio_config=None
    )
    hf_config._attn_implementation = "eager"
    hf_config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Gemma4ForConditionalGeneration(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    state = hf.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if not name.startswith(("model.vision_tower.", "model.embed_vision.")):
                continue
            if name.endswith(("input_min", "input_max", "output_min", "output_max")):
                continue  # below, shared by the projections the official tree clips together
            if name.endswith("std_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
            elif tensor.ndim <= 1:  # norm scales, std_scale: positive, away from 1 and from each other
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / math.sqrt(tensor.shape[-1]))
        if cfg.clipped_linears:
            groups = (["self_attn.q_proj"], ["self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"])
            groups += (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])
            for i in range(cfg.num_layers):
                for group in groups:
                    # |bounds| in [0.5, 2]: activations are O(1), so a good share is clamped on each side
                    low_in, high_in, low_out, high_out = (0.5 + 1.5 * torch.rand(4, generator=gen)).tolist()
                    for proj in group:
                        prefix = f"model.vision_tower.encoder.layers.{i}.{proj}."
                        state[prefix + "input_min"].fill_(-low_in)
                        state[prefix + "input_max"].fill_(high_in)
                        state[prefix + "output_min"].fill_(-low_out)
                        state[prefix + "output_max"].fill_(high_out)
    return hf


@contextlib.contextmanager
def vision_float64():
    """`full_float64` plus the two float32 spots of the HF vision tower: the axial RoPE table and the pooling
    weights (`one_hot(...).float()`, which would not even multiply a float64 tensor)."""
    rope_forward = modeling_gemma4.Gemma4VisionRotaryEmbedding.forward
    avg_pool = modeling_gemma4.Gemma4VisionPooler._avg_pool_by_positions

    def rope_forward_f64(self, x, position_ids):
        if x.dtype != torch.float64:
            return rope_forward(self, x, position_ids)
        spatial = self.config.head_dim // 2
        base = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / base ** (torch.arange(0, spatial, 2, dtype=torch.float64) / spatial)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())

    def avg_pool_f64(self, hidden_states, pixel_position_ids, length):
        if hidden_states.dtype != torch.float64:
            return avg_pool(self, hidden_states, pixel_position_ids, length)
        k = int((hidden_states.shape[1] // length) ** 0.5)
        clamped = pixel_position_ids.clamp(min=0)
        max_x = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
        idx = torch.div(clamped, k, rounding_mode="floor")
        idx = idx[..., 0] + (max_x // k) * idx[..., 1]
        weights = F.one_hot(idx.long(), length).to(torch.float64) / k**2
        return weights.transpose(1, 2) @ hidden_states, torch.logical_not((weights == 0).all(dim=1))

    with full_float64():
        modeling_gemma4.Gemma4VisionRotaryEmbedding.forward = rope_forward_f64
        modeling_gemma4.Gemma4VisionPooler._avg_pool_by_positions = avg_pool_f64
        try:
            yield
        finally:
            modeling_gemma4.Gemma4VisionRotaryEmbedding.forward = rope_forward
            modeling_gemma4.Gemma4VisionPooler._avg_pool_by_positions = avg_pool


def hf_image_features(hf, patches, positions, precision):
    """(soft tokens per image before the projection, after it), padding stripped, from transformers."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    ctx = vision_float64() if precision == "float64" else contextlib.nullcontext()
    with torch.no_grad(), ctx, one_torch_thread():
        hf = hf.to(dtype)
        out = hf.get_image_features(torch.tensor(patches, dtype=dtype), torch.tensor(positions, dtype=torch.long))
    return out.last_hidden_state.numpy(), [t.numpy() for t in out.pooler_output]


@contextlib.contextmanager
def one_torch_thread():
    """These small forwards run ~15x faster on one thread than on two contended ones (XLA's pool is idle)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_from_hf(hf, cfg, precision):
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    return vision.load_vision_from_hf(lambda name: state.get("model." + name), cfg, np.dtype(precision), TEXT.embed_dim)


encode = jax.jit(vision.encode, static_argnames="config")

# (images, budget): a square and a landscape photo (both padded); a grayscale photo next to a 1x2000 strip that
# fills the budget exactly (no padding at all) and needs positions up to x = 209.
CASES = {
    "photos-70": ([_photo("astronaut.png"), _photo("rocket.jpg")], 70),
    "extreme-70": ([_photo("camera.png"), np.full((1, 2000, 3), 200, np.uint8)], 70),
    "photos-140": ([_photo("coffee.png"), _photo("chelsea.png")], 140),
}


@pytest.fixture(scope="module", params=["tiny", "tiny_std"])
def reference(request):
    cfg = vision.get_vision_config(request.param)
    return cfg, hf_vision_model(cfg, seed=1 + cfg.num_layers)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
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
        tokens, valid = encode(params["vision_encoder"], patches, positions, config=cfg)
        embeddings = vision.project(params["embedder"]["mm_input_projection"], tokens, cfg)
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
    tokens, valid = encode(params["vision_encoder"], patches, positions, config=cfg)
    embeddings = vision.project(params["embedder"]["mm_input_projection"], tokens, cfg)
    assert tokens.dtype == embeddings.dtype == jnp.bfloat16
    got = vision.split_images(embeddings.astype(jnp.float32), valid)
    error = max(np.abs(g - e).max() for g, e in zip(got, exact, strict=True))
    assert error <= 2 * hf_error, f"bf16 error {error:.3g}, transformers' bf16 error {hf_error:.3g}"


def test_padding_does_not_change_valid_tokens(reference):
    """The same image with 630 or 1260 patch slots gives the same soft tokens (padding is masked, spec §6 #9);
    `image_embeddings` (encode + project) zeroes the padding slots."""
    cfg, _ = reference
    params = vision.init_vision_params(cfg, seed=3)
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
    cfg = vision.TINY_VISION
    params = vision.init_vision_params(cfg, seed=5)
    one = image.preprocess(_photo("coffee.png"), 70)
    whole, _ = jax.jit(lambda p, x, y: vision.encode(p, x, y, cfg))(params, one.patches[None], one.positions[None])
    monkeypatch.setattr(vision, "_QUERY_BLOCK", 100)  # read when tracing: a new jitted function sees it
    blocked, _ = jax.jit(lambda p, x, y: vision.encode(p, x, y, cfg))(params, one.patches[None], one.positions[None])
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_mapping_covers_every_hf_tensor_and_round_trips(reference):
    cfg, hf = reference
    names = {k for k in hf.state_dict() if k.startswith(("model.vision_tower.", "model.embed_vision."))}
    per_layer = [n for _, hf_names, _, _ in vision.VISION_HF_TABLE for n in hf_names if "{i}" in n]
    assert per_layer, "the table has per-layer rows"
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    params = vision.load_vision_from_hf(lambda name: state.get("model." + name), cfg)
    written = dict(vision.vision_to_hf(params, cfg))
    assert {"model." + n for n in written} == names
    for name, value in written.items():
        assert np.array_equal(value, state["model." + name]), name
    shapes = vision.vision_param_shapes(cfg)
    loaded = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params["vision_encoder"])
    assert loaded == jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes)


def test_loader_errors(reference):
    cfg, hf = reference
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    with pytest.raises(Gemma4Error, match="missing vision tensors"):
        vision.load_vision_from_hf(lambda name: None if "layers.1.mlp" in name else state.get("model." + name), cfg)
    with pytest.raises(Gemma4Error, match="shape mismatch"):
        vision.load_vision_from_hf(lambda name: state.get("model." + name), cfg.replace(ffw_hidden=cfg.ffw_hidden + 1))
    with pytest.raises(Gemma4Error, match="shape mismatch"):
        vision.load_vision_from_hf(lambda name: state.get("model." + name), cfg, text_dim=TEXT.embed_dim + 1)
    if cfg.clipped_linears:
        bad = dict(state)
        bad["model.vision_tower.encoder.layers.0.self_attn.v_proj.input_min"] = np.float32(-7.0)
        with pytest.raises(Gemma4Error, match="clip bounds"):
            vision.load_vision_from_hf(lambda name: bad.get("model." + name), cfg)


# ----- configs and parameter counts (spec §4.1, §5.1, §7.1) -------------------------------------------------

SPEC_COUNTS = {"e2b": 167_364_928, "e4b": 167_364_928, "31b": 569_550_384, "26b_a4b": 569_550_384}


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_parameter_counts_match_spec(name):
    cfg = vision.get_vision_config(name)
    shapes = vision.vision_param_shapes(cfg)
    assert model.count_params(shapes) == SPEC_COUNTS[name]
    assert model.count_params(shapes["entry"]["pos_emb"]) == 2 * 10_240 * cfg.width


def test_e2b_tree_is_the_official_one():
    cfg = vision.get_vision_config("e2b")
    shapes = vision.vision_param_shapes(cfg)
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
    big = vision.vision_param_shapes(vision.get_vision_config("31b"))
    assert big["standardize"]["bias"].shape == big["standardize"]["scale"].shape == (1152,)
    assert "clip_input_min" not in big["transformer"]["stacked_layers"]["block"]["attn"]["q_einsum"]
    assert big["transformer"]["stacked_layers"]["block"]["attn"]["q_einsum"]["w"].shape == (27, 16, 1152, 72)


@pytest.mark.parametrize("name", ["e2b", "31b", "tiny", "tiny_std"])
def test_hf_config_round_trip(name):
    cfg = vision.get_vision_config(name)
    hf_config = transformers.Gemma4VisionConfig(**cfg.to_hf_dict())
    assert vision.VisionConfig.from_hf_dict(hf_config.to_dict(), name=name) == cfg
    assert vision.VisionConfig.from_hf_dict({"vision_config": cfg.to_hf_dict()}, name=name) == cfg
    assert hf_config.head_dim == cfg.head_dim


def test_vision_rope_constants():
    """Spec §7.3: per-axis inverse frequencies of the vision RoPE (base 100)."""
    for cfg, expected in ((vision.E2B_VISION, [1, 0.74989421, 0.56234133, 0.4216965]), (vision.G31B_VISION, None)):
        half = cfg.head_dim // 2
        inv_freq = cfg.rope_base ** (-2.0 * np.arange(half // 2) / half)
        if expected:
            np.testing.assert_allclose(inv_freq[:4], expected, rtol=1e-6)
            np.testing.assert_allclose(inv_freq[15], 0.013335214, rtol=1e-6)
        else:
            np.testing.assert_allclose(inv_freq[:3], [1, 0.77426368, 0.59948425], rtol=1e-6)
            np.testing.assert_allclose(inv_freq[17], 0.012915497, rtol=1e-6)
    assert math.isclose(vision.E2B_VISION.exit_scale, 27.712813, rel_tol=1e-7)
    assert math.isclose(vision.G31B_VISION.exit_scale, 33.941125, rel_tol=1e-7)


def test_bad_configs_and_inputs():
    with pytest.raises(Gemma4Error, match="multiple of 4"):
        vision.VisionConfig(name="x", width=36, num_layers=1, num_heads=6, ffw_hidden=8)
    with pytest.raises(Gemma4Error, match="pooling_kernel"):
        vision.TINY_VISION.replace(pooling_kernel=2)
    with pytest.raises(Gemma4Error, match="num_key_value_heads"):
        vision.VisionConfig.from_hf_dict({**vision.TINY_VISION.to_hf_dict(), "num_key_value_heads": 1})
    with pytest.raises(Gemma4Error, match="missing the field"):
        vision.VisionConfig.from_hf_dict({"hidden_size": 32})
    with pytest.raises(Gemma4Error, match="unknown vision variant"):
        vision.get_vision_config("e3b")
    params = vision.init_vision_params(vision.TINY_VISION)
    with pytest.raises(Gemma4Error, match="multiple of 9"):
        vision.encode(params, np.zeros((1, 10, 768)), np.zeros((1, 10, 2), int), vision.TINY_VISION)
    with pytest.raises(Gemma4Error, match="do not match"):
        vision.encode(params, np.zeros((1, 9, 700)), np.zeros((1, 9, 2), int), vision.TINY_VISION)
