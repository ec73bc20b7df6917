"""Sampling: greedy / temperature / top-k / top-p against transformers' logits processors; generation loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gemma4_jax import config, model
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.sampler import Sampler, SamplingConfig, sample_token

LOGITS = np.log(np.array([0.05, 0.30, 0.02, 0.45, 0.10, 0.08], np.float32)) + 1.7


def _hf_probs(sampling: SamplingConfig) -> np.ndarray:
    scores = torch.tensor(LOGITS[None])
    if sampling.temperature != 1.0:
        scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(1.0),
        SamplingConfig(0.7),
        SamplingConfig(1.0, top_k=3),
        SamplingConfig(1.0, top_p=0.7),
        SamplingConfig(1.0, top_p=0.75),  # boundary: 0.45 + 0.30 = 0.75 exactly
        SamplingConfig(1.5, top_k=4, top_p=0.9),
    ],
    ids=str,
)
def test_sampling_distribution_matches_transformers(sampling):
    n = 40_000
    tokens = sample_token(jnp.tile(LOGITS, (n, 1)), jax.random.key(0), sampling)
    freq = np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / n
    expected = _hf_probs(sampling)
    np.testing.assert_array_equal(freq > 0, expected > 0)  # the same support, exactly
    np.testing.assert_allclose(freq, expected, atol=0.01)  # 4 sigma of the binomial at n=40k


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (5, 100))
    np.testing.assert_array_equal(
        sample_token(logits, jax.random.key(0), SamplingConfig(0.0)), np.argmax(np.asarray(logits), -1)
    )
    top1 = sample_token(logits, jax.random.key(2), SamplingConfig(1.0, top_k=1))
    np.testing.assert_array_equal(top1, np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top-k"), ({"top_p": 1.5}, "top-p")],
)
def test_invalid_sampling_settings(kwargs, message):
    with pytest.raises(Gemma4Error, match=message):
        SamplingConfig(**kwargs)


GREEDY = SamplingConfig(0.0)


@functools.cache
def _params():
    return model.init_params(config.TINY_E2B, 0, jnp.float32)


def _sampler(sampling=GREEDY, stop_tokens=()):
    return Sampler(config.TINY_E2B, _params(), sampling, stop_tokens=stop_tokens)


def test_seed_makes_sampling_reproducible():
    sampler = _sampler(SamplingConfig(1.0, top_k=64, top_p=0.95))
    first = sampler.generate([[2, 5, 9]], 16, seed=7).tokens
    assert sampler.generate([[2, 5, 9]], 16, seed=7).tokens == first
    assert sampler.generate([[2, 5, 9]], 16, seed=8).tokens != first


def test_stop_tokens_end_a_row():
    greedy = _sampler().generate([[2, 5, 9], [2, 7]], 8).tokens
    stop = greedy[0][3]
    sampler = _sampler(stop_tokens=(stop,))
    result = sampler.generate([[2, 5, 9], [2, 7]], 8)
    assert result.tokens[0] == greedy[0][: greedy[0].index(stop)]
    assert result.finish_reasons[0] == "stop"
    other = greedy[1][: greedy[1].index(stop)] if stop in greedy[1] else greedy[1]
    assert result.tokens[1] == other


def test_streaming_callback_sees_every_token():
    seen = []
    result = _sampler().generate([[2, 5], [2, 6, 7]], 5, on_token=lambda row, tok: seen.append((row, tok)))
    for row in (0, 1):
        assert [t for r, t in seen if r == row] == result.tokens[row]


@pytest.mark.parametrize(
    "prompts, new_tokens, message",
    [
        ([[]], 4, "prompt 0 is empty"),
        ([[2, 512]], 4, r"token id 512 is outside the vocabulary \[0, 512\)"),
        ([[2, -3]], 4, "token id -3"),
        ([[2] * 500], 20, "exceeds the 512-token context"),
        ([[2]], 0, "max-new-tokens"),
        ([], 4, "no prompts"),
    ],
)
def test_bad_generation_input(prompts, new_tokens, message):
    with pytest.raises(Gemma4Error, match=message):
        _sampler().generate(prompts, new_tokens)
