"""The parameter spec (`gemma4_jax.param_spec`): one entry per leaf, and what is derived from it equals what the
project computed before the spec existed (a snapshot of the per-tensor tables of commit b5d803a: HF names, shapes
and transforms, quantized layouts, init scales, LoRA targets, GGUF names)."""

import gzip
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from gemma4_jax import config, model, param_spec
from gemma4_jax.param_spec import Leaf

SNAPSHOT = os.path.join(os.path.dirname(__file__), "data", "param_spec_snapshot.json.gz")
TINY = ("tiny", "tiny_keqv", "tiny_moe")


@pytest.fixture(scope="module")
def snapshot():
    with gzip.open(SNAPSHOT) as f:
        return json.load(f)


def _digest(a):
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.shape).encode() + a.astype(np.float64).tobytes()).hexdigest()[:16]


def derived(cfg, numeric: bool) -> dict:
    """The snapshot's structure, computed from the spec."""
    out = {"leaves": {}, "lora": [], "gguf": {}}
    for leaf in param_spec.param_spec(cfg):
        d = {
            "shape": list(leaf.shape),
            "hf": list(leaf.hf),
            "optional": leaf.unused,
            "quant_layout": [list(leaf.perm), leaf.ncontract] if leaf.quantizable else None,
            "init_std": leaf.init_std,
            "hf_shapes": [list(s) for s in leaf.hf_shapes],
        }
        if numeric:
            x = np.arange(np.prod(leaf.shape), dtype=np.float64).reshape(leaf.shape)
            hf = leaf.to_hf(x)
            d["to_hf"] = [_digest(h) for h in hf]
            np.testing.assert_array_equal(leaf.from_hf(*hf), x)  # and back
        out["leaves"][leaf.name] = d
        # The MoE expert stacks became LoRA targets after the snapshot (test_expert_stacks_are_lora_targets).
        if leaf.lora and not leaf.unused and "e" not in leaf.roles:
            out["lora"].append([leaf.name, "".join(leaf.roles), list(leaf.lora_modules), int(leaf.path[0][6:])])
        if not leaf.unused:
            out["gguf"].update(zip(leaf.hf, leaf.gguf, strict=True))
    return out


@pytest.mark.parametrize("name", config.PRESETS)
def test_one_entry_per_leaf_of_the_model(name):
    """The text entries are exactly the leaves the Flax decoder declares; the encoders' entries are checked against
    transformers' module tree (`test_hf_names_equal_transformers`) and by the encoders' parity tests."""
    cfg = config.get_config(name)
    decoder_leaves = {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(model.decoder_param_shapes(cfg))
    }
    spec = param_spec.param_spec(cfg)
    assert len({leaf.path for leaf in spec}) == len(spec)  # exactly one entry each
    assert {leaf.path: leaf.shape for leaf in spec if leaf.part == "text"} == decoder_leaves
    towers = {"vision": cfg.vision, "audio": cfg.audio}
    assert {leaf.part for leaf in spec} == {"text"} | {part for part, tower in towers.items() if tower}


@pytest.mark.parametrize("name", ["tiny_mm", "tiny_mm_bidi", "e2b", "31b"])
def test_hf_names_equal_transformers(name):
    """Every HF tensor name and shape the spec derives is one of transformers' Gemma4ForConditionalGeneration (built
    on the meta device), and the reverse, save tensors transformers keeps and the checkpoints don't."""
    import torch
    import transformers

    cfg = config.get_config(name)
    with torch.device("meta"):
        hf = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**cfg.to_hf_dict()))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    prefix = "model.language_model."
    ours = {
        (prefix if leaf.part == "text" else "model.") + name: shape
        for leaf, name, shape in param_spec.hf_tensors(cfg)
        if not leaf.unused
    }
    assert ours == theirs


@pytest.mark.parametrize("name", TINY)
def test_derived_tables_equal_the_snapshot(snapshot, name):
    want, got = snapshot[name], derived(config.get_config(name), numeric=True)
    assert got["leaves"] == want["leaves"]
    assert sorted(got["lora"]) == sorted(want["lora"])
    assert got["gguf"] == want["gguf"]


@pytest.mark.parametrize("name", config.OFFICIAL_VARIANTS)
def test_official_variants_equal_the_snapshot(snapshot, name):
    got = derived(config.get_config(name).text_only(), numeric=False) | {
        "litert": {}
    }  # LiteRT views: tiny configs only
    digest = hashlib.sha256(json.dumps(got, sort_keys=True).encode()).hexdigest()
    assert digest == snapshot[name]["sha256"]


def test_expert_stacks_are_lora_targets():
    """Beyond the snapshot: the two expert stacks of each MoE layer, one adapter per expert (role "e")."""
    cfg = config.get_config("26b_a4b")
    stacks = [leaf for leaf in param_spec.param_spec(cfg) if leaf.lora and "e" in leaf.roles]
    assert len(stacks) == 2 * cfg.num_layers
    assert {(leaf.path[1:], "".join(leaf.roles), leaf.lora_modules[0].split(".", 2)[2]) for leaf in stacks} == {
        (("mlp", "gating_einsum", "w"), "eooi", "experts.gate_up_proj"),
        (("mlp", "linear", "w"), "eio", "experts.down_proj"),
    }


def test_a_new_leaf_is_one_entry():
    """A hypothetical stacked tower weight: one Leaf gives its HF names and shapes, transforms both ways, quantized
    layout, LoRA roles, init scale and [out, in] view — nothing else to edit."""
    leaf = Leaf(
        path=("tower", "attn", "q_einsum", "w"),
        axes=("heads", "embed", "head_dim"),
        shape=(3, 8, 4),
        contracts=("embed",),
        hf=("tower.q_proj.weight",),
        gguf=("t.attn_q.weight",),
        quant=param_spec.MATRIX,
        lora=True,
    )
    w = np.random.default_rng(0).standard_normal(leaf.shape)
    (hf,) = leaf.to_hf(w)
    assert hf.shape == (12, 8) and leaf.hf_shapes == ((12, 8),)
    np.testing.assert_array_equal(hf, w.transpose(0, 2, 1).reshape(12, 8))  # torch Linear [out, in]
    np.testing.assert_array_equal(leaf.from_hf(hf), w)
    assert leaf.perm == (0, 2, 1) and leaf.ncontract == 1 and leaf.roles == ("o", "i", "o")
    assert leaf.init_std == pytest.approx(8**-0.5) and leaf.lora_modules == ("tower.q_proj",)
    np.testing.assert_array_equal(leaf.matrix(w), hf)
    with pytest.raises(ValueError, match=r"tower.q_proj.weight has shape \(8, 12\)"):
        leaf.from_hf(hf.T)
