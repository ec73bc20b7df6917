"""The text decoder's weight contractions at memory bandwidth on XLA:CPU.

XLA:CPU has no bf16 matrix-vector kernel: a contraction of a bf16 weight with a few activation rows first converts
the whole weight to float32, and in a decode step it schedules every layer's conversion up front (a temporary the
size of the model; 0.15 tok/s for E2B). It does fuse the conversion into the loop of a dot whose output is 1-D and
whose vector operand holds at most 2048 float32 values, `dot(x_chunk, W_chunk.T)` with W_chunk a contiguous
[out, chunk] slab (measured in shared/research/xla-cpu-matvec: ~36 GB/s for bf16, level with torch). So on CPU the
matrices are stored once, at load, chunk by chunk: `DecodeWeight.data` n arrays [out, chunk], the stored layout of
`param_spec.Leaf.perm` (contracted axes last, flattened) cut into n column chunks, each a buffer of its own (a
dot on a slice of one stacked array makes XLA copy the slice for the library call); and
- one activation row (batch-1 decode): n 1-D dots, summed; each partial passes `reduce_precision` (a no-op on
  float32) so that XLA does not fuse the dot into the sum, which would undo the fusion above; the row itself is
  written to a float32 buffer of its own first (`_own_buffer`), or XLA fuses its producer (the attention output's
  reshape, a convert) into the loop and recomputes it per weight element (6x slower);
- several rows (batched decode, prefill): per chunk one dot of the stored dtype with a float32 result, which
  XLA:CPU runs natively (YNNPACK) on the chunk as stored.
`decode_layout` converts a parameter tree; GPU/TPU keep the checkpoint layout and their native dots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import param_spec
from gemma4_jax.config import Gemma4Config

MAX_CHUNK = 2048  # float32 values of the vector operand XLA:CPU still fuses into the matvec loop
_LAYOUT_CLASSES = (param_spec.MATRIX, param_spec.PLE_PROJECTION, param_spec.PLE_GATE)
_SPARE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # for "..." in an equation (the model's equations are lower case)


def chunks_of(n_in: int) -> int:
    """The number of equal column chunks of at most MAX_CHUNK a contracted length is cut into."""
    n = -(-n_in // MAX_CHUNK)
    while n_in % n:
        n += 1
    return n


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["shape", "perm", "ncontract"])
@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A dense weight of logical (official-layout) `shape` stored in column chunks for XLA:CPU (see the module doc):
    `data` = n arrays [out, chunk], the stored layout (axes `perm`, the last `ncontract` contracted) as [out, in]
    cut into n chunks of columns."""

    data: Any
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    ncontract: int

    @property
    def dtype(self):
        return self.data[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(int(chunk.size * chunk.dtype.itemsize) for chunk in self.data)

    def _stored_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)

    def einsum(self, eqn: str, x):
        """`jnp.einsum(eqn, x, w)` in x's dtype (float32 accumulation)."""
        inputs, out = eqn.split("->")
        lhs, rhs = inputs.split(",")
        if "..." in lhs:
            spare = _SPARE_LETTERS[: x.ndim - (len(lhs) - 3)]
            lhs, out = lhs.replace("...", spare), out.replace("...", spare)
        stored = "".join(rhs[p] for p in self.perm)
        kept, contracted = stored[: len(stored) - self.ncontract], stored[len(stored) - self.ncontract :]
        batch = "".join(c for c in lhs if c not in contracted)
        rows = jnp.einsum(f"{lhs}->{batch}{contracted}", x)  # a transpose, usually the identity
        batch_shape = rows.shape[: len(batch)]
        y = matmul(rows.reshape(math.prod(batch_shape), -1), self.data)
        y = y.reshape(*batch_shape, *self._stored_shape()[: len(kept)])
        return jnp.einsum(f"{batch}{kept}->{out}", y).astype(x.dtype)

    def materialize(self, dtype):
        stored = jnp.concatenate(self.data, axis=1).reshape(self._stored_shape())
        return jnp.transpose(stored, np.argsort(self.perm)).astype(dtype)

    def reshape(self, *shape):
        """Merges/splits leading uncontracted axes (as `gating.reshape(2F, D)`); the data is unchanged."""
        from gemma4_jax.quant.weight import reshaped_layout

        shape, perm, _, _ = reshaped_layout(self.shape, self.perm, self.ncontract, shape, "decode-layout")
        return dataclasses.replace(self, shape=shape, perm=perm)


def _own_buffer(row):
    """`row` (1-D) as it is, written to a buffer of its own. XLA:CPU fuses cheap producers of a dot's vector operand
    into the matvec loop, and unless that operand is then a plain 1-D array (not a reshape of a [heads, head_dim]
    attention output, a transpose or a convert of one) the loop falls back to a generic emitter that recomputes the
    index arithmetic per weight element: 4.7 instead of 32 GB/s (measured, [1536, 2048] bf16). XLA:CPU never fuses a
    reduce-window into its consumer, so the row goes through one: the running sum of (row, 0), i.e. row + 0."""
    return jax.lax.cumsum(jnp.stack([jnp.zeros_like(row), row]), axis=0)[1]


def matmul(x, data):
    """x [M, IN] @ (data: n chunks [OUT, C], as [OUT, n·C]).T -> [M, OUT] float32 (see the module doc)."""
    c = data[0].shape[1]
    f32 = jnp.float32
    if x.shape[0] == 1:
        row = _own_buffer(x[0].astype(f32))
        parts = [jnp.dot(row[k * c : (k + 1) * c], chunk.T.astype(f32)) for k, chunk in enumerate(data)]
    else:
        rows = x.astype(data[0].dtype)
        parts = [
            jnp.einsum("mi,oi->mo", rows[:, k * c : (k + 1) * c], chunk, preferred_element_type=f32)
            for k, chunk in enumerate(data)
        ]
    return parts[0] if len(parts) == 1 else sum(jax.lax.reduce_precision(p, 8, 23) for p in parts)


def fused_lm_head(x, table) -> bool:
    """Whether the tied LM head takes the fused 1-D form: XLA:CPU, 16/32-bit table, one row, D <= MAX_CHUNK."""
    return wanted(table.dtype) and math.prod(x.shape[:-1]) == 1 and x.shape[-1] <= MAX_CHUNK


def lm_head(x, table):
    """The tied LM head for one row (`fused_lm_head`): x [1, 1, D] @ table [V, D].T -> [1, 1, V] float32. The
    table is [out, in] already, so this is the fused 1-D form without any re-layout."""
    row = _own_buffer(x.reshape(-1).astype(jnp.float32))
    return jnp.dot(row, table.T.astype(jnp.float32)).reshape(1, 1, -1)


def uses_decode_layout(leaf: param_spec.Leaf) -> bool:
    """The leaves stored chunk-major on CPU: the text decoder's dense contractions (not the expert stacks, which
    the MoE dispatch reads whole, nor the lookup tables)."""
    return (
        leaf.part == "text" and leaf.quant in _LAYOUT_CLASSES and not leaf.batch and leaf.ncontract and not leaf.unused
    )


def data_shape(leaf: param_spec.Leaf) -> tuple[int, int, int]:
    """(n, out, chunk): a leaf's DecodeWeight data is n arrays [out, chunk]."""
    stored = [leaf.shape[p] for p in leaf.perm]
    n_in = math.prod(stored[len(stored) - leaf.ncontract :])
    n = chunks_of(n_in)
    return n, math.prod(stored) // n_in, n_in // n


def to_decode_weight(w, leaf: param_spec.Leaf) -> DecodeWeight:
    """One dense leaf (official layout) as a DecodeWeight; numpy in, each chunk's device array built once."""
    n, rows, chunk = data_shape(leaf)
    matrix = np.transpose(np.asarray(w), leaf.perm).reshape(rows, n * chunk)
    data = tuple(jnp.asarray(np.ascontiguousarray(matrix[:, k * chunk : (k + 1) * chunk])) for k in range(n))
    return DecodeWeight(data, tuple(leaf.shape), tuple(leaf.perm), leaf.ncontract)


def decode_layout(params, config: Gemma4Config):
    """`params` with each dense leaf that `uses_decode_layout` stored chunk-major, converted leaf by leaf (the
    old array is released before the next one is made). Weight objects (quantized, LoRA) stay as they are."""
    from gemma4_jax.model import is_dense, tree_get, tree_set

    out = jax.tree_util.tree_map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))
    for leaf in param_spec.param_spec(config):
        if not uses_decode_layout(leaf):
            continue
        try:
            w = tree_get(out, leaf.path)
        except KeyError:
            continue
        if is_dense(w):
            tree_set(out, leaf.path, to_decode_weight(jax.device_get(w), leaf))
            del w
    return out


_FAST_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def wanted(dtype) -> bool:
    """Whether the decode layout pays off for weights of `dtype` here: on XLA:CPU, 16/32-bit floats (float64, the
    parity tests' dtype, keeps the checkpoint layout: the fused form computes in float32)."""
    return jax.default_backend() == "cpu" and jnp.dtype(dtype) in tuple(map(jnp.dtype, _FAST_DTYPES))


def is_decode_weight(x) -> bool:
    return isinstance(x, DecodeWeight)


def checkpoint_layout(params):
    """`params` with every DecodeWeight back in the official layout (for what reads or transforms weights as
    stored: quantization, LoRA training); the tree itself when it has none."""
    if not any(is_decode_weight(w) for w in jax.tree.leaves(params, is_leaf=is_decode_weight)):
        return params
    official = lambda w: w.materialize(w.dtype) if is_decode_weight(w) else w  # noqa: E731
    return jax.tree.map(official, params, is_leaf=is_decode_weight)
