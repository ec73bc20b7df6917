"""Autoregressive generation: batched prefill into the KV cache, then one jitted step per token.

Prompts of different lengths share a batch: each row is right-padded (padding has position -1, so it is
neither attended to nor cached) and every row continues from its own length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gemma4_jax import multimodal
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import Params, apply, embedding_ids, init_cache
from gemma4_jax.multimodal import SoftTokens
from gemma4_jax.ple import HostPLE, split_table

# <eos>, <turn|>, <|tool_response> (spec §3.6)
DEFAULT_STOP_TOKENS = (1, 106, 50)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; otherwise temperature, then top-k, then top-p (HF's order)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise Gemma4Error(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise Gemma4Error(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise Gemma4Error(f"top-p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] -> token ids [B]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    k = min(sampling.top_k or logits.shape[-1], logits.shape[-1])
    values, ids = jax.lax.top_k(logits, k)  # sorted, highest first
    if sampling.top_p is not None and sampling.top_p < 1:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < sampling.top_p, values, -jnp.inf)  # the top token always survives
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    finish_reasons: list[str]  # "stop" or "length"
    compile_seconds: float = 0.0  # compiling prefill + step for this shape (0 when already compiled)
    prefill_seconds: float = 0.0  # prefill, up to the first sampled token
    decode_seconds: float = 0.0  # every step after the first token
    decode_steps: int = 0


def check_token_ids(config: Gemma4Config, tokens: Sequence[int], what: str = "prompt") -> None:
    """Token ids must index the vocabulary (the embedding lookup would silently clamp them otherwise)."""
    bad = [t for t in tokens if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise Gemma4Error(f"{what}: token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")


def _bucket(n: int, minimum: int = 16) -> int:
    """Rounds a length up to a power of two so that prompts of similar length share one compilation."""
    return max(minimum, 1 << (n - 1).bit_length())


# `ple_rows` [B, T, L, P]: PLE table rows gathered on the host (None: the table is in `params`).
def _prefill(config, sampling, params, tokens, positions, cache, last_index, key, ple_rows, soft):
    soft_tokens, soft_mask, blocks = soft if soft is not None else (None, None, None)
    logits, cache = apply(
        params,
        tokens,
        positions,
        cache,
        config=config,
        logits_index=last_index,
        per_layer_tokens=ple_rows,
        soft_tokens=soft_tokens,
        soft_mask=soft_mask,
        blocks=blocks,
    )
    return sample_token(logits[:, 0], key, sampling), jnp.isfinite(logits).all(), cache


def _step(config, sampling, params, token, position, cache, key, ple_rows):
    logits, cache = apply(params, token[:, None], position[:, None], cache, config=config, per_layer_tokens=ple_rows)
    return sample_token(logits[:, 0], key, sampling), jnp.isfinite(logits).all(), cache


def _jit(fn, out_shardings=None):
    return jax.jit(fn, static_argnums=(0, 1), donate_argnums=(5,), out_shardings=out_shardings)


_jitted = {"prefill": _jit(_prefill), "step": _jit(_step)}  # one-device programs, shared by all samplers


@functools.lru_cache(maxsize=16)
def _sharded_jits(mesh: jax.sharding.Mesh, cache_specs):
    """Prefill and step on `mesh`: the cache stays on its shards (`cache_specs`, a hashable tree), the sampled
    tokens and the finiteness flag come back replicated (every process reads them)."""
    from gemma4_jax import sharding

    replicated = jax.sharding.NamedSharding(mesh, PartitionSpec())
    cache = sharding.shardings(mesh, jax.tree_util.tree_unflatten(*cache_specs))
    out = (replicated, replicated, cache)
    return {"prefill": _jit(_prefill, out), "step": _jit(_step, out)}


def _check_finite(finite) -> None:
    """Non-finite logits (damaged weights, an overflow) would sample token 0 forever: stop instead."""
    if not bool(finite):
        raise Gemma4Error("the model produced non-finite logits (NaN or Inf); are the weights damaged?")


class Sampler:
    """Generates from a model. Compilations are shared by all samplers with the same config and sampling.

    `ple_table` keeps the PLE table off the device (`gemma4_jax.ple.HostPLE`): the prompt's and each new
    token's rows are gathered on the host and only they go to the device. A `HostPLE` found in `params` in
    place of the table (`ple.place_table`) is used the same way.
    """

    def __init__(
        self,
        config: Gemma4Config,
        params: Params,
        sampling: SamplingConfig = SamplingConfig(),
        stop_tokens: Sequence[int] = DEFAULT_STOP_TOKENS,
        cache_dtype=None,
        ple_table: HostPLE | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        without_table, table = split_table(params)
        if ple_table is None and isinstance(table, HostPLE):
            ple_table = table
        if ple_table is not None:
            params = without_table  # a device copy of the table, if any, would go unused
        elif config.per_layer_input_dim and table is None:
            raise Gemma4Error("the PLE table is neither in the parameters nor given as ple_table")
        self.ple_table = ple_table
        self.config = config
        self.params = params
        self.sampling = sampling
        self.stop_tokens = tuple(stop_tokens)
        self.mesh = mesh  # params sharded on it (`api.load(mesh=...)`): the batch and the cache are split too
        # The embedding's dtype is the compute dtype, also when it is a weight object (packed codes inside).
        self.cache_dtype = cache_dtype or params["embedder"]["input_embedding"].dtype

    def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        context = self.config.max_context
        if not prompts:
            raise Gemma4Error("no prompts given")
        if max_new_tokens < 1:
            raise Gemma4Error(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise Gemma4Error(f"prompt {row} is empty")
            check_token_ids(self.config, prompt, f"prompt {row}")
            if len(prompt) + max_new_tokens > context:
                raise Gemma4Error(
                    f"prompt {row} has {len(prompt)} tokens; with {max_new_tokens} new tokens that exceeds the "
                    f"{context}-token context of {self.config.name}"
                )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        seed: int = 0,
        on_token: Callable[[int, int], None] | None = None,
        soft: Sequence[SoftTokens | None] | None = None,
    ) -> Generation:
        """Continues each prompt (token ids, BOS included) by up to `max_new_tokens` tokens.

        `on_token(row, token)` is called for every generated token as soon as it is known (streaming). `soft`
        holds each prompt's image and audio embeddings (`multimodal.embed`), for prompts expanded by
        `multimodal.expand`; the prompt is prefilled in one call, so an image's bidirectional block is whole.
        """
        self.validate(prompts, max_new_tokens)
        batch = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        width = _bucket(int(lengths.max()))
        cache_length = min(self.config.max_context, _bucket(int(lengths.max()) + max_new_tokens, 128))
        tokens = np.zeros((batch, width), np.int32)
        positions = np.full((batch, width), -1, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
            positions[row, : len(prompt)] = np.arange(len(prompt))

        key = jax.random.key(seed)
        cache = init_cache(self.config, batch, cache_length, self.cache_dtype)
        last_index = jnp.asarray(lengths - 1)
        compile_start = time.perf_counter()  # ahead-of-time compilation; a cache hit once the shapes were seen
        static = (self.config, self.sampling, self.params)
        soft_arrays = None
        ple_ids = tokens
        if soft is not None and any(row is not None for row in soft):
            soft_arrays = multimodal.batch(soft, width, self.cache_dtype)
            ple_ids = np.where(np.asarray(soft_arrays[1]), self.config.pad_id, tokens)  # soft slots read the pad row
        prompt_rows = self._ple_rows(ple_ids)
        step_rows = self._ple_rows(np.zeros((batch, 1), np.int32))
        jitted = _jitted
        if self.mesh is not None:
            cache, tokens, positions, last_index, prompt_rows, soft_arrays = self._shard(
                cache, tokens, positions, last_index, prompt_rows, soft_arrays
            )
            jitted = _sharded_jits(self.mesh, self._cache_specs(cache))
        with self._mesh_context():
            prefill = (
                jitted["prefill"]
                .lower(*static, tokens, positions, cache, last_index, key, prompt_rows, soft_arrays)
                .compile()
            )
            # The step takes the sampled token as the prefill returns it (replicated on a mesh).
            token_like = (
                last_index
                if self.mesh is None
                else jax.ShapeDtypeStruct(
                    last_index.shape, last_index.dtype, sharding=jax.sharding.NamedSharding(self.mesh, PartitionSpec())
                )
            )
            step_fn = jitted["step"].lower(*static, token_like, last_index, cache, key, step_rows).compile()
        prefill_start = time.perf_counter()
        token, finite, cache = prefill(
            self.params, tokens, positions, cache, last_index, jax.random.fold_in(key, 0), prompt_rows, soft_arrays
        )
        _check_finite(finite)
        decode_start = time.perf_counter()
        out: list[list[int]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        done = np.zeros(batch, bool)
        position = lengths.copy()
        steps = 0
        for step in range(max_new_tokens):
            ids = np.asarray(token)
            if step:
                _check_finite(finite)
            for row in np.flatnonzero(~done):
                if int(ids[row]) in self.stop_tokens:
                    done[row], reasons[row] = True, "stop"
                    continue
                out[row].append(int(ids[row]))
                if on_token is not None:
                    on_token(int(row), int(ids[row]))
            if done.all() or step == max_new_tokens - 1:
                break
            rows = self._ple_rows(ids[:, None])  # the token is on the host already (streaming)
            token, finite, cache = step_fn(
                self.params,
                token,
                jnp.asarray(position) if self.mesh is None else self._shard(position)[0],
                cache,
                jax.random.fold_in(key, step + 1),
                rows if self.mesh is None or rows is None else self._shard(rows)[0],
            )
            # A new array, never `+=`: on CPU the step's input may alias this host buffer (zero-copy) while the
            # step still runs asynchronously, and it would read the next position (seen under load on a mesh).
            position = position + 1
            steps += 1
        end = time.perf_counter()
        return Generation(
            out, reasons, prefill_start - compile_start, decode_start - prefill_start, end - decode_start, steps
        )

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _shard(self, *trees):
        """The cache (a dict) on `sharding.cache_specs`, other arrays split on their first (batch) axis."""
        from gemma4_jax import sharding

        out = []
        for tree in trees:
            if isinstance(tree, dict):
                specs = sharding.cache_specs(tree, self.mesh)
            else:
                specs = jax.tree.map(lambda x: sharding.batch_spec(np.shape(x), self.mesh), tree)
            out.append(sharding.place(tree, self.mesh, specs))
        return out

    def _cache_specs(self, cache):
        from gemma4_jax import sharding

        leaves, treedef = jax.tree_util.tree_flatten(sharding.cache_specs(cache, self.mesh))
        return treedef, tuple(leaves)

    def _ple_rows(self, tokens: np.ndarray) -> np.ndarray | None:
        return None if self.ple_table is None else self.ple_table.rows(embedding_ids(self.config, tokens))
