"""`eval_quant`: what quantization costs a model — perplexity, KL divergence and top-1 agreement against the float
model on the same text, and the bytes saved."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.quant.policy import JaxPolicy
from gemma4_jax.quant.weight import has_quantized, quantize_params, weight_bytes


@dataclasses.dataclass(frozen=True)
class QuantReport:
    tokens_scored: int
    context: int
    perplexity_float: float
    perplexity_quantized: float
    kl_per_token: float  # KL(float || quantized), nats
    top1_agreement: float
    bytes_float: int
    bytes_quantized: int
    quantize_seconds: float


def score_window(logp_float, logp_other, targets) -> tuple[float, float, float, int]:
    """Sums over one window of next-token predictions: (NLL of the float model, NLL of the other one,
    KL(float || other), top-1 agreements). `logp_*`: log-softmax [T, V] at the positions that predict `targets` [T]
    (the other model's V may be smaller: a runtime's vocabulary trimmed to its tokenizer's)."""
    logp_f, logp_q = np.asarray(logp_float, np.float64), np.asarray(logp_other, np.float64)
    target = np.asarray(targets)
    rows = np.arange(len(target))
    kl = (np.exp(logp_f) * (logp_f - _padded(logp_q, logp_f.shape[-1]))).sum()
    return (
        float(-logp_f[rows, target].sum()),
        float(-logp_q[rows, target].sum()),
        float(kl),
        int((logp_f.argmax(-1) == logp_q.argmax(-1)).sum()),
    )


def _padded(logp: np.ndarray, vocab: int) -> np.ndarray:
    """log-probabilities over `vocab` entries, the missing ones -inf (probability 0)."""
    if logp.shape[-1] == vocab:
        return logp
    return np.concatenate([logp, np.full((*logp.shape[:-1], vocab - logp.shape[-1]), -np.inf)], axis=-1)


@functools.cache
def _jitted_forward():
    """One jitted forward per process: repeated evaluations of the same shapes compile once."""
    from gemma4_jax import model

    return jax.jit(model.apply, static_argnames=("config",))


def eval_quant(model, policy: JaxPolicy, tokens: list[int], context: int = 512, log=print) -> QuantReport:
    """Scores `tokens` in windows of `context` (overlapping by one, so every token is scored once) with the float
    `model` (an `api.Model`) and with its quantization under `policy`."""
    from gemma4_jax.sampler import check_token_ids

    cfg = model.config
    if context < 2:
        raise Gemma4Error(f"--context must be at least 2, got {context}")
    if len(tokens) < 2:
        raise Gemma4Error(f"{len(tokens)} tokens; at least 2 are needed to score a next token")
    if has_quantized(model.params):
        raise Gemma4Error(f"{model.source} is quantized; eval-quant needs the float model")
    check_token_ids(cfg, tokens, "the text")
    start = time.perf_counter()
    qparams = quantize_params(model.params, cfg, policy)
    quantize_seconds = time.perf_counter() - start
    forward = _jitted_forward()
    nll_f = nll_q = kl = agree = 0.0
    scored = 0
    context = min(context, cfg.max_context)
    for begin in range(0, len(tokens) - 1, context - 1):
        window = tokens[begin : begin + context]
        if len(window) < 2:
            break
        ids = np.asarray([window])
        logp_f = jax.nn.log_softmax(forward(model.params, ids, config=cfg)[0][0].astype(np.float32), axis=-1)
        logp_q = jax.nn.log_softmax(forward(qparams, ids, config=cfg)[0][0].astype(np.float32), axis=-1)
        sums = score_window(logp_f[:-1], logp_q[:-1], window[1:])
        nll_f, nll_q, kl, agree = nll_f + sums[0], nll_q + sums[1], kl + sums[2], agree + sums[3]
        scored += len(window) - 1
        log(f"scored {scored}/{len(tokens) - 1} tokens")
    if not np.isfinite([nll_f, nll_q, kl]).all():
        raise Gemma4Error("the forward pass produced non-finite values (are the weights damaged?)")
    return QuantReport(
        scored,
        context,
        float(np.exp(nll_f / scored)),
        float(np.exp(nll_q / scored)),
        float(kl / scored),
        float(agree / scored),
        weight_bytes(model.params),
        weight_bytes(qparams),
        quantize_seconds,
    )
