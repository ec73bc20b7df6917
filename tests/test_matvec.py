"""The CPU decode layout (`gemma4_jax.matvec`): every contraction of the text decoder in the chunk-major form
against a float64 reference (jaxlib 0.10.2 has fused reductions that return wrong values, so each form is
checked numerically, several chunks included), the model's greedy output unchanged, and the compiled decode step
free of whole-weight temporaries."""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import config, kernels, matvec, model, param_spec
from gemma4_jax.model import tree_get, tree_set
from gemma4_jax.quant.weight import stored_rows
from gemma4_jax.sampler import Sampler, _jitted

# Equations of the model's weight contractions, by leaf suffix (`model.py`); x gets shape [B, T, ...].
EQUATIONS = {
    "attn/q_einsum/w": "btd,ndh->btnh",
    "attn/k_einsum/w": "btd,kdh->btkh",
    "attn/kv_einsum/w": "btd,ckdh->cbtkh",
    "attn/attn_vec_einsum/w": "btnh,nhd->btd",
    "mlp/linear": "...f,fd->...d",
}


# Jitted, as the model runs them: XLA fuses each form the way it does inside the model (what the float64 checks are
# for), and one program per shape compiles several times faster than dispatching every operation on its own.
_einsum = jax.jit(lambda eqn, weight, x: weight.einsum(eqn, x), static_argnums=0)
_float32 = jax.jit(lambda weight: weight.materialize(jnp.float32))
_logits = jax.jit(lambda params, tokens, cfg: model.apply(params, tokens, config=cfg)[0], static_argnums=2)


@pytest.fixture
def set_max_chunk(monkeypatch):
    """set_max_chunk(n): matvec.MAX_CHUNK = n for one test. Tracing reads it (the LM head's chunks), so no program
    traced under another value may be reused: the jitted functions' caches are dropped now and after the test."""

    def set_to(max_chunk: int) -> None:
        monkeypatch.setattr(matvec, "MAX_CHUNK", max_chunk)
        jax.clear_caches()

    yield set_to
    jax.clear_caches()


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
def test_contractions_equal_float64(dtype, max_chunk, set_max_chunk):
    """Each decode-layout leaf of E2B-style, K=V and MoE tiny models, for 1, 2, 5 and 16 activation rows, vs
    numpy float64 on the same (rounded) numbers: <= 2e-6 of max |y| with float32 weights, <= 2^-7 with bf16 (the
    result is rounded to bf16). max_chunk 16 cuts every contracted length into several chunks."""
    set_max_chunk(max_chunk)
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
                got = np.asarray(_einsum(eqn, weight, jnp.asarray(x, dtype)), np.float64)
                assert got.shape == want.shape
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err <= tol, (name, leaf.name, rows, err)
                checked += 1
            np.testing.assert_array_equal(np.asarray(_float32(weight), np.float64), w)
    assert checked > 40


# (max_chunk, format): dense in one and in several chunks; each scale form (per channel, block, 4-bit, per tensor)
EXPERT_CASES = [
    (matvec.MAX_CHUNK, None),
    (16, None),
    pytest.param(16, "int8/channel", marks=pytest.mark.slow),
    pytest.param(16, "int8/8", marks=pytest.mark.slow),
    (16, "int4/8"),
    pytest.param(16, "sfp8", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("max_chunk", "spec_text"), EXPERT_CASES)
def test_expert_stacks_equal_float64(max_chunk, spec_text, set_max_chunk):
    """The MoE expert stacks (tiny_moe) in the decode layout, through `ragged_einsum` as the MoE calls it: rows
    sorted by expert with empty experts and rows past the last group, 1-16 rows (read expert by expert) and 80
    (tiles of rows, each against its expert: several tiles per expert, partly filled ones), vs numpy float64 per
    row on its expert: <= 2e-6 of max |y| with float32 weights (dense or dequantized), <= 2^-7 in bf16; rows past
    the groups 0. A dense bf16 stack is held as its bit patterns and gives the same weight back."""
    from gemma4_jax.model import ragged_einsum
    from gemma4_jax.quant import parse_spec
    from gemma4_jax.quant.weight import quantize_leaf

    set_max_chunk(max_chunk)
    cfg = config.get_config("tiny_moe")
    rng = np.random.default_rng(5)
    checked = 0
    for suffix, eqn in (("mlp/gating_einsum/w", "md,egfd->mgf"), ("mlp/linear/w", "mf,efd->md")):
        leaf = next(leaf for leaf in _leaves(cfg) if leaf.name.endswith(suffix))
        groups = leaf.shape[0]
        for dtype, tol in ((jnp.float32, 2e-6), (jnp.bfloat16, 2.0**-7)):
            if spec_text is None:
                w = np.asarray(jnp.asarray(rng.normal(size=leaf.shape), dtype), np.float64)
                weight = matvec.to_decode_weight(np.asarray(w, dtype), leaf)
                assert weight.dtype == dtype and (weight.data[0].dtype == jnp.uint16) == (dtype == jnp.bfloat16)
                np.testing.assert_array_equal(np.asarray(weight.checkpoint_weight(), np.float64), w)
            else:
                q = quantize_leaf(
                    jnp.asarray(rng.normal(size=leaf.shape), jnp.float32), parse_spec(spec_text), leaf, dtype
                )
                w = np.asarray(_float32(q), np.float64)
                weight = matvec.to_decode_weight(q, leaf)
            assert weight.shape == leaf.shape and len(weight.data) >= 1
            for m in (1, 3, 16, 80):
                valid = m - m // 4  # the rest lie past the last group
                sizes = rng.multinomial(valid, rng.dirichlet(np.ones(groups) * 0.5)).astype(np.int32)
                empty, other = rng.choice(groups, 2, replace=False)
                sizes[other], sizes[empty] = sizes[other] + sizes[empty], 0
                experts = np.repeat(np.arange(groups), sizes)
                x_shape = (m, leaf.size("embed") if "gating" in suffix else leaf.size("expert_mlp"))
                x = np.asarray(jnp.asarray(rng.normal(size=x_shape), dtype), np.float64)
                want = np.stack(
                    [np.einsum(eqn.replace("m", "").replace("e", ""), x[r], w[e]) for r, e in enumerate(experts)]
                )
                got = jax.jit(ragged_einsum, static_argnums=0)(eqn, jnp.asarray(x, dtype), weight, jnp.asarray(sizes))
                got = np.asarray(got, np.float64)
                assert got.shape[0] == m and not got[valid:].any()
                err = np.abs(got[:valid] - want).max() / np.abs(want).max()
                assert err <= tol, (suffix, dtype, m, err)
                checked += 1
    assert checked == 16


QUANT_SPECS = ["int8/channel", "int8/16", "q8_0", "int4/32", "int4/channel", "q4_0", "sfp8"]


@pytest.mark.parametrize("max_chunk", [pytest.param(matvec.MAX_CHUNK, marks=pytest.mark.slow), 16])
@pytest.mark.parametrize("spec_text", QUANT_SPECS)
def test_quantized_contractions_equal_float64(spec_text, max_chunk, set_max_chunk, monkeypatch):
    """Each decode-layout leaf of the tiny models quantized in each format, in the decode layout, for 1 and several
    activation rows, vs numpy float64 on the dequantized weight: <= 2e-6 of max |y| computing in float32, <= 2^-7
    in bf16. The codes and scales come back bit for bit (`checkpoint_weight`), and a one-chunk quantized table
    (the tied LM head) reads its own arrays. XLA's float32 forms, the compiled 4-bit kernel off (its own checks:
    test_kernels.py)."""
    from gemma4_jax.quant import parse_spec
    from gemma4_jax.quant.weight import QuantizedWeight, quantize_leaf

    set_max_chunk(max_chunk)
    monkeypatch.setenv("GEMMA4_JAX_CPU_KERNELS", "0")
    spec = parse_spec(spec_text)
    rng = np.random.default_rng(1)
    checked = 0
    for name in ("tiny", "tiny_keqv"):
        for leaf in _leaves(config.get_config(name)):
            eqn = next((e for suffix, e in EQUATIONS.items() if "/".join(leaf.path).endswith(suffix)), None)
            _, c = stored_rows(leaf)
            if eqn is None or c % (spec.block or 2):
                continue
            for dtype, tol in ((jnp.float32, 2e-6), (jnp.bfloat16, 2.0**-7)):
                q = quantize_leaf(jnp.asarray(rng.normal(size=leaf.shape), jnp.float32), spec, leaf, dtype)
                w = np.asarray(_float32(q), np.float64)
                weight = matvec.to_decode_weight(q, leaf)
                assert weight.format == spec.format and weight.nbytes == q.nbytes
                # A chunk holds whole blocks: with max_chunk 16, a 32-block (Q8_0) stays one chunk
                assert all(chunk.shape[1] <= max(max_chunk, matvec._block_span(q)) for chunk in weight.data)
                for rows in ((1, 1), (2, 1), (2, 8)):
                    x = np.asarray(jnp.asarray(rng.normal(size=_x_shape(eqn, leaf, rows)), dtype), np.float64)
                    want = np.einsum(eqn, x, w)
                    got = np.asarray(_einsum(eqn, weight, jnp.asarray(x, dtype)), np.float64)
                    err = np.abs(got - want).max() / np.abs(want).max()
                    assert err <= tol, (name, leaf.name, dtype, rows, err)
                    checked += 1
                back = weight.checkpoint_weight()
                assert isinstance(back, QuantizedWeight) and back.spec == q.spec and back.dtype == q.dtype
                for a, b in ((back.codes, q.codes), (back.scales, q.scales)):
                    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert checked > 20
    cfg = config.get_config("tiny")
    leaf = param_spec.leaf_of(cfg, ("embedder", "input_embedding"))
    table = quantize_leaf(jnp.asarray(rng.normal(size=leaf.shape), jnp.float32), spec, leaf, jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, 1, leaf.shape[1])), jnp.float32)
    assert matvec.fused_lm_head(x, table) == (leaf.shape[1] <= max_chunk)  # one chunk, read in place
    if leaf.shape[1] > max_chunk:
        return
    want = np.einsum("btd,vd->btv", np.asarray(x, np.float64), np.asarray(_float32(table), np.float64))
    got = np.asarray(jax.jit(matvec.lm_head)(x, table), np.float64)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


# The default tier: the dense models in several chunks; one chunk and tiny_moe in the slow tier.
@pytest.mark.parametrize(
    "max_chunk, name",
    [
        *(pytest.param(matvec.MAX_CHUNK, name, marks=pytest.mark.slow) for name in ("tiny", "tiny_keqv", "tiny_moe")),
        (16, "tiny"),
        (16, "tiny_keqv"),
        pytest.param(16, "tiny_moe", marks=pytest.mark.slow),
    ],
)
def test_greedy_unchanged(name, max_chunk, set_max_chunk):
    """Float32 weights: 64 greedy tokens identical in both layouts; full-forward logits as close to the float64
    result as the checkpoint layout's (within 2x)."""
    set_max_chunk(max_chunk)
    cfg = config.get_config(name)
    params = model.init_params(cfg, seed=1, dtype=jnp.float32)
    fast = matvec.decode_layout(params, cfg)
    assert any(isinstance(w, matvec.DecodeWeight) for w in jax.tree.leaves(fast, is_leaf=matvec.is_decode_weight))
    tokens = np.asarray([[2, 5, 9, 33, 17, 4, 90, 11]])
    with jax.enable_x64(True):
        exact = np.asarray(_logits(jax.tree.map(lambda w: w.astype(jnp.float64), params), tokens, cfg))
    plain, chunked = (np.abs(np.asarray(_logits(p, tokens, cfg)) - exact).max() for p in (params, fast))
    print(f"{name}: max |dlogit| vs float64: checkpoint layout {plain:.3g}, decode layout {chunked:.3g}")
    assert chunked <= 2 * plain + 1e-6  # float32 round-off of another summation order, no worse
    prompts = [[2, 5, 9], [2, 40, 41, 42, 43]]
    assert Sampler(cfg, fast).generate(prompts, 64).tokens == Sampler(cfg, params).generate(prompts, 64).tokens


@pytest.mark.parametrize(
    "name, fmt",
    # Every format on tiny; on tiny_keqv (K=V global layers) one 8-bit and one 4-bit format: each format's
    # contractions on every tiny_keqv leaf are checked against float64 above. The default tier: tiny_keqv in int8.
    [
        *(pytest.param("tiny", fmt, marks=pytest.mark.slow) for fmt in ("int8", "int4", "q4_0", "sfp8")),
        ("tiny_keqv", "int8"),
        pytest.param("tiny_keqv", "q4_0", marks=pytest.mark.slow),
    ],
)
def test_quantized_greedy_unchanged(name, fmt, monkeypatch):
    """Quantized weights computing in float32: 64 greedy tokens identical in the decode layout and as packed
    `QuantizedWeight`s in the checkpoint layout (the LM head's fused form included), logits within float32
    round-off. XLA's float32 forms: the compiled 4-bit kernel (int8 activations) is off here (test_kernels.py)."""
    from gemma4_jax.quant import JaxPolicy, quantize_params

    monkeypatch.setenv("GEMMA4_JAX_CPU_KERNELS", "0")
    cfg = config.get_config(name)
    packed = quantize_params(model.init_params(cfg, seed=3, dtype=jnp.float32), cfg, JaxPolicy(fmt))
    fast = matvec.decode_layout(packed, cfg)
    kinds = {w.format for w in jax.tree.leaves(fast, is_leaf=matvec.is_decode_weight) if matvec.is_decode_weight(w)}
    assert fmt in kinds
    tokens = np.asarray([[2, 5, 9, 33, 17, 4, 90, 11]])
    a, b = (np.asarray(_logits(p, tokens, cfg)) for p in (packed, fast))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    # Each prompt alone: the prefill's 16 rows take the several-row form of every contraction, the steps the one-row
    # form (a batch of two would take the several-row form again). Both prompts share one compiled prefill and step.
    for prompt in ([2, 5, 9], [2, 40, 41, 42, 43]):
        assert Sampler(cfg, fast).generate([prompt], 64).tokens == Sampler(cfg, packed).generate([prompt], 64).tokens


def _abstract_decode_layout(cfg, tree):
    """`matvec.decode_layout` on shapes only (a full-size model compiles without its weights)."""
    for leaf in _leaves(cfg):
        tree_set(tree, leaf.path, matvec.abstract_decode_weight(leaf, tree_get(tree, leaf.path).dtype))
    return tree


def _bf16_shapes(cfg, layout: str):
    """The bf16 parameter tree's shapes in `layout`: "decode" or "checkpoint"."""
    tree = model.param_shapes(cfg, jnp.bfloat16)
    return _abstract_decode_layout(cfg, tree) if layout == "decode" else tree


def _abstract_quantized(cfg, tree, fmt):
    """`quant.quantize_params(tree, JaxPolicy(fmt))` then `matvec.decode_layout`, on shapes only."""
    from gemma4_jax.quant import JaxPolicy
    from gemma4_jax.quant.codecs import FLOAT, code_shapes
    from gemma4_jax.quant.weight import QuantizedWeight

    sds = jax.ShapeDtypeStruct
    for leaf in param_spec.param_spec(cfg):
        spec = JaxPolicy(fmt).choose(leaf)
        try:
            dtype = tree_get(tree, leaf.path).dtype
        except KeyError:
            continue
        if spec.format == FLOAT:
            continue
        codes, codes_dtype, scales, scales_dtype = code_shapes(spec, *stored_rows(leaf))
        w = QuantizedWeight(
            sds(codes, codes_dtype), sds(scales, scales_dtype), spec.format, spec.block, leaf.shape, leaf.perm,
            leaf.ncontract, dtype,
        )  # fmt: skip
        if matvec.uses_decode_layout(leaf):
            out, width, n = matvec.quantized_chunks(w)
            if spec.format == "sfp8":
                chunk_scales = w.scales
            elif spec.block is None:
                chunk_scales = sds((out,), scales_dtype)
            else:
                chunk_scales = (sds((out, scales[-1] // n), scales_dtype),) * n
            data = (sds((out, width // n), codes_dtype),) * n
            kernel = matvec.kernel_for(spec.format, spec.block, scales_dtype)
            w = matvec.DecodeWeight(data, w.shape, w.perm, w.ncontract, chunk_scales, w.format, w.block, dtype, kernel)
        tree_set(tree, leaf.path, w)
    return tree


def _matvec_activation_operands(hlo: str) -> dict[tuple[str, str], list[str]]:
    """For each loop fusion (of the entry computation or a loop's body) whose dot reads a weight (a parameter of
    >= 2^18 elements; the attention's library dots over the cache are custom fusions), keyed by (the computation it
    is in, its name): the shapes of its other parameters but the weight's block scales, the activations."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[name] = []
        elif name:
            bodies[name].append(line)
    out = {}
    for computation, lines in bodies.items():
        for line in lines:
            match = re.search(r"%(\S+) = \S+ fusion\(.*kind=kLoop, calls=%([\w.\-]+)", line)
            if not match or not any(" dot(" in b for b in bodies.get(match.group(2), ())):
                continue
            params = [re.search(r"= (\w+\[[\d,]*\])", b).group(1) for b in bodies[match.group(2)] if " parameter(" in b]
            dims = [[int(d) for d in re.findall(r"\d+", p.split("[")[1].split("]")[0])] for p in params]
            sizes = [math.prod(d) for d in dims]
            if max(sizes) >= 1 << 18:
                rows = dims[sizes.index(max(sizes))][0]  # block scales [rows, blocks] are the weight's, not activations
                out[computation, match.group(1)] = [
                    p for p, d, size in zip(params, dims, sizes, strict=True) if size < 1 << 18 and d[:1] != [rows]
                ]
    return out


def _tree_bytes(tree) -> int:
    """Bytes of a tree of arrays or shapes, as stored."""
    return sum(int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize for w in jax.tree.leaves(tree))


def _e2b_10_layers():
    """E2B at full width, 10 of its 35 layers (one local/global pattern of KV owners, one of KV readers), text only.
    A step's temporaries are per layer (each layer's freed before the next), so depth only costs compile time:
    the 35-layer step measured the same fractions (bf16 0.17 %, int8 0.33 % at batch 1) against 0.19 % and 0.37 %
    here, where the embedding table is a larger share of the weights."""
    return config.cut_to_layers(config.get_config("e2b"), 10).text_only()


def _moe_6_layers():
    """26B-A4B at full width, 6 of its 30 layers (one local/global pattern), text only."""
    return config.cut_to_layers(config.get_config("26b_a4b"), 6).text_only()


def _compiled_step(cfg, tree, batch):
    from gemma4_jax.sampler import SamplingConfig

    cache = jax.eval_shape(lambda: model.init_cache(cfg, batch, 1024, jnp.bfloat16))
    rows = jax.ShapeDtypeStruct((batch, 1, cfg.num_layers, cfg.per_layer_input_dim), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return _jitted["step"].lower(cfg, SamplingConfig(), tree, pos, pos, cache, jax.random.key(0), rows).compile()


# (weights, layout, batch) -> the most temporary bytes of the compiled E2B decode step per weight byte (measured on
# the 10-layer slice; the 35-layer step's in brackets)
TEMPORARY_BOUNDS = {
    ("bf16", "checkpoint", 1): None,  # checked from below: XLA:CPU converts every weight to float32 up front
    ("bf16", "decode", 1): 0.01,  # 0.19% (0.17%: 2.8 MB of 4.6 GB)
    ("bf16", "decode", 4): 0.05,  # 2.4% (2.6%): attention's float32 copies of the 1024-token cache
    ("int8", "decode", 1): 0.01,  # 0.37% (0.3-0.5% for every quantized format)
    ("int8", "decode", 4): 0.1,  # 5.7% (5.8%; dequantizing a block at a time; every block up front: 238%)
    ("int4", "decode", 1): 0.01,
    ("int4", "decode", 4): 0.15,  # (8.0%)
    ("q4_0", "decode", 1): 0.01,
    ("sfp8", "decode", 1): 0.01,
}


@pytest.mark.parametrize(
    "fmt", [*(pytest.param(f, marks=pytest.mark.slow) for f in ("bf16", "int8", "int4")), "q4_0", "sfp8"]
)
def test_e2b_decode_step_has_no_weight_temporaries(fmt):
    """The compiled decode step of E2B at full width (`_e2b_10_layers`, PLE table on the host) in the decode layout
    keeps its temporaries a small fraction of the weight bytes (`TEMPORARY_BOUNDS`), for each weight format: at
    batch 1 every contraction is a fused 1-D dot reading the stored bytes; at batch 4 quantized chunks are
    dequantized layer by layer, not all up front. In the checkpoint layout XLA:CPU converts every bf16 weight to
    float32 up front (measured 7.5 GB), which is what the layout is for."""
    cfg = _e2b_10_layers()
    temps = {}
    for (weights, layout, batch), bound in TEMPORARY_BOUNDS.items():
        if weights != fmt:
            continue
        tree = model.param_shapes(cfg, jnp.bfloat16)
        tree["embedder"].pop("per_layer_embeddings")
        if fmt != "bf16":
            tree = _abstract_quantized(cfg, tree, fmt)
        elif layout == "decode":
            tree = _abstract_decode_layout(cfg, tree)
        weight_bytes = _tree_bytes(tree)
        step = _compiled_step(cfg, tree, batch)
        temps[layout, batch] = step.memory_analysis().temp_size_in_bytes / weight_bytes
        if batch == 1 and layout == "decode":
            # Every weight's matvec reads its activation row from a float32 buffer of its own: a bf16 operand would
            # mean its convert/reshape/transpose is fused into the loop and recomputed per weight element.
            # 4-bit weights go to the compiled kernel (a custom call) where it runs.
            matvecs = _matvec_activation_operands(step.as_text())
            kernel_calls = step.as_text().count('custom_call_target="gemma4_q4_matvec_')
            assert (kernel_calls > 0) == (fmt in ("int4", "q4_0") and kernels.q4_available())
            # q, k/v, o, gate/up, down, PLE gate and projection
            assert len(matvecs) + kernel_calls >= 7 * cfg.num_layers, (len(matvecs), kernel_calls)
            unmaterialized = {k: v for k, v in matvecs.items() if not all(p.startswith("f32[") for p in v)}
            assert not unmaterialized
        if bound is None:
            assert temps[layout, batch] > 0.5
        else:
            assert temps[layout, batch] < bound, (fmt, layout, batch, temps)
    print(f"{fmt}: decode-step temporaries / weight bytes: {temps}")


def test_moe_decode_step_reads_one_expert_at_a_time():
    """26B-A4B at full width (6 of its 30 layers, bf16), compiled decode step at batch 1: in the decode layout each
    token's 8 experts are read in place, expert by expert in a loop (temporaries < 1% of the weight bytes, every
    matvec's row a float32 buffer of its own); the checkpoint layout's ragged_dot converts all 128 experts of a layer to
    float32 (measured: 2.5 GB per layer, ~2.7 s per layer and token on 2 cores, against ~3 ms read in place)."""
    cfg = _moe_6_layers()
    temps = {}
    for layout in ("decode", "checkpoint"):
        tree = _bf16_shapes(cfg, layout)
        weight_bytes = _tree_bytes(tree)
        step = _compiled_step(cfg, tree, 1)
        temps[layout] = step.memory_analysis().temp_size_in_bytes / weight_bytes
        if layout == "decode":
            hlo = step.as_text()
            matvecs = _matvec_activation_operands(hlo)
            # Per layer q/k/v/o-like dense matvecs in the step itself, and each expert stack's in the body of a loop
            # over the 8 rows: one loop per stack and layer, gating's gate and up halves and linear in them.
            loops = set(re.findall(r"while\(.*body=%([\w.\-]+)", hlo))
            in_loops = collections.Counter(where for where, _ in matvecs if where in loops)
            assert len(in_loops) == 2 * cfg.num_layers and sum(in_loops.values()) >= 3 * cfg.num_layers, in_loops
            assert len(matvecs) - sum(in_loops.values()) >= 4 * cfg.num_layers, len(matvecs)
            # the activation rows float32 buffers (the s32 operands: the experts of the rows, the loop's counter)
            assert all(p.startswith(("f32[", "s32[")) for v in matvecs.values() for p in v)
    print(f"26b_a4b (6 layers): decode-step temporaries / weight bytes: {temps}")
    assert temps["decode"] < 0.01 and temps["checkpoint"] > 0.5, temps


@pytest.mark.slow
def test_moe_prefill_reads_each_expert_in_its_stored_dtype():
    """26B-A4B at full width (6 of its 30 layers, bf16), compiled prefill of 64 tokens: in the decode layout the
    experts' rows go tile by tile through a loop, each tile against its expert alone in bf16 (temporaries < 2% of the
    weight bytes); the checkpoint layout's ragged_dot converts all 128 experts of a layer to float32 (measured on
    one layer's stack and 512 rows: 12.4 s against 0.16 s)."""
    from gemma4_jax.sampler import SamplingConfig

    cfg = _moe_6_layers()
    tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    cache = jax.eval_shape(lambda: model.init_cache(cfg, 1, 1024, jnp.bfloat16))
    last = jax.ShapeDtypeStruct((1,), jnp.int32)
    temps = {}
    for layout in ("decode", "checkpoint"):
        tree = _bf16_shapes(cfg, layout)
        weight_bytes = _tree_bytes(tree)
        args = (cfg, SamplingConfig(), tree, tokens, tokens, cache, last, jax.random.key(0), None, None)
        temps[layout] = _jitted["prefill"].lower(*args).compile().memory_analysis().temp_size_in_bytes / weight_bytes
    print(f"26b_a4b (6 layers): prefill temporaries / weight bytes: {temps}")
    assert temps["decode"] < 0.02 and temps["checkpoint"] > 0.1, temps


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
