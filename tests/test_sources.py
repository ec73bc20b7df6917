"""Checkpoint sources and `gemma4-jax convert`: official orbax layouts, HF directories, kaggle:/hf: specs.

Independent checks: orbax checkpoints here are written by orbax itself (`StandardCheckpointer`, OCDBT, as the
official ones are); the HF copy made by `convert` is run by HF transformers' Gemma4ForCausalLM (CPU torch);
round trips are compared byte for byte through orbax's own restore and safetensors' own reader.

Tolerance: transformers vs ours in float32, max-abs over logits of O(5): 5e-4 (float32 rounding alone moves
either side by ~1e-5; a transposed or misplaced tensor moves them by O(1)). Our two loads of the same weights
(orbax vs HF copy) must give bit-identical logits.
"""

from __future__ import annotations

import functools
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from gemma4_jax import api, cli, config, model, orbax_format, param_spec
from gemma4_jax.errors import Gemma4Error

BF16 = np.dtype(ml_dtypes.bfloat16)
SECRET = "kgl-SECRET-9f8e7d6c5b4a"


def _random_tree(cfg, seed=0, dtype=BF16, scale_dtype=None):
    """NESTED numpy tree, every leaf random (norm scales/scalars in 0.5..1.5, all distinct) incl. reader K/V."""
    rng = np.random.default_rng(seed)
    tree = {}
    for leaf in param_spec.param_spec(cfg):
        if len(leaf.shape) <= 1:
            value = (0.5 + rng.random(leaf.shape)).astype(scale_dtype or dtype)
        else:
            value = (rng.standard_normal(leaf.shape) * (leaf.init_std or 1.0)).astype(dtype)
        model.tree_set(tree, leaf.path, value)
    return tree


def load_checkpoint(spec, dtype="bfloat16"):
    """(config, params, local directory) through the library's loader."""
    loaded = api.load(spec, dtype=dtype, layout="checkpoint")  # the tree as stored, compared leaf by leaf
    return loaded.config, loaded.params, loaded.directory


_SAVED_BASE = None  # pytest's temporary directory for the checkpoints shared by this module's tests


@pytest.fixture(scope="module", autouse=True)
def _saved_base(tmp_path_factory):
    global _SAVED_BASE
    _SAVED_BASE = tmp_path_factory.mktemp("saved")
    _saved_once.cache_clear()
    yield
    _saved_once.cache_clear()


def _saved(name, layout="nested"):
    """(tree, directory) of a random orbax checkpoint in `layout`, written once per module run."""
    return _saved_once(name, layout)


@functools.cache
def _saved_once(name, layout):
    cfg = config.get_config(name)
    tree = _random_tree(cfg, seed=len(name))
    path = os.path.join(_SAVED_BASE, f"{name}-{layout}")
    orbax_format.save_orbax(path, tree, layout, cfg)
    return tree, path


def _leaves(tree):
    return dict(orbax_format._flatten(tree))


def _assert_same_bytes(a: dict, b: dict):
    a, b = _leaves(a), _leaves(b)
    assert a.keys() == b.keys()
    for path in a:
        x, y = np.asarray(a[path]), np.asarray(b[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


def _convert(*argv) -> int:
    return cli.main(["convert", *argv])


forward = jax.jit(model.apply, static_argnames=("config",))


# ----- official layouts load, and agree with the HF copy and with transformers -------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
def test_orbax_checkpoint_matches_hf_copy_and_transformers(tmp_path, name):
    cfg = config.get_config(name)
    tree, orbax_dir = _saved(name)
    assert _convert("--checkpoint", orbax_dir, "--to", "hf", "-o", str(tmp_path / "hf")) == 0

    got_cfg, from_orbax, _ = load_checkpoint(orbax_dir, "float32")
    assert got_cfg == cfg  # recognised from the shapes alone
    _, from_hf, local_dir = load_checkpoint(str(tmp_path / "hf"), "float32")
    assert local_dir == str(tmp_path / "hf")
    # the stored bf16 values, widened exactly; reader K/V travel too, so the trees are identical
    _assert_same_bytes(from_orbax, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree))
    _assert_same_bytes(from_orbax, from_hf)

    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    ours = np.asarray(forward(from_orbax, tokens, config=cfg)[0])
    np.testing.assert_array_equal(ours, np.asarray(forward(from_hf, tokens, config=cfg)[0]))
    hf = transformers.Gemma4ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - reference).max() < 5e-4


@pytest.mark.parametrize(("name", "layout"), [("tiny", "flat"), ("tiny_moe", "flat"), ("tiny_keqv", "stacked")])
def test_flat_and_stacked_layouts_load_identically(name, layout):
    tree, path = _saved(name, layout)
    assert orbax_format.OrbaxSource(path).layout == layout
    cfg, params, _ = load_checkpoint(path, "bfloat16")
    assert cfg == config.get_config(name)
    _assert_same_bytes(params, tree)
    # the on-disk keys really are the legacy ones (dense MLP with a `w`, MoE keeps its own)
    stored = set(ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree)
    if layout == "flat":
        assert "transformer/layer_0/mlp/gating_einsum" in stored
    else:
        assert "transformer/stacked_layers/attention_type_2/attn/q_einsum" in stored


def test_stacked_layout_needs_equal_layer_shapes():
    cfg = config.TINY_E2B  # KV-shared layers have a double-wide MLP, as on E2B
    with pytest.raises(Gemma4Error, match=r"cannot stack .*gating_einsum"):
        orbax_format.to_layout(_random_tree(cfg), "stacked", cfg)


def test_official_variants_are_recognised_from_shapes():
    for name in ("e2b", "26b_a4b"):
        cfg = config.get_config(name)
        shapes = param_spec.shapes(cfg)
        optional = {leaf.path for leaf in param_spec.param_spec(cfg) if leaf.unused}
        assert orbax_format.recognise_variant(dict(shapes), "ckpt") == cfg
        # a checkpoint without the (unused) reader-layer K/V is still that variant
        without_reader_kv = {p: s for p, s in shapes.items() if p not in optional}
        assert orbax_format.recognise_variant(without_reader_kv, "ckpt") == cfg
    wrong = dict(param_spec.shapes(config.E2B))
    wrong[("layer_3", "mlp", "linear")] = (6000, 1536)
    with pytest.raises(Gemma4Error, match=r"nearest is e2b, but tensor layer_3/mlp/linear has shape \(6000, 1536\)"):
        orbax_format.recognise_variant(wrong, "ckpt")


# ----- convert: lossless both ways, atomic, tokenizer files along --------------------------------------


def test_round_trip_orbax_hf_orbax_is_bit_exact(tmp_path, capsys):
    cfg = config.get_config("tiny")
    # bf16 weights with float32 norm scales: dtypes travel as stored
    tree = _random_tree(cfg, seed=7, scale_dtype=np.float32)
    src = tmp_path / "kaggle"
    orbax_format.save_orbax(str(src / "gemma-4-tiny"), tree)
    for name in ("tokenizer.model", "chat_template.jinja", "generation_config.json"):
        (src / name).write_text(f"contents of {name}")

    assert _convert("--checkpoint", str(src), "--to", "hf", "-o", str(tmp_path / "hf")) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"wrote {tmp_path / 'hf'}: HF safetensors, 1 file")
    hf_tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert hf_tensors["model.norm.weight"].dtype == np.float32
    assert hf_tensors["model.layers.0.self_attn.q_proj.weight"].dtype == BF16
    assert _convert("--checkpoint", str(tmp_path / "hf"), "--to", "orbax", "-o", str(tmp_path / "back")) == 0
    _assert_same_bytes(ocp.StandardCheckpointer().restore(str(tmp_path / "back")), tree)
    for name in ("tokenizer.model", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "back" / name).read_text() == f"contents of {name}"

    # and HF -> orbax -> HF gives the same safetensors tensors back
    assert _convert("--checkpoint", str(tmp_path / "back"), "--to", "hf", "-o", str(tmp_path / "hf2")) == 0
    again = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert again.keys() == hf_tensors.keys()
    for key, value in hf_tensors.items():
        assert again[key].dtype == value.dtype and again[key].tobytes() == value.tobytes(), key
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging directories left


def test_flat_output_layout_and_reader_kv_zeros(tmp_path):
    """An HF copy without reader-layer K/V (as transformers writes them) gets zeros in the official tree."""
    from gemma4_jax import hf_format

    cfg = config.get_config("tiny")
    params = jax.tree_util.tree_map(jnp.asarray, _random_tree(cfg, seed=3))
    hf_format.save_hf_checkpoint(str(tmp_path / "hf"), cfg, params)
    out = tmp_path / "flat"
    assert _convert("--checkpoint", str(tmp_path / "hf"), "--to", "orbax", "--layout", "flat", "-o", str(out)) == 0
    assert orbax_format.OrbaxSource(str(out)).layout == "flat"
    restored = _leaves(ocp.StandardCheckpointer().restore(str(out)))
    reader = cfg.first_kv_shared_layer
    assert not np.any(np.asarray(restored[(f"transformer/layer_{reader}/attn/kv_einsum", "w")], np.float32))
    _, loaded, _ = load_checkpoint(str(out), "bfloat16")
    np.testing.assert_array_equal(
        np.asarray(loaded["layer_0"]["mlp"]["gating_einsum"]).view(np.uint16),
        np.asarray(params["layer_0"]["mlp"]["gating_einsum"]).view(np.uint16),
    )


def test_multimodal_orbax_round_trip_and_text_only(tmp_path, capsys):
    """An orbax checkpoint with both encoders (float32, as published) converts to HF and back byte for byte; the
    HF copy has the names transformers' Gemma4ForConditionalGeneration loads; --text-only leaves the encoders
    unread, and a checkpoint of the text decoder alone loads as the text model."""
    cfg = config.get_config("tiny_mm")
    tree = _random_tree(cfg, seed=5)
    for leaf in param_spec.param_spec(cfg):
        if leaf.part != "text":
            model.tree_set(tree, leaf.path, model.tree_get(tree, leaf.path).astype(np.float32))
    orbax_format.save_orbax(str(tmp_path / "mm"), tree)
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert _convert("--checkpoint", str(tmp_path / "mm"), "--to", "hf", "-o", str(hf_dir)) == 0
    assert _convert("--checkpoint", str(hf_dir), "--to", "orbax", "-o", str(back)) == 0
    restored = ocp.PyTreeCheckpointer().restore(str(back))
    for leaf in param_spec.param_spec(cfg):
        want, got = model.tree_get(tree, leaf.path), np.asarray(model.tree_get(restored, leaf.path))
        assert got.dtype == want.dtype and np.array_equal(got, want), leaf.name
    with torch.device("meta"):
        hf = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**cfg.to_hf_dict()))
    written = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            written |= load_file(str(hf_dir / name))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    # the unused K/V of KV-shared readers travel along, as the official converter writes them
    readers = {"model.language_model." + n for leaf in param_spec.param_spec(cfg) if leaf.unused for n in leaf.hf}
    assert {k: v.shape for k, v in written.items() if k not in readers} == theirs

    loaded = api.load(str(tmp_path / "mm"), dtype="float32")
    assert loaded.config == cfg and "vision_encoder" in loaded.params and "audio_encoder" in loaded.params
    for spec in (str(tmp_path / "mm"), str(hf_dir)):
        text = api.load(spec, dtype="float32", text_only=True)
        assert not text.config.multimodal and param_spec.shapes(text.config) == param_spec.shapes(cfg.text_only())
        assert "vision_encoder" not in text.params and "mm_input_projection" not in text.params["embedder"]
    out = tmp_path / "text-hf"
    assert _convert("--checkpoint", str(tmp_path / "mm"), "--to", "hf", "-o", str(out), "--text-only") == 0
    assert not any("vision" in n or "audio" in n for n in load_file(str(out / "model.safetensors")))
    assert api.load(str(out), dtype="float32").config.multimodal is False


def test_unmapped_encoder_tensors_are_named(tmp_path, capsys):
    """Encoder tensors of the wrong shapes are named, and nothing is written."""
    cfg = config.get_config("tiny_keqv")
    tree = _random_tree(cfg)
    tree["vision_encoder"] = {"entry": {"input_projection": {"w": np.ones((4, 4), np.float32)}}}
    orbax_format.save_orbax(str(tmp_path / "mm"), tree)
    out = tmp_path / "hf"
    assert _convert("--checkpoint", str(tmp_path / "mm"), "--to", "hf", "-o", str(out)) == 2
    assert "vision_encoder/entry/input_projection/w" in capsys.readouterr().err and not out.exists()


# ----- bad input: one clear error, nothing written -----------------------------------------------------


def _fails(capsys, argv, match, out=None):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemma4-jax: error: "), err
    assert re.search(match, err[0]), err[0]
    if out is not None:
        assert not os.path.exists(out)
        assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]


def _copy(tmp_path, name="tiny", layout="nested"):
    dest = tmp_path / f"{name}-{layout}"
    shutil.copytree(_saved(name, layout)[1], dest)
    return dest


def test_truncated_safetensors(tmp_path, capsys):
    _, orbax_dir = _saved("tiny_keqv")
    assert _convert("--checkpoint", orbax_dir, "--to", "hf", "-o", str(tmp_path / "hf")) == 0
    file = tmp_path / "hf" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    out = str(tmp_path / "o")
    _fails(capsys, ["convert", "--checkpoint", str(tmp_path / "hf"), "--to", "orbax", "-o", out], "truncated", out)
    npy = str(tmp_path / "logits.npy")
    _fails(capsys, ["logits", "--checkpoint", str(tmp_path / "hf"), "--tokens", "2,3", "--out", npy], "truncated", npy)


@pytest.mark.parametrize("damage", ["data", "metadata", "partial"])
def test_corrupt_or_partial_orbax(tmp_path, capsys, damage):
    ckpt = _copy(tmp_path, "tiny_keqv")
    if damage == "data":  # the largest OCDBT data file (tensor chunks) cut in half
        data = ckpt / "ocdbt.process_0" / "d"
        largest = max(data.iterdir(), key=lambda f: f.stat().st_size)
        with open(largest, "r+b") as f:
            f.truncate(largest.stat().st_size // 2)
        match = r"cannot read tensor \S+ \(.*OUT_OF_RANGE"
    elif damage == "metadata":
        (ckpt / "_METADATA").write_text('{"tree_metadata": {"broken')
        match = "not a readable orbax checkpoint"
    else:  # an interrupted copy: the metadata arrived, the data did not
        for name in os.listdir(ckpt):
            if name not in ("_METADATA", "manifest.ocdbt"):
                shutil.rmtree(ckpt / name) if (ckpt / name).is_dir() else os.remove(ckpt / name)
        match = "cannot read tensor|not a readable orbax checkpoint"
    with pytest.raises(Gemma4Error, match=match):
        load_checkpoint(str(ckpt))
    out = str(tmp_path / "hf")
    _fails(capsys, ["convert", "--checkpoint", str(ckpt), "--to", "hf", "-o", out], match, out)


def test_mismatched_shapes_name_the_tensor(tmp_path, capsys):
    cfg = config.get_config("tiny")
    tree = _random_tree(cfg)
    tree["layer_2"]["attn"]["q_einsum"]["w"] = np.zeros((3, 64, 32), BF16)
    orbax_format.save_orbax(str(tmp_path / "bad"), tree)
    with pytest.raises(
        Gemma4Error, match=r"nearest is tiny, but tensor layer_2/attn/q_einsum/w has shape \(3, 64, 32\)"
    ):
        load_checkpoint(str(tmp_path / "bad"))
    out = str(tmp_path / "hf")
    argv = ["convert", "--checkpoint", str(tmp_path / "bad"), "--variant", "tiny", "--to", "hf", "-o", out]
    _fails(capsys, argv, r"--variant tiny does not match the checkpoint: tensor layer_2/attn/q_einsum/w", out)


def test_wrong_variant_and_config(tmp_path, capsys):
    ckpt = _copy(tmp_path)
    npy = str(tmp_path / "x.npy")
    argv = ["logits", "--checkpoint", str(ckpt), "--variant", "tiny_keqv", "--tokens", "2,3", "--out", npy]
    _fails(capsys, argv, r"--variant tiny_keqv does not match the checkpoint: tensor layer_0/\S+ has shape", npy)
    config_file = tmp_path / "config.json"
    config.get_config("tiny").replace(ffw_hidden=128).save_json(config_file)
    argv = ["logits", "--checkpoint", str(ckpt), "--config", str(config_file), "--tokens", "2,3", "--out", npy]
    _fails(capsys, argv, r"does not match the checkpoint: tensor layer_0/mlp/gating_einsum has shape", npy)
    argv = ["logits", "--checkpoint", str(ckpt), "--variant", "tiny", "--config", str(config_file), "--tokens", "2"]
    _fails(capsys, [*argv, "--out", npy], "give --variant or --config, not both", npy)
    # convert never writes into an existing directory
    _fails(
        capsys,
        ["convert", "--checkpoint", str(ckpt), "--to", "orbax", "-o", str(ckpt)],
        "exists and is not an empty directory",
    )
    assert sorted(os.listdir(ckpt)) == sorted(os.listdir(_saved("tiny")[1]))


def test_bad_source_specs(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import kagglehub

    def must_not_download(*args, **kwargs):
        raise AssertionError("downloaded despite a malformed spec")

    monkeypatch.setattr(kagglehub, "model_download", must_not_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", must_not_download)
    out = str(tmp_path / "o")
    for spec, match in [
        ("kaggle:google/gemma-4", r"not of the form kaggle:OWNER/MODEL/FRAMEWORK/VARIATION\[/VERSION\]"),
        ("kaggle:google/gemma-4/flax/e2b/latest", "not of the form kaggle:"),
        ("hf:just-a-name", r"not of the form hf:OWNER/NAME"),
        ("kagle:google/gemma-4/flax/e2b", "unknown checkpoint source 'kagle:"),
        (str(tmp_path / "nope"), "checkpoint directory not found"),
        (str(tmp_path), "no checkpoint in"),
    ]:
        _fails(capsys, ["convert", "--checkpoint", spec, "--to", "hf", "-o", out], match, out)


# ----- kaggle: and hf: with substituted downloaders; credentials never printed ------------------------


def _kaggle_download(tmp_path, calls):
    """A stand-in for kagglehub.model_download: the layout of a Kaggle Flax download, written locally."""

    def download(handle, *args, **kwargs):
        from tokenizer_fixture import write_tokenizer

        calls.append(handle)
        root = tmp_path / "kagglehub" / handle.replace("/", "_")
        if not root.exists():
            write_tokenizer(str(root))
            shutil.copytree(_saved("tiny")[1], root / "gemma-4-tiny")
        return str(root)

    return download


def test_kaggle_source(tmp_path, monkeypatch, capsys):
    import kagglehub

    from gemma4_jax.tokenizer import load_tokenizer

    calls = []
    monkeypatch.setattr(kagglehub, "model_download", _kaggle_download(tmp_path, calls))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    cfg, params, local_dir = load_checkpoint("kaggle:google/gemma-4/flax/gemma-4-tiny/1")
    assert calls == ["google/gemma-4/flax/gemma-4-tiny/1"]
    assert cfg == config.get_config("tiny")
    _assert_same_bytes(params, _saved("tiny")[0])
    assert os.path.isfile(os.path.join(local_dir, "tokenizer.model"))  # the tokenizer sits next to the orbax dir
    assert load_tokenizer(local_dir).encode("<|turn>", add_bos=True) == [2, 105]

    npy = tmp_path / "logits.npy"
    argv = ["logits", "--checkpoint", "kaggle:google/gemma-4/flax/gemma-4-tiny", "--tokens", "2,3", "--out", str(npy)]
    assert cli.main(argv) == 0 and npy.exists()
    out = str(tmp_path / "conv")
    assert _convert("--checkpoint", "kaggle:google/gemma-4/flax/gemma-4-tiny/1", "--to", "hf", "-o", out) == 0
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err

    def leaky_failure(handle, *args, **kwargs):
        raise RuntimeError(f"401 Unauthorized for user someone with key {SECRET}")

    monkeypatch.setattr(kagglehub, "model_download", leaky_failure)
    npy2 = str(tmp_path / "never.npy")
    argv = ["logits", "--checkpoint", "kaggle:google/gemma-4/flax/gemma-4-tiny/1", "--tokens", "2", "--out", npy2]
    _fails(capsys, argv, r"download failed: RuntimeError: 401 Unauthorized .*key \*\*\*$", npy2)


def test_hf_source(tmp_path, monkeypatch):
    import huggingface_hub

    _, orbax_dir = _saved("tiny_keqv")
    hf_dir = str(tmp_path / "snapshot")
    assert _convert("--checkpoint", orbax_dir, "--to", "hf", "-o", hf_dir) == 0
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        assert "*.safetensors" in allow_patterns and "tokenizer.model" in allow_patterns
        return hf_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cfg, params, local_dir = load_checkpoint("hf:google/gemma-4-tiny@main", "bfloat16")
    assert calls == [("google/gemma-4-tiny", "main")] and local_dir == hf_dir
    assert cfg.replace(name="tiny_keqv") == config.get_config("tiny_keqv")
    _assert_same_bytes(params, _saved("tiny_keqv")[0])
