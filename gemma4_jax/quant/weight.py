"""The JAX side of quantization: `QuantizedWeight`, a packed weight inside the parameter tree.

It follows the weight-object protocol of `gemma4_jax.model`: codes and scales stay packed on the device and are
dequantized inside the jitted contraction. Codes are stored with the contraction axes last ("rows" of the
contracted length C, in the order of the remaining official axes; `param_spec.Leaf.perm`): the Hugging Face /
ggml layout of every matrix ([out, in], blocks along `in`), so a Q4_0 weight here holds exactly the numbers of the
same tensor in a GGUF file.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import param_spec
from gemma4_jax.param_spec import Leaf
from gemma4_jax.quant.codecs import FLOAT, QuantSpec, code_shapes, quantize_rows, sfp8_scale


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["format", "block", "shape", "perm", "ncontract", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A packed weight that computes like the dense array of logical (official-layout) `shape`.

    codes/scales hold the stored layout: axes `perm` of the logical shape, the last `ncontract` of them
    flattened into rows of C elements, quantized as QuantSpec(format, block). `dtype` is the compute dtype.
    """

    codes: Any
    scales: Any
    format: str
    block: int | None
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    ncontract: int
    dtype: Any

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.format, self.block)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)

    @property
    def nbytes(self) -> int:
        return int(self.codes.size * self.codes.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)

    def _rows(self, codes, scales):
        """f32 [..., C] from codes/scales with any leading (row) shape."""
        if self.format == "sfp8":
            return sfp8_decode_jax(codes) * scales.astype(jnp.float32)
        if self.format in ("int4", "q4_0"):
            c = codes.shape[-1] * 2
            block = self.block or c
            p = codes.reshape(*codes.shape[:-1], c // block, block // 2)
            q = jnp.concatenate([p & 0x0F, p >> 4], axis=-1).astype(jnp.int8) - 8
        else:
            c = codes.shape[-1]
            q = codes.reshape(*codes.shape[:-1], c // (self.block or c), self.block or c)
        return (q.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]).reshape(*codes.shape[:-1], c)

    def stored(self, dtype):
        """The dense weight in the stored layout."""
        return self._rows(self.codes, self.scales).reshape(self.stored_shape).astype(dtype)

    def materialize(self, dtype):
        return jnp.transpose(self.stored(dtype), np.argsort(self.perm))

    def einsum(self, eqn: str, x):
        inputs, out = eqn.split("->")
        lhs, rhs = inputs.split(",")
        stored_rhs = "".join(rhs[p] for p in self.perm)
        return jnp.einsum(f"{lhs},{stored_rhs}->{out}", x, self.stored(x.dtype), preferred_element_type=x.dtype)

    def take(self, ids, dtype):
        """Rows `w[ids]` of an embedding table, dequantizing only those rows."""
        if self.perm[0] != 0 or self.ncontract >= len(self.shape):
            return jnp.take(self.materialize(dtype), ids, axis=0)
        codes = jnp.take(self.codes, ids, axis=0)
        scales = self.scales if self.format == "sfp8" else jnp.take(self.scales, ids, axis=0)
        rows = self._rows(codes, scales).reshape(*ids.shape, *self.stored_shape[1:])
        ids_ndim = ids.ndim
        inverse = np.argsort(self.perm[1:]) if len(self.perm) > 1 else np.zeros(0, int)
        order = (*range(ids_ndim), *(ids_ndim + int(i) for i in inverse))
        return jnp.transpose(rows, order).astype(dtype)

    def reshape(self, *shape):
        """Merges/splits leading logical axes that come before every contracted axis."""
        shape, perm, old_lead, new_lead = reshaped_layout(self.shape, self.perm, self.ncontract, shape, "quantized")
        if shape == tuple(self.shape):
            return self
        rows_shape = (*shape[:new_lead], *self.codes.shape[old_lead:-1])
        codes = self.codes.reshape(*rows_shape, self.codes.shape[-1])
        scales = self.scales if self.format == "sfp8" else self.scales.reshape(*rows_shape, self.scales.shape[-1])
        return dataclasses.replace(self, codes=codes, scales=scales, shape=shape, perm=perm)


def reshaped_layout(shape, perm, ncontract: int, new_shape, what: str):
    """(new shape, its perm, old and new count of changed leading axes) of a weight object in a stored layout (axes
    `perm`, the last `ncontract` contracted) reshaped to `new_shape` (a tuple, or its sizes as arguments): only
    leading uncontracted axes that lead the stored layout may merge or split; the longest common suffix stays."""
    if len(new_shape) == 1 and isinstance(new_shape[0], tuple | list):
        new_shape = tuple(new_shape[0])
    new_shape = tuple(int(s) for s in new_shape)
    if new_shape == tuple(shape):
        return new_shape, tuple(perm), 0, 0
    keep = 0
    while keep < min(len(new_shape), len(shape)) and new_shape[-1 - keep] == shape[-1 - keep]:
        keep += 1
    old_lead, new_lead = len(shape) - keep, len(new_shape) - keep
    if math.prod(new_shape[:new_lead]) != math.prod(shape[:old_lead]) or tuple(perm[:old_lead]) != tuple(
        range(old_lead)
    ):
        raise ValueError(f"cannot reshape a {what} {tuple(shape)} weight to {new_shape}")
    if len(perm) - ncontract < old_lead:
        raise ValueError(f"cannot reshape a {what} {tuple(shape)} weight to {new_shape}: merges contracted axes")
    new_perm = (*range(new_lead), *(p - old_lead + new_lead for p in perm[old_lead:]))
    return new_shape, new_perm, old_lead, new_lead


def sfp8_decode_jax(codes):
    """uint8 SFP8 codes -> float32, by assembling the float32 bits (no table gather)."""
    c = codes.astype(jnp.uint32)
    magnitude = c & 0x7F
    large = magnitude >= 0x40
    exponent = jnp.where(large, ((magnitude >> 3) & 7) + 120, (magnitude >> 2) + 104)
    mantissa_bits = jnp.where(large, (magnitude & 7) << 20, (magnitude & 3) << 21)
    bits = ((c >> 7) << 31) | jnp.where(magnitude == 0, jnp.uint32(0), (exponent << 23) | mantissa_bits)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


# ----- tensors and trees ---------------------------------------------------------------------------------


# ----- tensors and trees ---------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 22  # rows are quantized ~4M elements at a time: temporaries stay ~100 MB


def stored_rows(leaf: Leaf) -> tuple[tuple[int, ...], int]:
    """(outer shape, contracted size C) of a leaf's stored layout."""
    stored = tuple(leaf.shape[p] for p in leaf.perm)
    return stored[: len(stored) - leaf.ncontract], math.prod(stored[len(stored) - leaf.ncontract :])


def quantize_array(x: np.ndarray, spec: QuantSpec, leaf: Leaf) -> tuple[np.ndarray, np.ndarray]:
    """Official-layout array of `leaf` -> (codes, scales) in numpy, chunked over rows."""
    rows_shape, c = stored_rows(leaf)
    codes_shape, codes_dtype, scales_shape, scales_dtype = code_shapes(spec, rows_shape, c)
    stored = np.transpose(x, leaf.perm)  # a view
    sfp8_scale_value = None
    if spec.format == "sfp8":
        max_abs = np.float32(0)
        for start, stop in _row_chunks(stored.shape, c):
            max_abs = max(max_abs, np.float32(np.max(np.abs(stored[start:stop].astype(np.float32)), initial=0)))
        _, sfp8_scale_value = sfp8_scale(np.asarray([max_abs], np.float32))
    codes = np.empty(codes_shape, codes_dtype)
    scales = np.empty(scales_shape, scales_dtype)
    for start, stop in _row_chunks(stored.shape, c):
        rows = np.ascontiguousarray(stored[start:stop], np.float32).reshape(stop - start, *rows_shape[1:], c)
        chunk_codes, chunk_scales = quantize_rows(rows, spec, sfp8_scale_value)
        codes[start:stop] = chunk_codes
        if spec.format == "sfp8":
            scales[...] = chunk_scales
        else:
            scales[start:stop] = chunk_scales
    return codes, scales


def _row_chunks(stored_shape: tuple[int, ...], c: int) -> Iterator[tuple[int, int]]:
    """Slices of the first stored axis (the whole tensor when it has only contracted axes)."""
    if len(stored_shape) == 0:
        yield 0, 0
        return
    per_row = max(1, math.prod(stored_shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, stored_shape[0], step):
        yield start, min(start + step, stored_shape[0])


def quantized_weight(codes, scales, spec: QuantSpec, leaf: Leaf, dtype) -> QuantizedWeight:
    return QuantizedWeight(
        jnp.asarray(codes), jnp.asarray(scales), spec.format, spec.block, leaf.shape, leaf.perm, leaf.ncontract,
        jnp.dtype(dtype),
    )  # fmt: skip


def quantize_leaf(x, spec: QuantSpec, leaf: Leaf, dtype=None):
    """One parameter -> a QuantizedWeight on the device (or the array unchanged for "float")."""
    if spec.format == FLOAT:
        return x if dtype is None else jnp.asarray(x, dtype)
    codes, scales = quantize_array(np.asarray(jax.device_get(x)), spec, leaf)
    return quantized_weight(codes, scales, spec, leaf, dtype or x.dtype)


def quantize_params(params, config, policy):
    """The parameter tree with every weight `policy` (a `quant.policy.JaxPolicy`) quantizes replaced by a
    QuantizedWeight. Leaves that already are weight objects are kept."""

    def one(path, value):
        if not isinstance(value, jax.Array | np.ndarray):
            return value
        leaf = param_spec.leaf_of(config, tuple(k.key for k in path))
        return quantize_leaf(value, policy.choose(leaf), leaf)

    from gemma4_jax.matvec import checkpoint_layout

    return jax.tree_util.tree_map_with_path(one, checkpoint_layout(params))


def _is_quantized(x) -> bool:
    """A packed weight: a QuantizedWeight, or one cut into the CPU decode layout (`matvec.DecodeWeight`)."""
    from gemma4_jax.matvec import DecodeWeight

    return isinstance(x, QuantizedWeight) or (isinstance(x, DecodeWeight) and x.format is not None)


def weight_bytes(params) -> int:
    """Bytes the parameters occupy (packed bytes for quantized weights)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=_is_quantized):
        total += leaf.nbytes if _is_quantized(leaf) else int(leaf.size * leaf.dtype.itemsize)
    return total


def dequantize_params(params, dtype=None):
    """Dense tree: every QuantizedWeight materialized (in its compute dtype unless `dtype` is given)."""
    return jax.tree_util.tree_map(
        lambda w: w.materialize(dtype or w.dtype) if _is_quantized(w) else w, params, is_leaf=_is_quantized
    )


def has_quantized(params) -> bool:
    return any(_is_quantized(w) for w in jax.tree_util.tree_leaves(params, is_leaf=_is_quantized))
