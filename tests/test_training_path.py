"""The no-cache (training) path: KV sharing must not depend on a cache; gradients flow through reader layers.

Checked in float64 against central finite differences (error O(eps²) ~ 1e-10 relative), with and without
rematerialisation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import config, model

CFG = config.TINY_E2B  # layers 5..8 read K/V: locals from layer 4, globals from layer 2


def _params():
    params = model.init_params(CFG, 0, jnp.float64)
    # scales away from 1, so their gradients are generic too
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda x: x if x.ndim > 1 else x * (0.5 + rng.random(x.shape)), params)


def _loss(params, tokens, remat=False):
    logits, _ = model.apply(params, tokens[:, :-1], config=CFG, remat=remat)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@functools.cache
def _setup():
    with jax.enable_x64(True):
        params = _params()
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 14)))
        loss, grads = jax.jit(jax.value_and_grad(_loss))(params, tokens)
    return params, tokens, loss, grads


@jax.jit
def _loss_along(params, tokens, direction, t):
    """The loss at params + t * direction (one program for both steps)."""
    return _loss(jax.tree_util.tree_map(lambda p, d: p + t * d, params, direction), tokens)


def _directional_fd(params, tokens, direction, eps=1e-4):
    return (_loss_along(params, tokens, direction, eps) - _loss_along(params, tokens, direction, -eps)) / (2 * eps)


def _random_direction(params, only=None, seed=0):
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, leaf in leaves:
        keys = "/".join(k.key for k in path)
        chosen = only is None or keys.startswith(only)
        out.append(rng.standard_normal(leaf.shape) if chosen else np.zeros(leaf.shape))
    norm = np.sqrt(sum(float(np.sum(d * d)) for d in out))
    return jax.tree_util.tree_unflatten(tree, [d / norm for d in out])  # unit length: eps is the step size


@pytest.mark.slow
@pytest.mark.parametrize(
    "only",
    [
        None,  # every parameter at once
        "layer_2/attn/kv_einsum",  # the global source: its K/V feed layers 2, 5 and 8
        "layer_4/attn/key_norm",  # the local source's key norm: feeds layers 4, 6 and 7
        "layer_7/attn/q_einsum",  # a reader's own query projection
        "embedder/per_layer_embeddings",
    ],
)
def test_gradient_matches_finite_differences(only):
    with jax.enable_x64(True):
        params, tokens, _, grads = _setup()
        direction = _random_direction(params, only)
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        analytic = float(sum(np.vdot(np.asarray(g), d) for g, d in pairs))
        numeric = float(_directional_fd(params, tokens, direction))
    assert abs(analytic) > 1e-4, "the direction must actually move the loss"
    # central differences with a unit step of 1e-4: truncation ~1e-8, rounding ~1e-12
    assert abs(analytic - numeric) <= 1e-6 * abs(analytic), (analytic, numeric)


@pytest.mark.slow
def test_unused_reader_kv_weights_get_no_gradient():
    with jax.enable_x64(True):
        _, _, _, grads = _setup()
    for i in range(CFG.first_kv_shared_layer, CFG.num_layers):
        assert not np.any(np.asarray(grads[f"layer_{i}"]["attn"]["kv_einsum"]["w"]))
    for i in CFG.kv_source_layers:
        assert np.any(np.asarray(grads[f"layer_{i}"]["attn"]["kv_einsum"]["w"]))


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    with jax.enable_x64(True):
        params, tokens, loss, grads = _setup()
        loss_r, grads_r = jax.jit(jax.value_and_grad(functools.partial(_loss, remat=True)))(params, tokens)
        np.testing.assert_allclose(loss_r, loss, rtol=1e-13)
        for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
