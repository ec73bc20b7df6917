"""Parity with Hugging Face transformers' Gemma4ForCausalLM (CPU torch) on identical random weights.

Three configs cover every text feature: (a) `tiny`: PLE + KV sharing + double-wide MLP + a sliding window (4)
shorter than every sequence; (b) `tiny_keqv`: K=V global layers with their own KV-head count; (c) `tiny_moe`:
MoE + shared dense MLP (+ K=V).

Tolerances (max-abs over all logits, logits are O(5)): float64 1e-9 — two correct implementations agree to
~1e-14 there, so anything larger is a real mistake; float32 5e-4 — float32 rounding alone moves either side
by ~1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import full_float64, hf_model

from gemma4_jax import config, hf_format, model
from gemma4_jax.sampler import Sampler

CONFIGS = ["tiny", "tiny_keqv", "tiny_moe"]
TOLERANCE = {"float64": 1e-9, "float32": 5e-4}
SEQ = 24


@pytest.fixture(scope="module", params=CONFIGS)
def reference(request, tmp_path_factory):
    cfg = config.get_config(request.param)
    hf = hf_model(cfg, seed=CONFIGS.index(request.param))
    path = str(tmp_path_factory.mktemp(cfg.name))
    hf.save_pretrained(path)
    return cfg, hf, path


def _tokens(cfg, batch=2, length=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


def _hf_logits(hf, tokens, precision):
    with torch.no_grad():
        if precision == "float64":
            with full_float64():
                return hf.double()(torch.tensor(tokens)).logits.numpy()
        return hf.float()(torch.tensor(tokens)).logits.numpy()


def _load(path, precision):
    return hf_format.load_hf_checkpoint(path, dtype=jnp.dtype(precision))[1]


# One compiled forward shared by all tests (config is static; shapes are kept few on purpose).
forward = jax.jit(model.apply, static_argnames=("config", "remat"))


def _decode_in_chunks(cfg, params, tokens, chunks, width=None, cache_length=32):
    """Feeds `tokens` through the cache in consecutive chunks; with `width`, each chunk is right-padded to it
    with position -1 (one compilation serves every chunk). Returns the logits of the real tokens."""
    batch = tokens.shape[0]
    cache = model.init_cache(cfg, batch, cache_length, jax.tree_util.tree_leaves(params)[0].dtype)
    out, start = [], 0
    for size in chunks:
        chunk = np.zeros((batch, width or size), np.int64)
        chunk[:, :size] = tokens[:, start : start + size]
        positions = np.full((batch, width or size), -1)
        positions[:, :size] = np.arange(start, start + size)
        logits, cache = forward(params, chunk, positions, cache, config=cfg)
        out.append(np.asarray(logits)[:, :size])
        start += size
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_full_forward_matches_hf(reference, precision):
    cfg, hf, path = reference
    tokens = _tokens(cfg)
    expected = _hf_logits(hf, tokens, precision)
    with jax.enable_x64(precision == "float64"):
        params = _load(path, precision)
        logits, cache = forward(params, tokens, config=cfg)
    assert cache is None
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    error = np.abs(np.asarray(logits) - expected).max()
    assert error <= TOLERANCE[precision], f"{cfg.name} {precision}: max-abs logits error {error:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize(
    "chunks, width",
    [
        ([10] + [1] * 14, None),  # prefill, then token-by-token decode (the ring buffer wraps many times)
        ([3, 6, 1, 7, 1, 6], 8),  # padded chunks longer than the window, landing across the ring's wrap
    ],
    ids=["prefill+decode", "chunked"],
)
def test_cached_decode_matches_full_forward(reference, precision, chunks, width):
    cfg, hf, path = reference
    tokens = _tokens(cfg, seed=1)
    expected = _hf_logits(hf, tokens, precision)
    with jax.enable_x64(precision == "float64"):
        params = _load(path, precision)
        full, _ = forward(params, tokens, config=cfg)
        cached = _decode_in_chunks(cfg, params, tokens, chunks, width)
    assert np.abs(cached - expected).max() <= TOLERANCE[precision]
    assert np.abs(cached - np.asarray(full)).max() <= TOLERANCE[precision]


@pytest.mark.slow
def test_local_cache_is_a_ring_of_window_slots(reference):
    cfg = reference[0]
    cache = model.init_cache(cfg, batch=1, cache_length=32)
    local = [i for i, t in enumerate(cfg.layer_types) if t == config.LOCAL and not cfg.is_kv_reader(i)]
    assert cache[f"layer_{local[0]}"]["k"].shape[1] == cfg.sliding_window
    assert cache["positions"]["global"].shape[1] == 32
    readers = [i for i in range(cfg.num_layers) if cfg.is_kv_reader(i)]
    assert all(f"layer_{i}" not in cache for i in readers)


def _hf_greedy(hf, prompt, new_tokens):
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.float().generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_greedy_generation_matches_hf(reference):
    """32 greedy tokens, for a batch of three prompts of different lengths, equal HF `generate` per prompt."""
    cfg, hf, path = reference
    rng = np.random.default_rng(3)
    prompts = [[cfg.bos_id, *rng.integers(3, cfg.vocab_size, n).tolist()] for n in (7, 2, 13)]
    sampler = Sampler(cfg, _load(path, "float32"), stop_tokens=())
    generated = sampler.generate(prompts, max_new_tokens=32).tokens
    for prompt, got in zip(prompts, generated, strict=True):
        expected = _hf_greedy(hf, prompt, 32)
        assert len(expected) == 32
        assert got == expected
