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

from gemma4_jax import checkpoint, config, model
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
    return checkpoint.load_hf_checkpoint(path, dtype=jnp.dtype(precision))[1]


def _decode_in_chunks(cfg, params, tokens, chunks, cache_length=32):
    """Feeds `tokens` through the cache in consecutive chunks of the given sizes; returns all logits."""
    batch = tokens.shape[0]
    cache = model.init_cache(cfg, batch, cache_length, jax.tree_util.tree_leaves(params)[0].dtype)
    step = jax.jit(lambda p, t, pos, c: model.apply(p, t, pos, c, config=cfg))
    out, start = [], 0
    for size in chunks:
        positions = np.broadcast_to(np.arange(start, start + size), (batch, size))
        logits, cache = step(params, tokens[:, start : start + size], positions, cache)
        out.append(np.asarray(logits))
        start += size
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_full_forward_matches_hf(reference, precision):
    cfg, hf, path = reference
    tokens = _tokens(cfg)
    expected = _hf_logits(hf, tokens, precision)
    with jax.enable_x64(precision == "float64"):
        params = _load(path, precision)
        logits, cache = jax.jit(lambda p, t: model.apply(p, t, config=cfg))(params, tokens)
    assert cache is None
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    error = np.abs(np.asarray(logits) - expected).max()
    assert error <= TOLERANCE[precision], f"{cfg.name} {precision}: max-abs logits error {error:.3g}"


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize(
    "chunks",
    [
        [10] + [1] * 14,  # prefill, then token-by-token decode (ring buffer wraps many times)
        [3, 6, 1, 7, 1, 6],  # multi-token chunks longer than the window, landing across the ring's wrap
    ],
    ids=["prefill+decode", "chunked"],
)
def test_cached_decode_matches_full_forward(reference, precision, chunks):
    cfg, hf, path = reference
    tokens = _tokens(cfg, seed=1)
    expected = _hf_logits(hf, tokens, precision)
    with jax.enable_x64(precision == "float64"):
        params = _load(path, precision)
        full, _ = jax.jit(lambda p, t: model.apply(p, t, config=cfg))(params, tokens)
        cached = _decode_in_chunks(cfg, params, tokens, chunks)
    assert np.abs(cached - expected).max() <= TOLERANCE[precision]
    assert np.abs(cached - np.asarray(full)).max() <= TOLERANCE[precision]


def test_local_cache_is_a_ring_of_window_slots(reference):
    cfg, _, path = reference
    cache = model.init_cache(cfg, batch=1, cache_length=32)
    local = [i for i, t in enumerate(cfg.layer_types) if t == config.LOCAL and not cfg.is_kv_reader(i)]
    assert cache[f"layer_{local[0]}"]["k"].shape[1] == cfg.sliding_window
    assert cache["positions"]["global"].shape[1] == 32
    readers = [i for i in range(cfg.num_layers) if cfg.is_kv_reader(i)]
    assert all(f"layer_{i}" not in cache for i in readers)


def _hf_greedy(hf, prompt, new_tokens):
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.float().generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_matches_hf(reference):
    cfg, hf, path = reference
    prompt = [cfg.bos_id, *_tokens(cfg, 1, 7, seed=2)[0].tolist()]
    expected = _hf_greedy(hf, prompt, 32)
    assert len(expected) == 32
    sampler = Sampler(cfg, _load(path, "float32"), stop_tokens=())
    assert sampler.generate([prompt], max_new_tokens=32).tokens[0] == expected


def test_batch_of_prompts_with_different_lengths(reference):
    cfg, hf, path = reference
    rng = np.random.default_rng(3)
    prompts = [[cfg.bos_id, *rng.integers(3, cfg.vocab_size, n).tolist()] for n in (2, 9, 14)]
    sampler = Sampler(cfg, _load(path, "float32"), stop_tokens=())
    batched = sampler.generate(prompts, max_new_tokens=12).tokens
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == _hf_greedy(hf, prompt, 12)
