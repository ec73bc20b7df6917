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
        logp_f, logp_q = np.asarray(logp_f[:-1], np.float64), np.asarray(logp_q[:-1], np.float64)
        target = np.asarray(window[1:])
        rows = np.arange(len(target))
        nll_f -= logp_f[rows, target].sum()
        nll_q -= logp_q[rows, target].sum()
        kl += (np.exp(logp_f) * (logp_f - logp_q)).sum()
        agree += (logp_f.argmax(-1) == logp_q.argmax(-1)).sum()
        scored += len(target)
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
