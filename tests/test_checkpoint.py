"""HF-format checkpoints: lossless round trip, transformers reads what we write, clear errors on bad files."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gemma4_jax import config, hf_format, model
from gemma4_jax.errors import Gemma4Error


@functools.cache
def _random(cfg, dtype=jnp.float32, seed=0):
    """Random weights; norm scales and scalars too (0.5..1.5, all distinct), so a swapped tensor cannot pass."""
    params = model.init_params(cfg, seed, dtype)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        leaf if leaf.ndim > 1 else (0.5 + jax.random.uniform(k, leaf.shape)).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _zero_unused_reader_kv(cfg, params):
    """Readers' K/V are not part of the HF format: they load as zeros."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for i in range(cfg.num_layers):
        if cfg.is_kv_reader(i):
            attn = out[f"layer_{i}"]["attn"]
            for name in ("kv_einsum", "k_einsum", "key_norm"):
                if name in attn:
                    attn[name] = jax.tree_util.tree_map(jnp.zeros_like, attn[name])
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny_keqv", "tiny_moe"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, name, dtype):
    cfg = config.get_config(name)
    params = _random(cfg, dtype)
    hf_format.save_hf_checkpoint(str(tmp_path), cfg, params)
    loaded_cfg, loaded = hf_format.load_hf_checkpoint(str(tmp_path), dtype=dtype)
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name)
    expected = _zero_unused_reader_kv(cfg, params)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
def test_transformers_loads_what_we_write(tmp_path, name):
    cfg = config.get_config(name)
    params = _random(cfg, jnp.float32, seed=3)
    hf_format.save_hf_checkpoint(str(tmp_path), cfg, params)
    hf = transformers.Gemma4ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    logits, _ = jax.jit(model.apply, static_argnames="config")(params, tokens, config=cfg)
    assert np.abs(np.asarray(logits) - expected).max() < 5e-4


def test_reader_kv_written_by_the_official_converter_loads(tmp_path):
    cfg = config.TINY_E2B
    hf_format.save_hf_checkpoint(str(tmp_path), cfg, _random(cfg))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    reader = cfg.first_kv_shared_layer
    extra = np.full((cfg.layer_kv_heads(reader) * cfg.layer_head_dim(reader), cfg.embed_dim), 0.5, np.float32)
    tensors[f"model.layers.{reader}.self_attn.k_proj.weight"] = extra
    tensors[f"model.layers.{reader}.self_attn.v_proj.weight"] = extra
    save_file(tensors, file)
    _, params = hf_format.load_hf_checkpoint(str(tmp_path), dtype=jnp.float32)
    assert float(params[f"layer_{reader}"]["attn"]["kv_einsum"]["w"][0, 0, 0, 0]) == 0.5


@pytest.fixture
def saved(tmp_path):
    cfg = config.TINY_KEQV
    hf_format.save_hf_checkpoint(str(tmp_path), cfg, _random(cfg))
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(Gemma4Error, match="checkpoint directory not found"):
        hf_format.load_hf_checkpoint(str(tmp_path / "nope"))


def test_missing_config(saved):
    os.remove(saved / "config.json")
    with pytest.raises(Gemma4Error, match=r"missing config\.json"):
        hf_format.load_hf_checkpoint(str(saved))


def test_missing_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(Gemma4Error, match=r"no \*.safetensors files"):
        hf_format.load_hf_checkpoint(str(saved))


def test_truncated_weights(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(Gemma4Error, match=r"truncated|not a readable safetensors"):
        hf_format.load_hf_checkpoint(str(saved))


def test_corrupt_header(saved):
    file = saved / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    with pytest.raises(Gemma4Error, match="not a readable safetensors"):
        hf_format.load_hf_checkpoint(str(saved))


def _edit_config(path, **changes):
    file = path / "config.json"
    d = json.loads(file.read_text())
    d.update(changes)
    file.write_text(json.dumps(d))


def test_config_weights_shape_mismatch(saved):
    _edit_config(saved, intermediate_size=128)
    with pytest.raises(
        Gemma4Error,
        match=r"shape mismatch for layer_0/mlp/gating_einsum: layers.0.mlp.gate_proj.weight has shape \(96, 64\), "
        r"expected \(128, 64\)",
    ):
        hf_format.load_hf_checkpoint(str(saved))


def test_config_with_more_layers_than_weights(saved):
    layer_types = json.loads((saved / "config.json").read_text())["layer_types"]
    _edit_config(saved, num_hidden_layers=9, layer_types=layer_types + layer_types[:3])
    with pytest.raises(Gemma4Error, match=r"missing tensors model\.layers\.6\."):
        hf_format.load_hf_checkpoint(str(saved))


def test_config_with_fewer_layers_than_weights(saved):
    layer_types = json.loads((saved / "config.json").read_text())["layer_types"]
    _edit_config(saved, num_hidden_layers=3, layer_types=layer_types[:3])
    with pytest.raises(Gemma4Error, match="tensors not in a 3-layer config"):
        hf_format.load_hf_checkpoint(str(saved))


def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    cfg = config.TINY_KEQV

    from gemma4_jax import files

    write = files.SafetensorsWriter.write
    written = []

    def crash(self, name, array):  # a few tensors reach the file, then the run is interrupted
        write(self, name, array)
        written.append(name)
        if len(written) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(files.SafetensorsWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        hf_format.save_hf_checkpoint(str(tmp_path / "out"), cfg, _random(cfg))
    assert len(written) == 3 and os.listdir(tmp_path) == []  # no output, no temporary
