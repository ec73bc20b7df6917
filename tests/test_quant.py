"""Quantization: codecs against independent references, packed weights in the model, the quantize CLI.

References used here and nowhere in gemma4_jax.quant:
- SFP8: a decoder and an encoder written straight from the format description (value = (1 + m/8)·2^E for
  "large" codes, (1 + m/4)·2^E for "small" ones; gemma.cpp's encoder chops float32 to bfloat16 and rounds from
  the top 6 mantissa bits, to nearest, ties to even), in Python floats, searching the grid of values.
- Q8_0 / Q4_0: gguf-py's `gguf.quants.quantize` / `dequantize` (the llama.cpp project's reference).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gemma4_jax import api, cli, hf_format, matvec, model, param_spec, quant
from gemma4_jax.config import get_config
from gemma4_jax.quant import JaxPolicy, QuantSpec, codecs
from gemma4_jax.quant.weight import sfp8_decode_jax

# ----- SFP8: an independent reading of the format ----------------------------------------------------------


def reference_decode(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    body = code & 0x7F
    if body == 0:
        return sign * 0.0
    if body & 0x40:  # large: bits 5..3 = E + 7, bits 2..0 = m
        return sign * (1 + (body & 7) / 8) * 2.0 ** (((body >> 3) & 7) - 7)
    return sign * (1 + (body & 3) / 4) * 2.0 ** ((body >> 2) - 23)  # small: bits 5..2 = E + 23, 1..0 = m


# Grid of magnitudes the encoder rounds to, (value, m): small codes from one binade below the smallest
# (rounding there decides between zero and the smallest code) up to 2^-8, large codes from 2^-7 to 1.875.
_GRID = sorted(
    [((1 + m / 4) * 2.0**e, m) for e in range(-24, -7) for m in range(4)]
    + [((1 + m / 8) * 2.0**e, m) for e in range(-7, 1) for m in range(8)]
)
_GRID_VALUES = np.array([v for v, _ in _GRID])


def reference_encode_value(x: float) -> float:
    """The value gemma.cpp's SFP8 encoder gives a float32 x with |x| <= 1.875."""
    a = abs(x)
    if a < 2.0**-24:
        return 0.0
    _, exponent = math.frexp(a)  # a = mantissa * 2^exponent, mantissa in [0.5, 1)
    unit = 2.0 ** (exponent - 7)  # keeps 1 + 6 significant bits (bf16 chop, then its last bit dropped)
    t = math.floor(a / unit) * unit
    i = int(np.searchsorted(_GRID_VALUES, t, side="right")) - 1
    lower, m_lower = _GRID[i]
    upper, _ = _GRID[i + 1] if i + 1 < len(_GRID) else (math.inf, 0)
    if t - lower < upper - t or (t - lower == upper - t and m_lower % 2 == 0):
        v = lower
    else:
        v = upper
    if v < 2.0**-23:
        return 0.0
    if v == 2.0**-23:
        v = 1.25 * 2.0**-23  # 1.0·2^-23 would be code 0x00, which is zero
    return math.copysign(v, x)


def reference_scale(x: np.ndarray) -> tuple[np.ndarray, float]:
    max_abs = np.float32(np.abs(x).max())
    if max_abs <= np.float32(1.875):
        return x.astype(np.float32), np.float32(1)
    scale = np.float32(max_abs / np.float32(1.875))
    inv = np.float32(1 / float(scale))
    return np.sign(x) * np.minimum(np.float32(1.875), np.abs(x.astype(np.float32) * inv)), scale


REFERENCE_TABLE = np.array([reference_decode(c) for c in range(256)], np.float64)


def test_sfp8_all_256_codes():
    ours = codecs.sfp8_decode(np.arange(256, dtype=np.uint8))
    np.testing.assert_array_equal(ours.astype(np.float64), REFERENCE_TABLE)
    assert np.signbit(ours[0x80]) and not np.signbit(ours[0])
    on_device = np.asarray(jax.jit(sfp8_decode_jax)(jnp.arange(256, dtype=jnp.uint8)))
    np.testing.assert_array_equal(on_device.view(np.uint32), ours.view(np.uint32))
    # Every code but -0 round-trips; the largest magnitude is 1.875, the smallest 1.25·2^-23.
    codes = np.array([c for c in range(256) if c != 0x80], np.uint8)
    np.testing.assert_array_equal(codecs.sfp8_encode_unscaled(REFERENCE_TABLE[codes].astype(np.float32)), codes)
    assert codecs.sfp8_encode_unscaled(np.float32([-0.0]))[0] == 0x00
    assert REFERENCE_TABLE.max() == 1.875 and REFERENCE_TABLE[1] == 1.25 * 2.0**-23


def _check_against_reference(x: np.ndarray):
    codes = codecs.sfp8_encode_unscaled(x)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    assert not np.any(codes == 0x80), "0x80 (-0) must never be written"
    expected = np.array([reference_encode_value(float(v)) for v in x.ravel()]).reshape(x.shape)
    got = REFERENCE_TABLE[codes]
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(float(x.ravel()[i]), got.ravel()[i], expected.ravel()[i]) for i in bad[:5]]


def test_sfp8_random_values_match_reference():
    rng = np.random.default_rng(0)
    magnitudes = 2.0 ** rng.uniform(-27, math.log2(1.875), 20000)
    x = (magnitudes * rng.choice([-1, 1], magnitudes.size)).astype(np.float32)
    _check_against_reference(x)


def test_sfp8_ties_round_to_even_and_edges():
    ties, above = [], []
    for e in range(-7, 1):  # midpoints between large codes; the carry into the next binade included
        for m in range(8):
            mid = (1 + (2 * m + 1) / 16) * 2.0**e
            if mid < 1.875:
                ties.append(mid)
                above.append(mid + 2.0 ** (e - 7))  # the bf16 bit gemma.cpp drops: still a tie
    for e in range(-24, -7):  # midpoints between small codes, incl. the small/large boundary at 1.875·2^-8
        for m in range(4):
            ties.append((1 + (2 * m + 1) / 8) * 2.0**e)
    ties = np.array(ties, np.float32)
    _check_against_reference(np.concatenate([ties, -ties, np.array(above, np.float32)]))
    # Ties go to the even mantissa: 1.0625 -> 1.0 (m=0), 1.1875 -> 1.25 (m=2), 1.9375·2^-1 -> 1.0.
    values = codecs.sfp8_decode(codecs.sfp8_encode_unscaled(np.float32([1.0625, 1.1875, 0.96875])))
    np.testing.assert_array_equal(values, [1.0, 1.25, 1.0])
    # Zero, the smallest code and its neighbourhood, bf16-chopped inputs, the maximum.
    edges = [0, -0.0, 2.0**-25, 2.0**-24, 1.8 * 2**-24, 1.875 * 2**-24, 2.0**-23, 1.1 * 2**-23, 1.125 * 2**-23]
    edges += [1.375 * 2**-23, 2.0**-8, 1.9 * 2**-8, 2.0**-7, 1.875, 1.87, 1.0 + 2.0**-20, 1e-30, 1e-45]
    edges = np.float32(edges)
    _check_against_reference(np.concatenate([edges, -edges]))
    assert codecs.sfp8_encode_unscaled(np.float32([1.875 * 2**-24]))[0] == 0x01  # rounds up, bumped to 1.25·2^-23
    assert codecs.sfp8_encode_unscaled(np.float32([-(2.0**-25)]))[0] == 0x00


def test_sfp8_scale_handling():
    rng = np.random.default_rng(1)
    x = np.clip(rng.standard_normal((64, 48)), -3, 3).astype(np.float32) * 2
    x[5, 7] = -7.25  # the largest magnitude is negative
    codes, scale = codecs.sfp8_encode(x)
    scaled, expected_scale = reference_scale(x)
    assert scale == expected_scale == np.float32(7.25 / 1.875)
    assert codes[5, 7] == 0xFF  # -1.875
    _check_against_reference(scaled.astype(np.float32))
    np.testing.assert_array_equal(codes, codecs.sfp8_encode_unscaled(scaled.astype(np.float32)))
    decoded = codecs.sfp8_decode(codes, scale)
    assert decoded[5, 7] == np.float32(-1.875) * scale
    # 3 mantissa bits above 2^-7 (relative error <= 1/16 after rounding from a chopped value: < 1/8 bound).
    big = np.abs(x) / scale >= 2.0**-7
    assert np.all(np.abs(decoded - x)[big] <= np.abs(x)[big] / 8)
    # Up to 1.875 nothing is scaled; all zeros encode to 0x00 with scale 1.
    small = np.float32([[1.875, -1.875, 0.5]])
    codes, scale = codecs.sfp8_encode(small)
    assert scale == 1 and list(codes[0]) == [0x7F, 0xFF, 0x70]
    codes, scale = codecs.sfp8_encode(np.zeros((3, 4), np.float32))
    assert scale == 1 and not codes.any()


# ----- GGUF Q8_0 / Q4_0 against gguf-py ------------------------------------------------------------------


def _ggml_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 256)).astype(np.float32)
    x[0, 0, :32] = 0  # all-zero block
    x[0, 1, :32] = -np.abs(x[0, 1, :32])  # negative maximum
    x[0, 1, 40] = 9.0  # positive maximum
    x[0, 2, :32] = np.linspace(-1, 1, 32)  # +max and -max both present: the first one wins
    x[0, 3, :32] = np.arange(32) - 15.5  # halfway values for Q8_0's rounding (d = 16.5/127)
    x[1, 0, :32] = np.float32(127) * np.arange(-16, 16) / 127  # exact multiples
    x[1, 1, :32] = 1e-6 * rng.standard_normal(32)  # tiny (float16 scale underflows to subnormal)
    x[1, 2, :32] = 300 * rng.standard_normal(32)
    x[1, 3, :32] = -(2.0 ** rng.integers(-8, 8, 32))
    return [x, x[2:3, 1], rng.standard_normal((3, 32)).astype(np.float32) * 1e-3, np.zeros((2, 64), np.float32)]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_ggml_bytes_identical_to_gguf(qtype):
    encode, decode = {
        "Q8_0": (codecs.q8_0_encode, codecs.q8_0_decode),
        "Q4_0": (codecs.q4_0_encode, codecs.q4_0_decode),
    }[qtype]
    for x in _ggml_cases():
        ours = encode(x)
        theirs = gguf.quants.quantize(x, T[qtype])
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(decode(ours, x.shape), gguf.quants.dequantize(theirs, T[qtype]))
    # bfloat16 input quantizes like its float32 value.
    import ml_dtypes

    x = _ggml_cases()[0].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(encode(x), gguf.quants.quantize(x.astype(np.float32), T[qtype]))


# ----- int8 / int4 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 32, 64, 128])
def test_int8_int4_error_bounds(block):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7, 256)).astype(np.float32) * rng.uniform(0.01, 10, (5, 7, 1)).astype(np.float32)
    x[0, 0] = 0
    for name, qmax in (("int8", 127), ("int4", 7)):
        quantize = getattr(codecs, f"{name}_quantize")
        codes, scales = quantize(x, block)
        nb = 1 if block is None else 256 // block
        assert scales.shape == (5, 7, nb) and scales.dtype == np.float32
        assert codes.shape == ((5, 7, 256) if name == "int8" else (5, 7, 128))
        if name == "int8":
            back = codecs.int8_dequantize(codes, scales)
        else:  # nibbles back to codes -7..7 (element j low, j + block/2 high)
            back = codecs.int8_dequantize(codecs.unpack_nibbles(codes, block or 256).astype(np.int8) - 8, scales)
        blocks = x.reshape(5, 7, nb, -1)
        np.testing.assert_allclose(scales, np.abs(blocks).max(-1) / qmax, rtol=1e-7)
        err = np.abs(back - x).reshape(5, 7, nb, -1)
        assert np.all(err <= scales[..., None] / 2 * (1 + 1e-5) + 1e-30), (name, err.max())
        assert not back[0, 0].any()
        if name == "int4":  # nibbles 1..15 (codes -7..7), element j low / j + block/2 high in each block
            q = np.concatenate([codes & 15, codes >> 4], axis=-1)  # per-channel: one block per row
            if block is None:
                np.testing.assert_array_equal(q.astype(np.float32) - 8, np.rint(x / np.maximum(scales, 1e-30)))
            assert q.min() >= 1 and q.max() <= 15


# ----- packed weights in the model -----------------------------------------------------------------------


def independent_dense(w: quant.QuantizedWeight) -> np.ndarray:
    """The weight a QuantizedWeight stands for, decoded without gemma4_jax.quant's decoders."""
    codes, scales = np.asarray(w.codes), np.asarray(w.scales)
    stored = tuple(w.shape[p] for p in w.perm)
    c = math.prod(stored[len(stored) - w.ncontract :])
    if w.format == "sfp8":
        rows = REFERENCE_TABLE[codes] * float(scales)
    elif w.format in ("q8_0", "q4_0"):  # rebuild the ggml blocks, decode with gguf-py
        qtype = T.Q8_0 if w.format == "q8_0" else T.Q4_0
        blocks = np.concatenate(
            [
                scales.astype(np.float16).view(np.uint8).reshape(*scales.shape, 2),
                codes.view(np.uint8).reshape(*scales.shape, -1),
            ],
            axis=-1,
        )
        rows = gguf.quants.dequantize(blocks.reshape(*codes.shape[:-1], -1), qtype)
    else:
        if w.format == "int4":  # per block: first half in the low nibbles, second half in the high ones
            halves = codes.reshape(*scales.shape, -1)
            q = np.concatenate([halves & 15, halves >> 4], axis=-1).astype(np.float64) - 8
        else:
            q = codes.reshape(*scales.shape, -1).astype(np.float64)
        rows = q * scales.astype(np.float64)[..., None]
    rows = np.asarray(rows, np.float64).reshape(*stored[: len(stored) - w.ncontract], c).reshape(stored)
    return np.transpose(rows, np.argsort(w.perm)).astype(np.float32)


def _dense_tree(qparams):
    return jax.tree_util.tree_map(
        lambda w: jnp.asarray(independent_dense(w)) if isinstance(w, quant.QuantizedWeight) else w,
        qparams,
        is_leaf=lambda x: isinstance(x, quant.QuantizedWeight),
    )


def _specs(qparams) -> dict[str, str]:
    leaves = jax.tree_util.tree_leaves_with_path(qparams, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))
    return {
        "/".join(k.key for k in path): str(w.spec) if isinstance(w, quant.QuantizedWeight) else "float"
        for path, w in leaves
    }


FORWARD_CASES = [
    ("tiny", ["sfp8", "int8", "int4", "q4_0"]),  # q4_0 puts the tables and PLE projections in Q8_0
    ("tiny_keqv", ["int4"]),
    pytest.param("tiny_moe", ["q4_0", "sfp8"], marks=pytest.mark.slow),
]
# f32: the packed forward and the dense forward on the decoded weights compute the same sums, in possibly
# another order (the einsum sees the weight in its stored layout; on CPU the decode layout sums column chunks and
# applies a per-tensor or per-channel scale after the dot): a few float32 ulps of the largest logit.
FORWARD_RTOL = 2e-6


@pytest.mark.parametrize("variant,formats", FORWARD_CASES)
def test_quantized_forward_equals_dense_forward_on_decoded_weights(variant, formats):
    cfg = get_config(variant)
    params = model.init_params(cfg, 0, jnp.float32)
    # Weights above 1.875 exercise the SFP8 tensor scale; real checkpoints have them (e.g. the embedding).
    params["embedder"]["input_embedding"] = params["embedder"]["input_embedding"] * 40
    forward = jax.jit(model.apply, static_argnames=("config",))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 11)))
    float_logits = np.asarray(forward(params, tokens, config=cfg)[0])
    for fmt in formats:
        qparams = quant.quantize_params(params, cfg, JaxPolicy(fmt))
        specs = _specs(qparams)
        assert all(v == "float" for k, v in specs.items() if k.endswith("scale") or "router" in k)
        assert any(v.startswith(fmt) for v in specs.values())
        if fmt in ("int4", "q4_0"):  # 8 bits for the PLE projections and both tables
            eight = {"int4": "int8/channel", "q4_0": "q8_0"}[fmt]
            assert specs["embedder/input_embedding"] == eight
            assert specs.get("embedder/per_layer_embeddings", eight) in (eight, "int8/channel")
            ple_projections = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")
            for k, v in specs.items():
                if (
                    k.endswith("/w") and k.split("/")[-2] in ple_projections
                ):  # int8 where the contraction (P = 16) is no multiple of 32
                    assert v in (eight, "int8/channel"), (k, v)
        dense = _dense_tree(qparams)
        for (path, w), (_, d) in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(dense), strict=True
        ):
            # The decoded weight is the original up to the format's error (the layout is right).
            w, d = np.asarray(w), np.asarray(d)
            bound = {"sfp8": 0.13, "int8": 0.01, "q8_0": 0.01}.get(fmt, 0.2) * np.abs(w).max()
            assert np.abs(w - d).max() <= bound, (fmt, path)
        quantized_logits = np.asarray(forward(qparams, tokens, config=cfg)[0])
        dense_logits = np.asarray(forward(dense, tokens, config=cfg)[0])
        atol = FORWARD_RTOL * np.abs(dense_logits).max()
        np.testing.assert_allclose(quantized_logits, dense_logits, rtol=0, atol=atol, err_msg=fmt)
        assert quant.weight_bytes(qparams) < quant.weight_bytes(params) / 2.5
        assert np.abs(quantized_logits - float_logits).max() > 0  # quantization did change something


def test_weight_object_protocol():
    rng = np.random.default_rng(5)
    gating = rng.standard_normal((2, 96, 64)).astype(np.float32)
    cfg = get_config("tiny")  # gating [2, 96, 64], PLE table [512, 9, 16] ~ its own leaves below
    leaf = param_spec.leaf_of(cfg, "layer_0/mlp/gating_einsum")
    w = quant.quantize_leaf(jnp.asarray(gating), QuantSpec("int4", 32), leaf)
    merged = w.reshape(192, 64)
    np.testing.assert_array_equal(np.asarray(merged.materialize(jnp.float32)), independent_dense(w).reshape(192, 64))
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    np.testing.assert_allclose(
        np.asarray(merged.einsum("...d,fd->...f", x)),
        np.asarray(x) @ independent_dense(w).reshape(192, 64).T,
        atol=1e-4,
    )
    table = rng.standard_normal((50, 3, 32)).astype(np.float32)
    table_leaf = dataclasses.replace(param_spec.leaf_of(cfg, "embedder/per_layer_embeddings"), shape=table.shape)
    for spec in (QuantSpec("sfp8"), QuantSpec("q4_0", 32), QuantSpec("int8")):
        t = quant.quantize_leaf(jnp.asarray(table), spec, table_leaf)
        ids = jnp.asarray([[3, 49], [0, 3]])
        np.testing.assert_array_equal(np.asarray(t.take(ids, jnp.float32)), independent_dense(t)[np.asarray(ids)])
    attn_vec = rng.standard_normal((4, 16, 64)).astype(np.float32)  # contracts N·H = 64: one 32-block spans 2 heads
    vec_leaf = dataclasses.replace(param_spec.leaf_of(cfg, "layer_0/attn/attn_vec_einsum/w"), shape=attn_vec.shape)
    a = quant.quantize_leaf(jnp.asarray(attn_vec), QuantSpec("q4_0", 32), vec_leaf)
    assert a.codes.shape == (64, 32) and a.scales.shape == (64, 2)
    ggml = gguf.quants.quantize(attn_vec.reshape(64, 64).T.copy(), T.Q4_0)  # HF o_proj [D, N·H]
    np.testing.assert_array_equal(np.asarray(a.codes), ggml[:, [*range(2, 18), *range(20, 36)]])
    np.testing.assert_array_equal(np.asarray(a.scales).view(np.uint8), ggml[:, [0, 1, 18, 19]])


# ----- quantize / eval-quant commands --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tokenizer_fixture import write_tokenizer

    path = str(tmp_path_factory.mktemp("float") / "tiny")
    cfg = get_config("tiny")
    params = model.init_params(cfg, 7, jnp.float32)
    hf_format.save_hf_checkpoint(path, cfg, params)
    write_tokenizer(path)
    return path, cfg, params


def test_quantize_cli_writes_a_checkpoint_that_loads_and_generates(tiny_checkpoint, tmp_path, capsys):
    src, cfg, params = tiny_checkpoint
    out = str(tmp_path / "q4")
    assert cli.main(["quantize", "--checkpoint", src, "--format", "q4_0", "-o", out]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith(f"wrote {out}: ") and "q4_0" in summary
    assert sorted(os.listdir(tmp_path)) == ["q4"]  # no temporary directory left behind
    assert {"config.json", "quantization.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(out))
    with open(os.path.join(out, "quantization.json")) as f:
        described = json.load(f)["tensors"]
    assert described["layer_0/mlp/linear"]["format"] == "q4_0"
    from safetensors.numpy import load_file

    stored = load_file(os.path.join(out, "model.safetensors"))  # the reference reader accepts our file
    assert stored["layer_0/mlp/linear.codes"].dtype == np.uint8

    loaded_model = api.load(out, dtype="float32", layout="checkpoint")
    loaded_cfg, loaded = loaded_model.config, loaded_model.params
    assert loaded_cfg == cfg.replace(name=loaded_cfg.name)
    in_memory = quant.quantize_params(params, cfg, JaxPolicy("q4_0"))
    tokens = jnp.asarray([[2, 17, 301, 5, 9]])
    forward = jax.jit(model.apply, static_argnames=("config",))
    a = np.asarray(forward(loaded, tokens, config=cfg)[0])
    b = np.asarray(forward(in_memory, tokens, config=cfg)[0])
    np.testing.assert_array_equal(a, b)  # same codes (the checkpoint's reader K/V are not stored: unused)
    # By default (CPU) the packed codes load cut into the decode layout: the same codes, the same numbers.
    fast = api.load(out, dtype="float32").params
    assert isinstance(fast["layer_0"]["mlp"]["linear"], matvec.DecodeWeight) and quant.has_quantized(fast)
    back = matvec.checkpoint_layout(fast)["layer_0"]["mlp"]["linear"]
    assert np.array_equal(np.asarray(back.codes), np.asarray(loaded["layer_0"]["mlp"]["linear"].codes))
    c = np.asarray(forward(fast, tokens, config=cfg)[0])
    np.testing.assert_allclose(c, a, rtol=0, atol=1e-5 * np.abs(a).max())

    assert cli.main(["generate", "--checkpoint", out, "--prompt", "hello world", "--max-new-tokens", "3",
                     "--temperature", "0"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"quantized checkpoint {out}" in printed and "generated 3 tokens" in printed


def test_quantize_cli_bad_input_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    src, _, _ = tiny_checkpoint
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--checkpoint", src, "--format", "q3_k", "-o", str(tmp_path / "a")])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main(["quantize", "--checkpoint", str(tmp_path / "missing"), "--format", "int8", "-o",
                     str(tmp_path / "b")]) == 2  # fmt: skip
    assert "gemma4-jax: error:" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert cli.main(["quantize", "--checkpoint", src, "--format", "int8", "-o", str(busy)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert os.listdir(busy) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["busy"]
    assert cli.main(["quantize", "--checkpoint", src, "--format", "int8", "--block", "7", "-o",
                     str(tmp_path / "c")]) == 2  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["busy"]


def _report(out: str) -> dict[str, str]:
    """eval-quant's `key   value` lines."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())


def test_eval_quant_reports_perplexity_kl_agreement(tiny_checkpoint, tmp_path, capsys):
    src, _, _ = tiny_checkpoint
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    assert cli.main(["eval-quant", "--checkpoint", src, "--format", "int8", "--text", str(text),
                     "--context", "32"]) == 0  # fmt: skip
    report = _report(capsys.readouterr().out)
    ppl_f, ppl_q = float(report["perplexity float"]), float(report["perplexity int8"])
    kl = float(report["KL(float || quantized) / token"].split()[0])
    agree = float(report["top-1 agreement"])
    assert 1 < ppl_f < 1e4 and abs(ppl_q / ppl_f - 1) < 0.05
    assert 0 < kl < 0.05 and 0.8 <= agree <= 1
    ids = tmp_path / "ids.txt"  # one 32-token window: the shapes compiled above
    ids.write_text(" ".join(str(i) for i in range(2, 34)))
    assert cli.main(["eval-quant", "--checkpoint", src, "--format", "int8", "--tokens", str(ids), "--context",
                     "32"]) == 0  # fmt: skip
    assert _report(capsys.readouterr().out)["tokens scored"] == "31 (windows of 32)"


def test_random_source_draws_what_init_params_draws():
    """`quantize --variant` streams random leaves one at a time, in any order; they are the leaves of
    `init_params`."""
    from gemma4_jax.sources import RandomSource

    cfg = get_config("tiny_moe")
    params = model.init_params(cfg, 3, jnp.bfloat16)
    source = RandomSource(cfg, 3, "bfloat16")
    for leaf in reversed(source.leaves()):
        value = source.read(leaf)
        assert value.shape == leaf.shape and value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, np.asarray(model.tree_get(params, leaf.path)))
