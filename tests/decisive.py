"""Tiny test models made decisive, as real models are: trained until their greedy continuation of a prompt is a
given target with a wide top-1/top-2 logit margin on every step.

A random model's next tokens are near-ties, smaller than the activation rounding of quantized runtimes
(llama.cpp's Q8_0 blocks, LiteRT's dynamic-range int8 inputs); a trained model's are not. With these models the
exporters' tests can require greedy continuations identical at every quantization, and assert that the margins
(not luck) make that meaningful.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import model

MARGIN = 6.0  # logits; the runtimes' rounding moves the tiny models' logits by <= ~0.4
# MoE: the k-th chosen expert's router logit must beat the best unchosen one by this much on every token and layer.
# A near-tie there flips under a runtime's activation rounding and moves that token's logits by O(1) (measured:
# a 5e-5 probability gap flipped by llama.cpp's Q8_0 activations at q4_0 gave 0.51 at one position, <= 0.05 at all
# others), which compares the expert choice, not the weights.
ROUTER_MARGIN = 1.0
LEARNING_RATE = 3e-3
MAX_STEPS = 300


def top_margins(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [...]: top-1 minus top-2 logit."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def conditioned_init(cfg, seed: int):
    """The seed's random f32 init, conditioned like a trained model's (see the comments)."""
    params = model.init_params(cfg, seed, jnp.float32)
    # Attention has scale 1.0 on RMS-normed q and k: with the random init's unit norm scales it is saturated
    # and chaotic, and amplifies any rounding ~100x into the logits. Scales of 0.3 keep it in a trained
    # model's regime, so the comparisons measure the weights, not the chaos.
    for i in range(cfg.num_layers):
        attn = params[f"layer_{i}"]["attn"]
        for norm in ("query_norm", "key_norm"):
            attn[norm]["scale"] = attn[norm]["scale"] * 0.3
    if cfg.num_experts:
        # Random routers give near-tied top-k choices that flip under a runtime's activation rounding; a
        # sharper router keeps the expert choice stable, so logits compare continuously.
        for i in range(cfg.num_layers):
            router = params[f"layer_{i}"]["mlp"]["router_logits"]
            router["w"] = router["w"] * 32.0
    return params


def train_decisive(cfg, params, prompt: list[int], target: list[int], margin: float = MARGIN):
    """`params` trained (all parameters, Adam, next-token cross-entropy on `target` after `prompt`) until the
    greedy continuation of `prompt` is `target` with a top-1/top-2 margin >= `margin` on every step."""
    import optax

    tokens = np.asarray([prompt + target])
    inputs, targets = tokens[:, :-1], tokens[0, len(prompt) :]  # [1, T-1], [len(target)]
    first = len(prompt) - 1  # the position whose logits choose target[0]
    optimizer = optax.adam(LEARNING_RATE)

    def loss_and_logits(params):
        # train.loop.token_losses gives the same loss but not the logits, which decide when to stop.
        logits, gaps = forward_with_router_gaps(cfg, params, inputs)
        logits = logits[0, first:]  # [len(target), V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        loss = -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=-1))
        loss = loss + jnp.mean(jax.nn.relu(ROUTER_MARGIN - gaps))  # 0 for dense models (no gaps)
        return loss, (logits, gaps)

    def step(params, opt_state):
        (_, (logits, gaps)), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, logits, gaps

    start = time.perf_counter()
    opt_state = optimizer.init(params)
    # With XLA's CPU backend optimizations this gradient compiles ~3x slower (measured for `tiny`: 22 s vs 7 s)
    # and runs no faster at this size; compiling dominates the ~20-50 steps.
    step = jax.jit(step).lower(params, opt_state).compile(compiler_options={"xla_backend_optimization_level": 0})
    for steps in range(MAX_STEPS):
        trained, opt_state, logits, gaps = step(params, opt_state)
        logits, gaps = np.asarray(logits), np.asarray(gaps)
        routed = gaps.size == 0 or gaps.min() >= ROUTER_MARGIN
        if (logits.argmax(-1) == targets).all() and top_margins(logits).min() >= margin and routed:
            print(f"{cfg.name}: decisive after {steps} training steps, {time.perf_counter() - start:.1f} s")
            return params  # the params these logits were computed with
        params = trained
    raise AssertionError(f"{cfg.name}: not decisive after {MAX_STEPS} steps: margins {top_margins(logits)}")


def forward_with_router_gaps(cfg, params, tokens):
    """(logits, gaps): the forward pass, and per MoE layer and token the router-logit gap between the k-th chosen
    expert and the best unchosen one ([L, T]; empty for dense models)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, state = model.Gemma4Transformer(cfg).apply(
        {"params": params},
        tokens,
        positions,
        capture_intermediates=lambda module, _: module.name == "router_logits",
        mutable=["intermediates"],
    )
    if not cfg.num_experts:
        return logits[0], jnp.zeros((0,))
    k = cfg.num_experts_per_token
    gaps = []
    for i in range(cfg.num_layers):
        router = state["intermediates"][f"layer_{i}"]["mlp"]["router_logits"]["__call__"][0][0]  # [T, E]
        top = jax.lax.top_k(router, k + 1)[0]
        gaps.append(top[:, k - 1] - top[:, k])
    return logits[0], jnp.stack(gaps)


def train_decisive_media(cfg, params, examples, margin: float = MARGIN):
    """`params` with the text decoder trained (the encoders frozen) until, for every example (ids, target, soft)
    — a prompt's expanded ids, the continuation it must produce, and its `multimodal.SoftTokens` — the greedy
    continuation is `target` with a top-1/top-2 margin >= `margin` on every step. Examples that differ only in
    their image or clip make the continuation depend on the medium, so a runtime that got the medium wrong
    cannot produce it."""
    import optax

    towers = {k: params[k] for k in ("vision_encoder", "audio_encoder") if k in params}
    decoder = {k: v for k, v in params.items() if k not in towers}
    batches = []
    for ids, target, soft in examples:
        tokens = np.asarray([list(ids) + list(target)])[:, :-1]
        pad = tokens.shape[1] - len(ids)
        extra = {
            "soft_tokens": np.pad(soft.embeddings, ((0, pad), (0, 0)))[None].astype(np.float32),
            "soft_mask": np.pad(soft.mask, (0, pad))[None],
            "blocks": np.pad(soft.blocks, (0, pad), constant_values=-1)[None],
        }
        batches.append((tokens, np.asarray(target), len(ids) - 1, extra))
    optimizer = optax.adam(LEARNING_RATE)

    def losses_and_logits(decoder):
        total, all_logits = 0.0, []
        for tokens, target, first, extra in batches:
            logits = model.apply(decoder, tokens, config=cfg, **extra)[0][0, first:]
            logp = jax.nn.log_softmax(logits, axis=-1)
            total = total - jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=-1))
            all_logits.append(logits)
        return total, all_logits

    def step(decoder, opt_state):
        (_, logits), grads = jax.value_and_grad(losses_and_logits, has_aux=True)(decoder)
        updates, opt_state = optimizer.update(grads, opt_state, decoder)
        return optax.apply_updates(decoder, updates), opt_state, logits

    start = time.perf_counter()
    opt_state = optimizer.init(decoder)
    step = jax.jit(step).lower(decoder, opt_state).compile(compiler_options={"xla_backend_optimization_level": 0})
    for steps in range(MAX_STEPS):
        trained, opt_state, logits = step(decoder, opt_state)
        done = all(
            (np.asarray(lg).argmax(-1) == target).all() and top_margins(np.asarray(lg)).min() >= margin
            for lg, (_, target, _, _) in zip(logits, batches, strict=True)
        )
        if done:
            print(f"{cfg.name}: decisive on {len(batches)} media prompts after {steps} steps, "
                  f"{time.perf_counter() - start:.1f} s")  # fmt: skip
            return decoder | towers
        decoder = trained
    raise AssertionError(f"{cfg.name}: not decisive on the media prompts after {MAX_STEPS} steps")
