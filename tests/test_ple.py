"""PLE table off the device (gemma4_jax.ple): host RAM and memory-mapped tables give the on-device results.

All comparisons are exact (bit-identical float32 logits, identical greedy tokens): the host path feeds the
model the same rows the on-device gather would, through the same jitted computation after the gather.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import cli, config, hf_format, model, ple
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.sampler import Sampler, SamplingConfig

CFG = config.TINY_E2B
TOKENS = np.array([[2, 5, 9, 17, 0, 511, 256, 33], [2, 7, 7, 1, 3, 4, 105, 106]], np.int32)


@functools.cache
def _params():
    return model.init_params(CFG, 0, jnp.float32)  # the same weights as test_sampler's (shared compilations)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ple_ckpt")
    hf_format.save_hf_checkpoint(str(path), CFG, _params())
    return path


_apply = jax.jit(model.apply, static_argnames=("config",))


def _table():
    return np.asarray(_params()["embedder"]["per_layer_embeddings"])


def test_rows_follow_the_device_lookup():
    host = ple.HostPLE(_table(), CFG)
    ids = np.array([[-4, -2, 0, 3, 511, 512, 600]])
    expected = _table()[np.asarray(model.per_layer_token_ids(CFG, jnp.asarray(ids)))]
    np.testing.assert_array_equal(host.rows(ids), expected)
    assert host.rows(ids).shape == (1, 7, CFG.num_layers, CFG.per_layer_input_dim)
    np.testing.assert_array_equal(host.rows(ids)[0, :3], np.broadcast_to(_table()[0], (3, *_table().shape[1:])))


def test_safetensors_table_is_mapped_in_place(ckpt, tmp_path):
    host = ple.HostPLE.from_safetensors(str(ckpt), CFG)
    assert host.memory_mapped and host.table.filename == str(ckpt / "model.safetensors")
    np.testing.assert_array_equal(host.table, _table())
    host.save_npy(str(tmp_path / "ple_table.npy"))
    again = ple.HostPLE.from_npy(str(tmp_path / "ple_table.npy"), CFG)
    assert again.memory_mapped
    np.testing.assert_array_equal(again.table, _table())


def test_forward_logits_bit_identical(ckpt):
    """model.apply (jitted, float32): table on the device == rows from host RAM == rows from the memory map ==
    a HostPLE leaf in the tree (gathered by a host callback inside the jitted forward)."""
    tokens = jnp.asarray(TOKENS)
    on_device, _ = _apply(_params(), tokens, config=CFG)
    rest, _ = ple.split_table(_params())
    for host in (ple.HostPLE(_table().copy(), CFG), ple.HostPLE.from_safetensors(str(ckpt), CFG)):
        off_device, _ = _apply(rest, tokens, config=CFG, per_layer_tokens=host.rows(TOKENS))
        np.testing.assert_array_equal(off_device, on_device)
    in_tree = ple.place_table(CFG, _params(), "mmap", str(ckpt))
    assert isinstance(in_tree["embedder"]["per_layer_embeddings"], ple.HostPLE)
    np.testing.assert_array_equal(_apply(in_tree, tokens, config=CFG)[0], on_device)


@pytest.mark.slow
def test_sampler_prefill_and_decode_identical(ckpt):
    """Greedy generation (prefill of prompts of different lengths, then one decode step per token) with the
    table on the device, in host RAM (ple_table=) and memory-mapped (a HostPLE in the tree)."""
    prompts, greedy = [[2, 5, 9, 17, 33], [2, 7]], SamplingConfig(0.0)
    on_device = Sampler(CFG, _params(), greedy, stop_tokens=()).generate(prompts, 10).tokens
    rest, _ = ple.split_table(_params())
    host = Sampler(CFG, rest, greedy, stop_tokens=(), ple_table=ple.HostPLE(_table().copy(), CFG))
    assert "per_layer_embeddings" not in host.params["embedder"]
    assert host.generate(prompts, 10).tokens == on_device
    mapped = Sampler(CFG, ple.place_table(CFG, _params(), "mmap", str(ckpt)), greedy, stop_tokens=())
    assert mapped.ple_table.memory_mapped and "per_layer_embeddings" not in mapped.params["embedder"]
    assert mapped.generate(prompts, 10).tokens == on_device


@pytest.mark.slow
def test_cli_generate_ple_modes_agree(capsys, ckpt):
    outputs = []
    for mode in ("device", "host", "mmap"):
        argv = ["generate", "--checkpoint", str(ckpt), "--dtype", "float32", "--prompt-ids", "2,17,33"]
        argv += ["--temperature", "0", "--stop", "", "--max-new-tokens", "6", "--ple", mode]
        assert cli.main(argv) == 0
        outputs.append(capsys.readouterr().out.strip().splitlines()[-2])
    assert len(outputs[0].split()) == 6 and outputs[0] == outputs[1] == outputs[2]


def test_bad_placements(tmp_path):
    with pytest.raises(Gemma4Error, match="give --checkpoint"):
        ple.place_table(CFG, _params(), "mmap")
    with pytest.raises(Gemma4Error, match="give --checkpoint"):
        ple.place_table(CFG, _params(), "mmap", str(tmp_path))  # no safetensors there
    with pytest.raises(Gemma4Error, match="--ple must be one of"):
        ple.place_table(CFG, _params(), "disk")
    with pytest.raises(Gemma4Error, match="no Per-Layer Embeddings"):
        ple.place_table(config.TINY_KEQV, {}, "host")
    with pytest.raises(Gemma4Error, match=r"expects \(512, 9, 16\)"):
        ple.HostPLE(np.zeros((512, 8, 16), np.float32), CFG)
    with pytest.raises(Gemma4Error, match="neither in the parameters nor given"):
        Sampler(CFG, ple.split_table(_params())[0])


def test_cli_mmap_without_checkpoint_is_one_error_line(capsys):
    assert cli.main(["generate", "--ple", "mmap", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gemma4-jax: error: --ple mmap")
