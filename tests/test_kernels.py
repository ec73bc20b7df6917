"""The compiled 4-bit CPU kernel (`gemma4_jax.kernels`, `_cpu_kernels.cc`): bit for bit its pure-JAX twin, within
the error its int8 activations allow against float64, and inside the model the same tokens as the twin. It must
be built wherever the tests run on x86-64 with AVX2 (under GEMMA4_STRICT=1 a missing kernel fails)."""

from __future__ import annotations

import dataclasses
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import config, kernels, matvec, model
from gemma4_jax.quant import JaxPolicy, quantize_params
from gemma4_jax.sampler import Sampler


@pytest.fixture(autouse=True)
def _kernel_built():
    if not kernels.q4_available():
        pytest.skip(f"the CPU kernel is not built or not runnable here ({platform.machine()}; pip install -e .)")


_kernel = jax.jit(kernels.q4_matvec)
_twin = jax.jit(kernels.q4_matvec_reference)


def _weights(rng, rows, k, scales_dtype, scale_exponent):
    codes = rng.integers(0, 256, (rows, k // 2), dtype=np.uint8)
    scales = (rng.standard_normal((rows, k // 32)) * 10.0**scale_exponent).astype(scales_dtype)
    return codes, scales


def _unpacked(codes, scales):
    """The dequantized weight [rows, K] in float64."""
    rows, nb = scales.shape
    packed = codes.reshape(rows, nb, 16)
    q = np.concatenate([packed & 15, packed >> 4], axis=2).astype(np.float64) - 8
    return (q * np.asarray(scales, np.float64)[..., None]).reshape(rows, -1)


# (rows, K): one, two and three blocks (XLA treats one-trip loops apart), uneven row counts for the threads'
# shares, and E2B's shapes (q/gate/up [*, 1536], down [1536, 6144]).
SHAPES = [(1, 32), (2, 32), (5, 64), (7, 96), (257, 160), (64, 1536), (6144, 1536), (1536, 6144)]


@pytest.mark.parametrize("scales_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_its_pure_jax_twin_bit_for_bit(shape, scales_dtype):
    """Random codes, block scales from 1e-3 to 10, rows of activations from 1e-3 to 1e2 with zeros, whole zero
    blocks; a NaN or an infinity in the row makes every output NaN in both."""
    rows, k = shape
    rng = np.random.default_rng(rows * 7919 + k)
    for trial in range(5):
        codes, scales = _weights(rng, rows, k, scales_dtype, trial % 5 - 3)
        x = (rng.standard_normal(k) * 10.0 ** (trial - 3)).astype(np.float32)
        x[rng.integers(0, k, 3)] = 0.0
        if trial == 2:
            x[:32] = 0.0
        if trial == 4:
            x[rng.integers(0, k)] = np.nan if scales_dtype == np.float16 else -np.inf
        got, want = np.asarray(_kernel(x, codes, scales)), np.asarray(_twin(x, codes, scales))
        assert got.shape == want.shape == (rows,)
        if trial == 4:
            assert np.isnan(got).all() and np.isnan(want).all()
        else:
            different = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
            assert different.size == 0, (shape, trial, different[:5], got[different[:5]], want[different[:5]])
            assert np.isfinite(got).all()


@pytest.mark.parametrize("shape", [(64, 1536), (1536, 6144)])
def test_kernel_error_is_the_int8_activation_rounding(shape):
    """Against float64 on the dequantized weight, each output is within the error of rounding the activations to
    int8 per block (|x - x'd| <= d/2 per element, d = amax/127, plus float32 steps): bounded by
    sum_j |w_j| d_b(j) (1/2 + 2^-14) + (blocks + 8) 2^-23 sum_j |w_j| (|x_j| + d_b(j)). The error is real (the
    activations are rounded) and about what llama.cpp's q4_0 x q8_0 dot makes: 0.1-2% of max |y|."""
    rows, k = shape
    rng = np.random.default_rng(3)
    codes, scales = _weights(rng, rows, k, np.float16, -2)
    w = _unpacked(codes, scales)
    for spread in (1.0, 1e-2, 1e2):
        x = (rng.standard_normal(k) * spread).astype(np.float32)
        x[: k // 4] *= 0.01  # blocks of very different magnitudes
        got = np.asarray(_kernel(x, codes, scales), np.float64)
        want = w @ x.astype(np.float64)
        d = np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1).astype(np.float64) / 127, 32)
        bound = np.abs(w) @ d * (0.5 + 2.0**-14) + (k // 32 + 8) * 2.0**-23 * (np.abs(w) @ (np.abs(x) + d))
        assert (np.abs(got - want) <= bound).all(), np.max(np.abs(got - want) / bound)
        relative = np.abs(got - want).max() / np.abs(want).max()
        assert 1e-4 < relative < 2e-2, relative


def _with_kernel(params, kernel):
    swap = lambda w: dataclasses.replace(w, kernel=kernel) if matvec.is_decode_weight(w) and w.kernel else w  # noqa: E731
    return jax.tree.map(swap, params, is_leaf=matvec.is_decode_weight)


@pytest.mark.parametrize("fmt", [pytest.param("int4", marks=pytest.mark.slow), "q4_0"])
def test_model_with_the_kernel_equals_its_twin(fmt):
    """Tiny model, 4-bit weights computing in float32, decode layout: the kernel is what the one-row contractions
    use; the logits of a one-token forward are bit for bit those with the pure-JAX twin, and 48 greedy tokens are
    identical. Against XLA's float32 activations (the kernel off) the logits move by the activations' int8
    rounding only: > 0 and < 5% of max |logit|."""
    cfg = config.get_config("tiny")
    packed = quantize_params(model.init_params(cfg, seed=4, dtype=jnp.float32), cfg, JaxPolicy(fmt))
    fast = matvec.decode_layout(packed, cfg)
    used = [w for w in jax.tree.leaves(fast, is_leaf=matvec.is_decode_weight) if matvec.is_decode_weight(w)]
    assert {w.kernel for w in used if w.format == fmt} == {"ffi"}
    twin, plain = _with_kernel(fast, "jax"), _with_kernel(fast, None)
    token = np.asarray([[17]])
    # Op by op (not jitted): inside one jitted model XLA fuses the twin's arithmetic with its neighbours (measured:
    # a few ulps apart), so only the eager forward states that the two compute the same function.
    a, b, c = (np.asarray(model.apply(p, token, config=cfg)[0]) for p in (fast, twin, plain))
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert 0 < np.abs(a - c).max() < 0.05 * np.abs(c).max()
    prompts = [[2, 5, 9, 33]]
    assert Sampler(cfg, fast).generate(prompts, 48).tokens == Sampler(cfg, twin).generate(prompts, 48).tokens
