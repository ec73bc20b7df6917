"""Config presets and derived facts against the numbers of the architecture spec (§1, §7)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import spec_numbers as spec
import transformers

from gemma4_jax import config, model
from gemma4_jax.config import Gemma4Config, Gemma4Error


@pytest.mark.parametrize("variant", config.OFFICIAL_VARIANTS)
def test_param_count_equals_official_jax_tree(variant):
    cfg = config.get_config(variant)
    assert model.count_params(model.param_shapes(cfg)) == spec.TOTAL_JAX[variant]
    shapes = model.param_shapes(cfg.text_only())
    # spec §7.1: total JAX tree minus vision encoder, audio encoder and mm projections = the text-only JAX tree.
    text_jax_tree = (
        spec.TOTAL_JAX[variant]
        - spec.VISION_ENCODER[variant]
        - spec.AUDIO_ENCODER[variant]
        - spec.MM_PROJECTIONS[variant]
    )
    assert model.count_params(shapes) == text_jax_tree
    assert text_jax_tree == spec.TEXT_HF[variant] + spec.UNUSED_READER_KV[variant]
    assert model.count_params(shapes["embedder"].get("per_layer_embeddings", {})) == spec.PLE_TABLE[variant]


def test_official_tree_names_and_shapes_e2b():
    shapes = model.param_shapes(config.E2B)
    assert shapes["embedder"]["per_layer_model_projection"]["w"].shape == (1536, 35, 256)
    assert shapes["layer_4"]["attn"]["q_einsum"]["w"].shape == (8, 1536, 512)
    assert shapes["layer_20"]["attn"]["kv_einsum"]["w"].shape == (2, 1, 1536, 256)  # present on readers too
    assert shapes["layer_14"]["mlp"]["gating_einsum"].shape == (2, 6144, 1536)  # no `/w` under mlp
    assert shapes["layer_15"]["mlp"]["linear"].shape == (12288, 1536)
    assert shapes["layer_0"]["skip_scale"].shape == (1,)
    g = model.param_shapes(config.G31B)["layer_5"]["attn"]
    assert g["k_einsum"]["w"].shape == (4, 5376, 512) and "kv_einsum" not in g


def test_layer_patterns():
    assert config.E2B.layer_string == "LLLLG" * 7
    assert config.E4B.layer_string == "LLLLLG" * 7
    assert config.G31B.layer_string == "LLLLLG" * 10
    assert config.G26B_A4B.layer_string == "LLLLLG" * 5
    assert [i for i, t in enumerate(config.E2B.layer_types) if t == config.GLOBAL] == [4, 9, 14, 19, 24, 29, 34]


def test_kv_sharing_maps():
    e2b = config.E2B.kv_source_layers
    assert e2b[:15] == tuple(range(15))
    assert {i: e2b[i] for i in (19, 24, 29, 34)} == {19: 14, 24: 14, 29: 14, 34: 14}
    assert all(e2b[i] == 13 for i in range(15, 35) if i % 5 != 4)
    e4b = config.E4B.kv_source_layers
    assert e4b[:24] == tuple(range(24))
    assert all(e4b[i] == (23 if i in (29, 35, 41) else 22) for i in range(24, 42))
    assert config.G31B.kv_source_layers == tuple(range(60))


def test_per_layer_widths():
    e2b = config.E2B
    assert [e2b.layer_ffw_hidden(i) for i in (0, 14, 15, 34)] == [6144, 6144, 12288, 12288]
    assert (e2b.layer_head_dim(4), e2b.layer_head_dim(3)) == (512, 256)
    assert (config.E4B.layer_kv_heads(5), config.G31B.layer_kv_heads(5), config.G31B.layer_kv_heads(4)) == (2, 4, 16)
    assert config.G26B_A4B.layer_kv_heads(29) == 2 and config.G26B_A4B.layer_k_eq_v(29)


@pytest.mark.parametrize("variant", config.OFFICIAL_VARIANTS)
def test_cache_bytes(variant):
    cfg = config.get_config(variant)
    for context, (_, capped_mib) in spec.KV_MIB[variant].items():
        assert model.cache_bytes(cfg, context) == capped_mib * 2**20
    assert model.cache_bytes(cfg, 1) == spec.KV_BYTES_PER_TOKEN[variant]


def test_rope_constants():
    local = model.rope_inv_freq(256, 10_000.0)
    np.testing.assert_allclose(local[:4], [1, 0.93057204, 0.86596432, 0.80584219], rtol=1e-7)
    np.testing.assert_allclose(local[127], 1.0746078e-4, rtol=1e-6)
    glob = model.rope_inv_freq(512, 1_000_000.0, 0.25)
    np.testing.assert_allclose(glob[:4], [1, 0.94746353, 0.89768713, 0.85052582], rtol=1e-7)
    np.testing.assert_allclose(glob[63], 0.033376247, rtol=1e-7)
    assert (glob[64:] == 0).all() and glob.shape == (256,)
    # rotated dims of a global head are [0, 64) and [256, 320): everything else passes through unchanged
    x = np.random.default_rng(0).normal(size=(1, 1, 1, 512))
    y = np.asarray(model.apply_rope(jnp.asarray(x, jnp.float32), jnp.array([[1000]]), glob))
    unrotated = np.r_[64:256, 320:512]
    np.testing.assert_array_equal(y[..., unrotated], x[..., unrotated].astype(np.float32))
    assert not np.allclose(y[..., :64], x[..., :64], atol=1e-3)


def test_embedding_scale_rounds_to_bf16():
    for cfg, bf16 in ((config.E2B, 39.25), (config.E4B, 50.5), (config.G31B, 73.5), (config.G26B_A4B, 53.0)):
        assert float(jnp.asarray(cfg.embed_scale, jnp.bfloat16)) == bf16


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_hf_config_round_trip(name):
    cfg = config.get_config(name)
    assert Gemma4Config.from_hf_dict(cfg.to_hf_dict(), name=name) == cfg
    # transformers' own config classes accept the dict, and what they write back (with `per_layer_config` for the
    # global-layer overrides) reads back to the same config
    text = transformers.Gemma4TextConfig(**cfg.text_only().to_hf_dict())
    # a text config carries no media token ids: they read back as the official ones
    media_ids = {f.name: f.default for f in dataclasses.fields(Gemma4Config) if f.name.endswith("_token_id")}
    assert Gemma4Config.from_hf_dict(text.to_dict(), name=name) == cfg.text_only().replace(**media_ids)
    assert text.kv_sharing_modes.count("reuse") == cfg.num_kv_shared_layers
    if cfg.multimodal:
        hf = transformers.Gemma4Config(**cfg.to_hf_dict())
        assert Gemma4Config.from_hf_dict(hf.to_dict(), name=name) == cfg
        assert (hf.vision_config is None) == (cfg.vision is None)
        assert (hf.audio_config is None) == (cfg.audio is None)


def test_official_variants_have_their_towers():
    """Every variant sees; only E2B and E4B hear (spec §4)."""
    for cfg in (config.E2B, config.E4B, config.G31B, config.G26B_A4B):
        assert cfg.vision is not None
        assert (cfg.audio is not None) == (cfg.name in ("e2b", "e4b"))
    assert config.G31B.vision.standardize and not config.E2B.vision.standardize
    assert config.E2B.vision.clipped_linears and not config.G31B.vision.clipped_linears


def test_multimodal_config_json_without_towers_reads_as_text_only():
    d = {"model_type": "gemma4", "text_config": config.E2B.text_only().to_hf_dict(), "vision_config": None}
    assert Gemma4Config.from_hf_dict(d, name="e2b") == config.E2B.text_only()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layer_types": (config.LOCAL, config.LOCAL)}, "last layer must be global"),
        ({"num_kv_heads": 3}, "multiple of the KV head counts"),
        ({"num_kv_shared_layers": 9}, "num_kv_shared_layers"),
        ({"num_experts": 4, "num_experts_per_token": 5, "expert_hidden": 8}, "MoE"),
    ],
)
def test_invalid_configs_are_rejected(changes, message):
    with pytest.raises(Gemma4Error, match=message):
        config.TINY_E2B.replace(**changes)


def test_unknown_variant():
    with pytest.raises(Gemma4Error, match="unknown variant 'e3b'; choose one of: e2b, e4b"):
        config.get_config("e3b")


def test_unsupported_hf_fields():
    d = config.TINY_E2B.to_hf_dict() | {"hidden_activation": "silu"}
    with pytest.raises(Gemma4Error, match="hidden_activation"):
        Gemma4Config.from_hf_dict(d)
    with pytest.raises(Gemma4Error, match="missing the field 'hidden_size'"):
        Gemma4Config.from_hf_dict({k: v for k, v in config.TINY_E2B.to_hf_dict().items() if k != "hidden_size"})
