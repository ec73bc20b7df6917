"""The CPU decode layout (`gemma4_jax.matvec`): every contraction of the text decoder in the chunk-major form
against a float64 reference (jaxlib 0.10.2 has fused reductions that return wrong values, so each form is
checked numerically, several chunks included), the model's greedy output unchanged, and the compiled decode step
free of whole-weight temporaries."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import config, matvec, model, param_spec
from gemma4_jax.model import tree_get, tree_set
from gemma4_jax.sampler import Sampler, _jitted

# Equations of the model's weight contractions, by leaf suffix (`model.py`); x gets shape [B, T, ...].
EQUATIONS = {
    "attn/q_einsum/w": "btd,ndh->btnh",
    "attn/k_einsum/w": "btd,kdh->btkh",
    "attn/kv_einsum/w": "btd,ckdh->cbtkh",
    "attn/attn_vec_einsum/w": "btnh,nhd->btd",
    "mlp/linear": "...f,fd->...d",
}


def _leaves(cfg):
    return [leaf for leaf in param_spec.param_spec(cfg) if matvec.uses_decode_layout(leaf)]


def _x_shape(eqn, leaf, rows):
    lhs, rhs = eqn.split("->")[0].split(",")
    sizes = dict(zip(rhs, leaf.shape, strict=True))
    if lhs.startswith("..."):
        return (*rows, sizes[lhs[-1]])
    return tuple([*rows, *(sizes[c] for c in lhs[2:])])


@pytest.mark.parametrize("max_chunk", [matvec.MAX_CHUNK, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contractions_equal_float64(dtype, max_chunk, monkeypatch):
    """Each decode-layout leaf of E2B-style, K=V and MoE tiny models, for 1, 2, 5 and 16 activation rows, vs
    numpy float64 on the same (rounded) numbers: <= 2e-6 of max |y| with float32 weights, <= 2^-7 with bf16 (the
    result is rounded to bf16). max_chunk 16 cuts every contracted length into several chunks."""
    monkeypatch.setattr(matvec, "MAX_CHUNK", max_chunk)
    rng = np.random.default_rng(0)
    tol = 2e-6 if dtype == jnp.float32 else 2.0**-7
    checked = 0
    for name in ("tiny", "tiny_keqv", "tiny_moe"):
        cfg = config.get_config(name)
        for leaf in _leaves(cfg):
            eqn = next((e for suffix, e in EQUATIONS.items() if "/".join(leaf.path).endswith(suffix)), None)
            if eqn is None:  # gating (a reshape first) and the PLE/router forms: covered by the model tests below
                continue
            w = np.asarray(jnp.asarray(rng.normal(size=leaf.shape), dtype), np.float64)
            weight = matvec.to_decode_weight(np.asarray(w, dtype), leaf)
            n, out, chunk = matvec.data_shape(leaf)
            assert [c.shape for c in weight.data] == [(out, chunk)] * n
            assert chunk <= max_chunk
            for rows in ((1, 1), (2, 1), (1, 5), (2, 8)):
                x = np.asarray(jnp.asarray(rng.normal(size=_x_shape(eqn, leaf, rows)), dtype), np.float64)
                want = np.einsum(eqn, x, w)
                got = np.asarray(weight.einsum(eqn, jnp.asarray(x, dtype)), np.float64)
                assert got.shape == want.shape
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err <= tol, (name, leaf.name, rows, err)
                checked += 1
            np.testing.assert_array_equal(np.asarray(weight.materialize(jnp.float32), np.float64), w)
    assert checked > 40


@pytest.mark.parametrize("name", ["tiny", "tiny_keqv", "tiny_moe"])
@pytest.mark.parametrize("max_chunk", [matvec.MAX_CHUNK, 16])
def test_greedy_unchanged(name, max_chunk, monkeypatch):
    """Float32 weights: 64 greedy tokens identical in both layouts; full-forward logits as close to the float64
    result as the checkpoint layout's (within 2x)."""
    monkeypatch.setattr(matvec, "MAX_CHUNK", max_chunk)
    cfg = config.get_config(name)
    params = model.init_params(cfg, seed=1, dtype=jnp.float32)
    fast = matvec.decode_layout(params, cfg)
    assert any(isinstance(w, matvec.DecodeWeight) for w in jax.tree.leaves(fast, is_leaf=matvec.is_decode_weight))
    tokens = np.asarray([[2, 5, 9, 33, 17, 4, 90, 11]])
    with jax.enable_x64(True):
        exact = np.asarray(model.apply(jax.tree.map(lambda w: w.astype(jnp.float64), params), tokens, config=cfg)[0])
    plain, chunked = (np.abs(np.asarray(model.apply(p, tokens, config=cfg)[0]) - exact).max() for p in (params, fast))
    print(f"{name}: max |dlogit| vs float64: checkpoint layout {plain:.3g}, decode layout {chunked:.3g}")
    assert chunked <= 2 * plain + 1e-6  # float32 round-off of another summation order, no worse
    prompts = [[2, 5, 9], [2, 40, 41, 42, 43]]
    assert Sampler(cfg, fast).generate(prompts, 64).tokens == Sampler(cfg, params).generate(prompts, 64).tokens


def _abstract_decode_layout(cfg, tree):
    """`matvec.decode_layout` on shapes only (a full-size model compiles without its weights)."""
    for leaf in _leaves(cfg):
        n, out, chunk = matvec.data_shape(leaf)
        data = (jax.ShapeDtypeStruct((out, chunk), tree_get(tree, leaf.path).dtype),) * n
        tree_set(tree, leaf.path, matvec.DecodeWeight(data, tuple(leaf.shape), tuple(leaf.perm), leaf.ncontract))
    return tree


def _matvec_activation_operands(hlo: str) -> dict[str, list[str]]:
    """For each loop fusion of the entry computation whose dot reads a weight (a parameter of >= 2^18 elements; the
    attention's library dots over the cache are custom fusions): the shapes of its other parameters, the
    activations."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[name] = []
        elif name:
            bodies[name].append(line)
    entry = hlo[hlo.index("ENTRY") :].splitlines()
    out = {}
    for line in entry:
        match = re.search(r"%(\S+) = \S+ fusion\(.*kind=kLoop, calls=%([\w.\-]+)", line)
        if not match or not any(" dot(" in b for b in bodies.get(match.group(2), ())):
            continue
        params = [re.search(r"= (\S+?)\{", b).group(1) for b in bodies[match.group(2)] if " parameter(" in b]
        sizes = [math.prod(int(d) for d in re.findall(r"\d+", p.split("[")[1])) for p in params]
        if max(sizes) >= 1 << 18:
            out[match.group(1)] = [p for p, size in zip(params, sizes, strict=True) if size < 1 << 18]
    return out


def test_full_size_decode_step_has_no_weight_temporaries():
    """The compiled decode step of full-size E2B (bf16, PLE table on the host) keeps its temporaries under 1% of the
    weight bytes in the decode layout at batch 1 (measured 2.8 MB of 4.6 GB) and under 5% at batch 4 (measured 2.6%:
    attention's float32 copies of the 1024-token cache; dots on slices of a stacked [n, out, chunk] array used to
    copy every multi-chunk weight, 1.1 GB); in the
    checkpoint layout XLA:CPU converts every weight to float32 up front (measured 7.5 GB), which is what the layout
    is for."""
    from gemma4_jax.sampler import SamplingConfig

    cfg = config.get_config("e2b").text_only()
    temps = {}
    for layout, batch in (("checkpoint", 1), ("decode", 1), ("decode", 4)):
        tree = model.param_shapes(cfg, jnp.bfloat16)
        tree["embedder"].pop("per_layer_embeddings")
        if layout == "decode":
            tree = _abstract_decode_layout(cfg, tree)
        leaves = jax.tree.leaves(tree)
        weight_bytes = sum(int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize for w in leaves)
        cache = jax.eval_shape(lambda: model.init_cache(cfg, batch, 1024, jnp.bfloat16))  # noqa: B023
        rows = jax.ShapeDtypeStruct((batch, 1, cfg.num_layers, cfg.per_layer_input_dim), jnp.bfloat16)
        pos = jax.ShapeDtypeStruct((batch,), jnp.int32)
        step = _jitted["step"].lower(cfg, SamplingConfig(), tree, pos, pos, cache, jax.random.key(0), rows).compile()
        temps[layout, batch] = step.memory_analysis().temp_size_in_bytes / weight_bytes
        if (layout, batch) == ("decode", 1):
            # Every weight's matvec reads its activation row from a float32 buffer of its own: a bf16 operand would
            # mean its convert/reshape/transpose is fused into the loop and recomputed per weight element.
            matvecs = _matvec_activation_operands(step.as_text())
            assert len(matvecs) >= 7 * cfg.num_layers  # q, k/v, o, gate/up, down, PLE gate and projection
            unmaterialized = {k: v for k, v in matvecs.items() if not all(p.startswith("f32[") for p in v)}
            assert not unmaterialized
    print(f"decode-step temporaries / weight bytes: {temps}")
    assert temps["decode", 1] < 0.01
    assert temps["decode", 4] < 0.05
    assert temps["checkpoint", 1] > 0.5


def test_checkpoint_layout_round_trip_and_quantization():
    """What reads weights as stored (quantization, LoRA training) gets the official layout back, bit for bit."""
    from gemma4_jax.quant.policy import JaxPolicy
    from gemma4_jax.quant.weight import quantize_params

    cfg = config.get_config("tiny_moe")
    params = model.init_params(cfg, seed=2, dtype=jnp.bfloat16)
    fast = matvec.decode_layout(params, cfg)
    back = matvec.checkpoint_layout(fast)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    q_fast, q_plain = (quantize_params(p, cfg, JaxPolicy("int8")) for p in (fast, params))
    for a, b in zip(jax.tree.leaves(q_fast), jax.tree.leaves(q_plain), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
