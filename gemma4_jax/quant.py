"""Weight quantization: SFP8, int8, int4, GGUF Q8_0 / Q4_0 — byte-level codecs, packed weights for the JAX
model, a per-tensor policy, and a quantized checkpoint directory.

Codecs (numpy, vectorised; inputs are converted to float32 first):
- SFP8, gemma.cpp's "switched floating point" (`sfp8_encode` / `sfp8_decode`): one byte per weight, a sign
  bit and either a "large" code (|x| >= 2^-7: 3-bit exponent, 3-bit mantissa) or a "small" one (4-bit
  exponent, 2-bit mantissa), magnitudes up to 1.875, one float32 scale per tensor. The bytes are gemma.cpp's:
  a float32 is first chopped to bfloat16 (not rounded, gemma.cpp rounds only once), the rounding then sees the
  top 6 of bf16's 7 mantissa bits and rounds them to nearest, ties to even; the smallest small code
  (1.0 * 2^-23, which would be byte 0x00 = zero) is bumped to 1.25 * 2^-23; -0 (0x80) is never written.
- int8 / int4: symmetric, one float32 scale per output channel (`block=None`) or per block of `block`
  elements along the contraction axis; int4 codes are -7..7 stored as nibbles `q + 8`.
- Q8_0 / Q4_0: ggml's blocks of 32 along the last axis with a float16 scale; `q8_0_encode` / `q4_0_encode`
  return the ggml block bytes (identical to `gguf.quants.quantize`), the `*_quantize` functions the same
  numbers as (codes, scales) for the JAX weights.

4-bit codes, of every 4-bit format, are packed as ggml packs Q4_0: within a block of b elements byte j holds
element j in its low nibble and element j + b/2 in its high nibble (a per-channel int4 row is one block).

In the model, a quantized weight is a `QuantizedWeight` (the weight-object protocol of `gemma4_jax.model`):
codes and scales stay packed on the device and are dequantized inside the jitted contraction. Codes are stored
with the contraction axes last ("rows" of the contracted length C, in the order of the remaining official
axes): that is the Hugging Face / ggml layout of every matrix ([out, in], blocks along `in`), so a Q4_0
weight here holds exactly the numbers of the same tensor in a GGUF file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import tree_get, tree_set

FORMATS = ("sfp8", "int8", "int4", "q8_0", "q4_0")
FLOAT = "float"
GGML_BLOCK = 32
SFP8_MAX = 1.875
MARKER_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
_MARKER_VERSION = 1

# ----- SFP8 ----------------------------------------------------------------------------------------------


def sfp8_scale(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(x brought into [-1.875, 1.875], scale) as gemma.cpp's `ScaleWeights` does it, in float32."""
    x = np.asarray(x, np.float32)
    max_abs = np.float32(np.max(np.abs(x))) if x.size else np.float32(0)
    if not max_abs > np.float32(SFP8_MAX):
        return x, np.float32(1.0)
    scale = np.float32(max_abs / np.float32(SFP8_MAX))
    return _sfp8_apply_scale(x, scale), scale


def sfp8_encode_unscaled(x: np.ndarray) -> np.ndarray:
    """Bytes of float32 values with |x| <= 1.875 (no scale): a lookup by their bfloat16 bits (the encoding sees
    nothing else), in a table that `_sfp8_encode_bf16_bits` computes once for all 65536 patterns."""
    x = np.ascontiguousarray(x, np.float32)
    return _sfp8_encode_table()[x.view(np.uint32) >> 16]


@functools.cache
def _sfp8_encode_table() -> np.ndarray:
    return _sfp8_encode_bf16_bits(np.arange(1 << 16, dtype=np.int32))


def _sfp8_encode_bf16_bits(h: np.ndarray) -> np.ndarray:
    """SFP8 code of each bfloat16 bit pattern of magnitude <= 1.875, by integer arithmetic on its fields."""
    sign = h >> 15
    exponent = (h >> 7) & 0xFF  # biased by 127
    mantissa6 = (h & 0x7F) >> 1
    # Values from 1.1111b * 2^-8 up round to 2^-7 either way; deciding "large" there keeps the carry simple.
    large = (exponent > 119) | ((exponent == 119) & (mantissa6 >= 0x3C))
    drop = np.where(large, 3, 4)  # mantissa bits dropped: keep 3 (large) or 2 (small)
    full = mantissa6 | 0x40  # with the implicit leading 1
    kept = full >> drop
    rest = full & ((1 << drop) - 1)
    half = 1 << (drop - 1)
    kept += (rest > half) | ((rest == half) & (kept & 1 == 1))
    overflow = (kept >> (7 - drop)) > 0  # rounded up to the next power of two
    kept = np.where(overflow, kept >> 1, kept)
    exponent = exponent + overflow
    large = exponent >= 120  # after rounding: E >= -7
    m = kept - (1 << (6 - drop))  # without the implicit 1; 0 whenever rounding carried into the exponent
    m = np.where(exponent == 104, np.maximum(m, 1), m)  # 1.0 * 2^-23 would encode as zero
    code = np.where(large, 0x40 | ((exponent - 120) << 3) | m, ((exponent - 104) << 2) | m)
    code = np.where(exponent < 104, 0, code | (sign << 7))  # below the smallest code: +0 (never -0)
    return code.astype(np.uint8)


def sfp8_encode(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(uint8 codes of x's shape, float32 scale); x ≈ sfp8_decode(codes, scale)."""
    scaled, scale = sfp8_scale(x)
    return sfp8_encode_unscaled(scaled), scale


def _sfp8_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    magnitude = codes & 0x7F
    large = magnitude >= 0x40
    exponent = np.where(large, ((magnitude >> 3) & 7) + 120, (magnitude >> 2) + 104)
    mantissa_bits = np.where(large, (magnitude & 7) << 20, (magnitude & 3) << 21)
    bits = (codes >> 7) << 31 | np.where(magnitude == 0, 0, exponent << 23 | mantissa_bits)
    return bits.astype(np.uint32).view(np.float32)


SFP8_TABLE = _sfp8_table()  # code -> float32 value (unscaled)


def sfp8_decode(codes: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return SFP8_TABLE[np.asarray(codes, np.uint8)] * np.float32(scale)


# ----- int8 / int4 ---------------------------------------------------------------------------------------


def _blocks(x: np.ndarray, block: int | None) -> np.ndarray:
    """[..., n] float32 -> [..., n / block, block] (block None: one block per row)."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    block = block or n
    if n % block:
        raise Gemma4Error(f"rows of {n} elements do not split into blocks of {block}")
    return x.reshape(*x.shape[:-1], n // block, block)


def _symmetric(x: np.ndarray, block: int | None, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = _blocks(x, block)
    scale = np.max(np.abs(blocks), axis=-1) / np.float32(qmax)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.rint(blocks / safe[..., None]), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def int8_quantize(x: np.ndarray, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [..., n], float32 scales [..., n / block]); x ≈ codes * scale, |error| <= scale / 2."""
    q, scale = _symmetric(x, block, 127)
    return q.reshape(np.shape(x)), scale


def int8_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    blocks = codes.reshape(*scales.shape, -1).astype(np.float32)
    return (blocks * scales[..., None].astype(np.float32)).reshape(codes.shape)


def pack_nibbles(q: np.ndarray, block: int) -> np.ndarray:
    """uint8 values 0..15 [..., n] -> [..., n / 2]: per block, element j low nibble, j + block/2 high."""
    q = q.reshape(*q.shape[:-1], q.shape[-1] // block, 2, block // 2)
    packed = q[..., 0, :] | (q[..., 1, :] << np.uint8(4))
    return packed.reshape(*packed.shape[:-2], -1)


def unpack_nibbles(packed: np.ndarray, block: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: [..., n / 2] -> uint8 [..., n]."""
    p = packed.reshape(*packed.shape[:-1], -1, block // 2)
    q = np.concatenate([p & np.uint8(0x0F), p >> np.uint8(4)], axis=-1)
    return q.reshape(*packed.shape[:-1], -1)


def int4_quantize(x: np.ndarray, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [..., n / 2], float32 scales [..., n / block]); codes -7..7, |error| <= scale / 2."""
    n = np.shape(x)[-1]
    block = block or n
    if block % 2:
        raise Gemma4Error(f"int4 needs an even block (got {block})")
    q, scale = _symmetric(x, block, 7)
    return pack_nibbles((q.reshape(np.shape(x)) + 8).astype(np.uint8), block), scale


def int4_dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n = packed.shape[-1] * 2
    block = n // scales.shape[-1]
    q = unpack_nibbles(packed, block).astype(np.int8) - np.int8(8)
    return int8_dequantize(q, scales)


# ----- GGUF Q8_0 / Q4_0 ----------------------------------------------------------------------------------


def _reciprocal(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(np.float32(1), d, out=out, where=d != 0)
    return out


def q8_0_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [..., n], float16 scales [..., n / 32]) exactly as ggml's reference quantizer."""
    blocks = _blocks(x, GGML_BLOCK)
    d = np.max(np.abs(blocks), axis=-1) / np.float32(127)
    v = blocks * _reciprocal(d)[..., None]
    a = np.abs(v)
    whole = np.floor(a)
    q = np.copysign(whole + (a - whole >= np.float32(0.5)), v)  # round half away from zero
    return q.astype(np.int8).reshape(np.shape(x)), d.astype(np.float16)


def q4_0_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [..., n / 2], float16 scales [..., n / 32]) exactly as ggml's reference quantizer: the
    scale is (the element of largest magnitude, sign kept) / -8, codes trunc(x / d + 8.5) capped at 15."""
    blocks = _blocks(x, GGML_BLOCK)
    first_max = np.argmax(np.abs(blocks), axis=-1)[..., None]
    d = np.take_along_axis(blocks, first_max, axis=-1)[..., 0] / np.float32(-8)
    q = np.trunc(blocks * _reciprocal(d)[..., None] + np.float32(8.5))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(np.shape(x))
    return pack_nibbles(q, GGML_BLOCK), d.astype(np.float16)


def _ggml_bytes(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float16 scales [..., nb] + uint8 codes [..., nb * k] -> ggml blocks [..., nb * (2 + k)]."""
    nb = scales.shape[-1]
    d = np.ascontiguousarray(scales).view(np.uint8).reshape(*scales.shape, 2)
    q = codes.view(np.uint8).reshape(*scales.shape, -1)
    return np.concatenate([d, q], axis=-1).reshape(*scales.shape[:-1], nb * (2 + q.shape[-1]))


def _split_ggml(b: np.ndarray, shape: tuple[int, ...], block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    n = shape[-1]
    if n % GGML_BLOCK or b.size != math.prod(shape) // GGML_BLOCK * block_bytes:
        raise Gemma4Error(f"{b.size} ggml bytes do not hold a tensor of shape {tuple(shape)}")
    blocks = np.ascontiguousarray(b, np.uint8).reshape(*shape[:-1], n // GGML_BLOCK, block_bytes)
    return blocks[..., :2].copy().view(np.float16)[..., 0], blocks[..., 2:]


def q8_0_encode(x: np.ndarray) -> np.ndarray:
    """float [..., n] -> ggml Q8_0 bytes uint8 [..., n / 32 * 34]."""
    q, d = q8_0_quantize(x)
    return _ggml_bytes(d, q)


def q8_0_decode(b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    d, q = _split_ggml(b, tuple(shape), 34)
    return (q.view(np.int8).astype(np.float32) * d.astype(np.float32)[..., None]).reshape(shape)


def q4_0_encode(x: np.ndarray) -> np.ndarray:
    """float [..., n] -> ggml Q4_0 bytes uint8 [..., n / 32 * 18]."""
    packed, d = q4_0_quantize(x)
    return _ggml_bytes(d, packed)


def q4_0_decode(b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    d, packed = _split_ggml(b, tuple(shape), 18)
    q = unpack_nibbles(packed, GGML_BLOCK).astype(np.float32) - np.float32(8)
    return (q * d.astype(np.float32)[..., None]).reshape(shape)


# ----- one tensor ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one tensor is stored: `format` is "float" or one of FORMATS; `block` is the number of elements per
    scale along the contraction axis (None: one per output channel; Q8_0/Q4_0: 32; SFP8: one per tensor)."""

    format: str
    block: int | None = None

    def __str__(self) -> str:
        if self.format in ("int8", "int4"):
            return f"{self.format}/{'channel' if self.block is None else self.block}"
        return self.format


def _code_shapes(spec: TensorSpec, rows: tuple[int, ...], c: int) -> tuple[tuple, Any, tuple, Any]:
    """(codes shape, dtype, scales shape, dtype) of a tensor with outer shape `rows` and contracted size c."""
    nb = 1 if spec.block is None else c // spec.block
    if spec.format == "sfp8":
        return (*rows, c), np.uint8, (), np.float32
    if spec.format in ("int8", "q8_0"):
        return (*rows, c), np.int8, (*rows, nb), np.float16 if spec.format == "q8_0" else np.float32
    return (*rows, c // 2), np.uint8, (*rows, nb), np.float16 if spec.format == "q4_0" else np.float32


def _quantize_rows(rows: np.ndarray, spec: TensorSpec, sfp8_scale_value=None) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., C] -> (codes, scales) of `spec` (SFP8: with the tensor's scale precomputed)."""
    if spec.format == "sfp8":
        scaled = rows if sfp8_scale_value == 1 else _sfp8_apply_scale(rows, sfp8_scale_value)
        return sfp8_encode_unscaled(scaled), np.float32(sfp8_scale_value)
    if spec.format == "int8":
        return int8_quantize(rows, spec.block)
    if spec.format == "int4":
        return int4_quantize(rows, spec.block)
    if spec.format == "q8_0":
        return q8_0_quantize(rows)
    if spec.format == "q4_0":
        return q4_0_quantize(rows)
    raise Gemma4Error(f"unknown quantization format {spec.format!r}")


def _sfp8_apply_scale(x: np.ndarray, scale: np.float32) -> np.ndarray:
    inv_scale = np.float32(1.0 / np.float64(scale))
    # The product may still land a hair above 1.875: clamp, keeping the sign.
    return np.copysign(np.minimum(np.float32(SFP8_MAX), np.abs(x * inv_scale)), x)


# ----- where each weight contracts -----------------------------------------------------------------------

# Official leaf name -> {ndim: (stored axis order, number of trailing contracted axes)}. Stored order puts the
# contracted axes last; it is the HF [out, in] layout (e.g. linear [F, D] is stored [D, F] like down_proj).
_LAYOUTS: dict[str, dict[int, tuple[tuple[int, ...], int]]] = {
    "input_embedding": {2: ((0, 1), 1)},  # [V, D]: LM head contracts D; rows are looked up
    "per_layer_embeddings": {3: ((0, 1, 2), 1)},  # [V, L, P]: lookup only, blocks along P
    "per_layer_model_projection": {3: ((1, 2, 0), 1)},  # [D, L, P]
    "q_einsum": {3: ((0, 2, 1), 1)},  # [N, D, H]
    "kv_einsum": {4: ((0, 1, 3, 2), 1)},  # [2, K, D, H]
    "k_einsum": {3: ((0, 2, 1), 1)},  # [K, D, H]
    "attn_vec_einsum": {3: ((2, 0, 1), 2)},  # [N, H, D]: contracts N and H
    "gating_einsum": {3: ((0, 1, 2), 1), 4: ((0, 1, 2, 3), 1)},  # [2, F, D] / experts [E, 2, F, D]
    "linear": {2: ((1, 0), 1), 3: ((0, 2, 1), 1)},  # [F, D] / experts [E, F, D]
    "per_layer_input_gate": {2: ((1, 0), 1)},  # [D, P]
    "per_layer_projection": {2: ((1, 0), 1)},  # [P, D]
    "router_logits": {2: ((1, 0), 1)},  # [D, E]
}
_ALWAYS_FLOAT = ("scale", "skip_scale", "router_scale", "per_expert_scale")
_PLE_PROJECTIONS = ("per_layer_model_projection", "per_layer_input_gate", "per_layer_projection")
_TABLES = ("input_embedding", "per_layer_embeddings")
_EIGHT_BIT = {"int4": TensorSpec("int8"), "q4_0": TensorSpec("q8_0", GGML_BLOCK)}


def leaf_name(path: str) -> str:
    parts = path.split("/")
    return parts[-2] if parts[-1] == "w" and len(parts) > 1 else parts[-1]


def layout(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
    """(stored axis order, contracted axis count) of a weight, or None if it cannot be quantized."""
    return _LAYOUTS.get(leaf_name(path), {}).get(len(shape))


def _stored_rows(shape: tuple[int, ...], perm: tuple[int, ...], ncontract: int) -> tuple[tuple[int, ...], int]:
    stored = tuple(shape[p] for p in perm)
    return stored[: len(stored) - ncontract], math.prod(stored[len(stored) - ncontract :])


# ----- policy --------------------------------------------------------------------------------------------


def _default_block(fmt: str) -> int | None:
    return {"int4": 32, "q8_0": GGML_BLOCK, "q4_0": GGML_BLOCK}.get(fmt)


def parse_spec(text: str) -> TensorSpec:
    """ "float", "sfp8", "int8", "int8/64", "int4/channel", "q4_0", ... -> TensorSpec."""
    fmt, _, block = text.partition("/")
    if fmt != FLOAT and fmt not in FORMATS:
        raise Gemma4Error(f"unknown quantization format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not block:
        return TensorSpec(fmt, _default_block(fmt))
    if fmt not in ("int8", "int4"):
        raise Gemma4Error(f"{fmt} has no block size option (got {text!r})")
    if block == "channel":
        return TensorSpec(fmt, None)
    if not block.isdigit() or int(block) < 2 or int(block) % 2:
        raise Gemma4Error(f"block size must be an even number or 'channel', got {block!r}")
    return TensorSpec(fmt, int(block))


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """Chooses a TensorSpec per parameter path ("layer_3/mlp/linear").

    Defaults: norms, scalars and the MoE router (router_logits, router_scale, per_expert_scale) stay in float.
    Everything else gets `format`, except under the 4-bit formats (int4, q4_0): the PLE projections, the token
    embedding and the PLE table get the 8-bit counterpart (int8 per channel, Q8_0). The PLE projections
    because 4 bits there roughly doubles the error (toolchain notes; Google's mobile file keeps per-layer parts
    at 8 bits); the token embedding because it is also the tied LM head, whose error lands on every logit
    directly (llama.cpp keeps it at 6 bits in its Q4_0 files); the PLE table because it is a per-layer part
    too and is only gathered (one row per token), so its size costs memory but not decode bandwidth.
    `overrides` (fnmatch pattern on the path, spec), first match wins, come before all defaults.

    A spec that does not fit a tensor (the contracted size not a multiple of the block, an odd size for int4)
    falls back to int8 per channel.
    """

    format: str
    block: int | None = None  # int8/int4 block (None: the format's default: int4 32, int8 per channel)
    overrides: tuple[tuple[str, TensorSpec], ...] = ()

    def __post_init__(self):
        if self.format not in FORMATS:
            raise Gemma4Error(f"unknown quantization format {self.format!r}; choose one of: {', '.join(FORMATS)}")

    def base_spec(self) -> TensorSpec:
        if self.format in ("int8", "int4") and self.block is not None:
            return TensorSpec(self.format, self.block)
        return TensorSpec(self.format, _default_block(self.format))

    def choose(self, path: str, shape: tuple[int, ...]) -> TensorSpec:
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                return self._fit(spec, path, shape)
        name = leaf_name(path)
        if len(shape) <= 1 or name in _ALWAYS_FLOAT or name == "router_logits" or layout(path, shape) is None:
            return TensorSpec(FLOAT)
        spec = self.base_spec()
        if self.format in _EIGHT_BIT and (name in _PLE_PROJECTIONS or name in _TABLES):
            spec = _EIGHT_BIT[self.format]
        return self._fit(spec, path, shape)

    @staticmethod
    def _fit(spec: TensorSpec, path: str, shape: tuple[int, ...]) -> TensorSpec:
        if spec.format == FLOAT:
            return spec
        where = layout(path, shape)
        if where is None:
            raise Gemma4Error(f"{path} {tuple(shape)}: no known contraction axis, it can only stay float")
        _, c = _stored_rows(shape, *where)
        block = spec.block or c
        if c % block or (spec.format in ("int4", "q4_0") and block % 2):
            return TensorSpec("int8")
        return spec


# ----- the weight object ---------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["format", "block", "shape", "perm", "ncontract", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A packed weight that computes like the dense array of logical (official-layout) `shape`.

    codes/scales hold the stored layout: axes `perm` of the logical shape, the last `ncontract` of them
    flattened into rows of C elements, quantized as TensorSpec(format, block). `dtype` is the compute dtype.
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
    def spec(self) -> TensorSpec:
        return TensorSpec(self.format, self.block)

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
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if shape == tuple(self.shape):
            return self
        # The longest common suffix stays; the axes before it are the ones that change.
        keep = 0
        while keep < min(len(shape), len(self.shape)) and shape[-1 - keep] == self.shape[-1 - keep]:
            keep += 1
        old_lead, new_lead = len(self.shape) - keep, len(shape) - keep
        if math.prod(shape[:new_lead]) != math.prod(self.shape[:old_lead]) or tuple(self.perm[:old_lead]) != tuple(
            range(old_lead)
        ):
            raise ValueError(f"cannot reshape a quantized {tuple(self.shape)} weight to {shape}")
        perm = (*range(new_lead), *(p - old_lead + new_lead for p in self.perm[old_lead:]))
        rows_old = len(self.perm) - self.ncontract
        if rows_old < old_lead:
            raise ValueError(
                f"cannot reshape a quantized {tuple(self.shape)} weight to {shape}: merges contracted axes"
            )
        rows_shape = (*shape[:new_lead], *self.codes.shape[old_lead:-1])
        codes = self.codes.reshape(*rows_shape, self.codes.shape[-1])
        scales = self.scales if self.format == "sfp8" else self.scales.reshape(*rows_shape, self.scales.shape[-1])
        return dataclasses.replace(self, codes=codes, scales=scales, shape=shape, perm=perm)


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

_CHUNK_ELEMENTS = 1 << 22  # rows are quantized ~4M elements at a time: temporaries stay ~100 MB


def quantize_array(x: np.ndarray, spec: TensorSpec, path: str) -> tuple[np.ndarray, np.ndarray, tuple, int]:
    """Official-layout array -> (codes, scales, perm, ncontract) in numpy, chunked over rows."""
    perm, ncontract = layout(path, x.shape)
    rows_shape, c = _stored_rows(x.shape, perm, ncontract)
    codes_shape, codes_dtype, scales_shape, scales_dtype = _code_shapes(spec, rows_shape, c)
    stored = np.transpose(x, perm)  # a view
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
        chunk_codes, chunk_scales = _quantize_rows(rows, spec, sfp8_scale_value)
        codes[start:stop] = chunk_codes
        if spec.format == "sfp8":
            scales[...] = chunk_scales
        else:
            scales[start:stop] = chunk_scales
    return codes, scales, perm, ncontract


def _row_chunks(stored_shape: tuple[int, ...], c: int) -> Iterator[tuple[int, int]]:
    """Slices of the first stored axis (the whole tensor when it has only contracted axes)."""
    if len(stored_shape) == 0:
        yield 0, 0
        return
    per_row = max(1, math.prod(stored_shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, stored_shape[0], step):
        yield start, min(start + step, stored_shape[0])


def quantize_leaf(x, spec: TensorSpec, path: str, dtype=None):
    """One parameter -> a QuantizedWeight on the device (or the array unchanged for "float")."""
    if spec.format == FLOAT:
        return x if dtype is None else jnp.asarray(x, dtype)
    dtype = jnp.dtype(dtype or x.dtype)
    codes, scales, perm, ncontract = quantize_array(np.asarray(jax.device_get(x)), spec, path)
    return QuantizedWeight(
        jnp.asarray(codes), jnp.asarray(scales), spec.format, spec.block, tuple(x.shape), perm, ncontract, dtype
    )


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def quantize_params(params, config=None, format: str | QuantPolicy = "int8", policy: QuantPolicy | None = None):
    """The parameter tree with every weight the policy quantizes replaced by a QuantizedWeight.

    `format` names the default policy (`QuantPolicy(format)`); `policy` overrides it. `config` is accepted for
    symmetry with the other entry points (the layouts follow from the parameter names and shapes).
    """
    if policy is None:
        policy = format if isinstance(format, QuantPolicy) else QuantPolicy(format)

    def one(path, leaf):
        if not isinstance(leaf, jax.Array | np.ndarray):
            return leaf  # already a weight object
        p = _path_str(path)
        return quantize_leaf(leaf, policy.choose(p, tuple(leaf.shape)), p)

    return jax.tree_util.tree_map_with_path(one, params)


def weight_bytes(params) -> int:
    """Bytes the parameters occupy (packed bytes for quantized weights)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight)):
        total += leaf.nbytes if isinstance(leaf, QuantizedWeight) else int(leaf.size * leaf.dtype.itemsize)
    return total


def dequantize_params(params, dtype=None):
    """Dense tree: every QuantizedWeight materialized (in its compute dtype unless `dtype` is given)."""
    return jax.tree_util.tree_map(
        lambda w: w.materialize(dtype or w.dtype) if isinstance(w, QuantizedWeight) else w,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )


# ----- the quantized checkpoint directory ----------------------------------------------------------------
#
# DIR/config.json          the model config (as in an HF checkpoint)
# DIR/quantization.json    the marker: format, compute dtype, and per tensor its spec, shape and stored layout
# DIR/model.safetensors    "<path>.codes" + "<path>.scales" per quantized tensor, "<path>" per float tensor
# plus the tokenizer files of the source checkpoint, if any.

_ST_DTYPES = {
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
}


def _st_dtype(dtype) -> str:
    import ml_dtypes

    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return "BF16"
    return _ST_DTYPES[dtype]


def is_quantized_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


@dataclasses.dataclass
class _Planned:
    path: str
    shape: tuple[int, ...]
    spec: TensorSpec
    read: Callable[[], np.ndarray]  # the official-layout array


def _plan_entries(plans: list[_Planned], float_dtype) -> tuple[dict, list[tuple[str, tuple, Any]]]:
    """(per-tensor JSON, [(safetensors name, shape, dtype)] in file order)."""
    described, tensors = {}, []
    for p in plans:
        if p.spec.format == FLOAT:
            described[p.path] = {"format": FLOAT, "shape": list(p.shape)}
            tensors.append((p.path, p.shape, float_dtype))
            continue
        perm, ncontract = layout(p.path, p.shape)
        rows, c = _stored_rows(p.shape, perm, ncontract)
        codes_shape, codes_dtype, scales_shape, scales_dtype = _code_shapes(p.spec, rows, c)
        described[p.path] = {
            "format": p.spec.format,
            "block": p.spec.block,
            "shape": list(p.shape),
            "perm": list(perm),
            "ncontract": ncontract,
        }
        tensors.append((p.path + ".codes", codes_shape, codes_dtype))
        tensors.append((p.path + ".scales", scales_shape, scales_dtype))
    return described, tensors


class _StreamingSafetensors:
    """Writes a safetensors file whose header is known up front, one tensor at a time, in header order."""

    def __init__(self, path: str, tensors: list[tuple[str, tuple, Any]]):
        header, offset = {}, 0
        for name, shape, dtype in tensors:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "gemma4-jax-quantized"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._expected = [(n, tuple(s), np.dtype(d)) for n, s, d in tensors]
        self._file = open(path, "wb")  # closed in close()
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        expected_name, shape, dtype = self._expected.pop(0)
        array = np.asarray(array)
        if name != expected_name or tuple(array.shape) != shape or array.dtype != dtype:
            raise AssertionError(f"{name} {array.shape} {array.dtype}: expected {expected_name} {shape} {dtype}")
        self._file.write(np.ascontiguousarray(array).data)  # a view: no second copy of a large tensor

    def close(self) -> None:
        self._file.close()
        if self._expected:
            raise AssertionError(f"{len(self._expected)} tensors were not written")


def _hf_source(path: str) -> tuple[Any, list[tuple[str, tuple, Callable]]]:
    """(config, [(path, shape, reader)]) of an HF checkpoint, read one tensor at a time when quantizing."""
    from gemma4_jax import checkpoint
    from gemma4_jax.config import Gemma4Config
    from gemma4_jax.model import param_shapes

    if not os.path.isdir(path):
        raise Gemma4Error(f"checkpoint directory not found: {path}")
    if is_quantized_checkpoint(path):
        raise Gemma4Error(f"{path} is already a quantized checkpoint; quantize the float checkpoint it came from")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise Gemma4Error(f"{path}: missing config.json (expected an HF checkpoint directory)")
    config = Gemma4Config.load_json(os.path.join(path, "config.json"), name=os.path.basename(os.path.normpath(path)))
    files = checkpoint.SafetensorsDir(path)
    available = set(files.names())
    prefix = files.text_prefix()
    shapes = param_shapes(config)
    sources = []
    for entry in checkpoint.mapping(config):
        if entry.optional:
            continue  # KV-shared reader layers' K/V: never used by the model, not stored
        names = [prefix + n for n in entry.hf_names]
        missing = [n for n in names if n not in available]
        if missing:
            raise Gemma4Error(f"{path}: missing tensors {', '.join(missing[:3])}")
        shape = tuple(tree_get(shapes, entry.path).shape)

        def read(entry=entry, names=names, shape=shape):
            try:
                value = entry.from_hf(*[files.read(n) for n in names])
            except ValueError:
                value = None
            if value is None or tuple(value.shape) != shape:
                raise Gemma4Error(f"{path}: shape mismatch for {'/'.join(entry.path)}: config expects {shape}")
            return value

        sources.append(("/".join(entry.path), shape, read))
    return config, sources


def _random_source(config, seed: int, dtype) -> list[tuple[str, tuple, Callable]]:
    """Random weights leaf by leaf: the same draws as `model.init_params(config, seed, dtype)`, but only one
    leaf exists at a time (a full-size model quantizes without ever holding all of its float weights)."""
    import jax
    import jax.numpy as jnp

    from gemma4_jax.model import param_shapes, random_leaf

    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(jnp.dtype(dtype))
    leaves = jax.tree_util.tree_leaves_with_path(param_shapes(config, dtype))
    sources = []
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        shape = tuple(leaf.shape)

        def read(keys=keys, shape=shape):
            return random_leaf(rng, keys, shape, np_dtype)

        sources.append(("/".join(keys), shape, read))
    return sources


def tree_source(params) -> list[tuple[str, tuple, Callable]]:
    """[(path, shape, reader)] of the array leaves of a parameter tree."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [
        (_path_str(path), tuple(leaf.shape), lambda leaf=leaf: np.asarray(jax.device_get(leaf)))
        for path, leaf in leaves
    ]


def _prepare_output(out: str) -> str:
    """Checks `out` may be written; returns the parent directory for the temporary directory."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise Gemma4Error(f"output {out} exists and is not an empty directory; choose a new path")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise Gemma4Error(f"output parent directory does not exist: {parent}")
    return parent


def write_quantized(
    out: str,
    config,
    sources: list[tuple[str, tuple, Callable]],
    policy: QuantPolicy,
    dtype: str = "bfloat16",
    copy_from: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Quantizes tensor by tensor into a new directory `out` (written as a temporary directory, renamed when
    complete); `dtype` is the compute dtype recorded for loading. Float tensors (norms, scalars, router: a few
    KB) are stored in float32. Returns a summary dict (bytes before/after, tensors per spec, seconds)."""
    start = time.perf_counter()
    parent = _prepare_output(out)
    plans = [_Planned(p, shape, policy.choose(p, shape), read) for p, shape, read in sources]
    described, tensors = _plan_entries(plans, np.float32)
    total = sum(math.prod(p.shape) for p in plans)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-quant-")
    bytes_before = bytes_after = 0
    counts: dict[str, int] = {}
    try:
        writer = _StreamingSafetensors(os.path.join(tmp, WEIGHTS_FILE), tensors)
        try:
            done, last_report = 0, -math.inf
            for i, p in enumerate(plans):
                value = p.read()
                bytes_before += value.size * value.dtype.itemsize
                if p.spec.format == FLOAT:
                    stored = value.astype(np.float32)
                    writer.write(p.path, stored)
                    bytes_after += stored.nbytes
                else:
                    codes, scales, _, _ = quantize_array(value, p.spec, p.path)
                    writer.write(p.path + ".codes", codes)
                    writer.write(p.path + ".scales", scales)
                    bytes_after += codes.nbytes + scales.nbytes
                counts[str(p.spec)] = counts.get(str(p.spec), 0) + 1
                done += math.prod(p.shape)
                del value
                now = time.perf_counter()
                if progress and (now - last_report >= 2 or i == len(plans) - 1):  # a line every ~2 s at most
                    last_report = now
                    progress(
                        f"[{i + 1}/{len(plans)}] {p.path} {list(p.shape)} -> {p.spec} "
                        f"({100 * done / total:.0f}% of weights, {time.perf_counter() - start:.0f} s)"
                    )
        finally:
            writer.close()
        summary = {
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "tensors": counts,
            "seconds": round(time.perf_counter() - start, 2),
        }
        marker = {
            "gemma4_jax_quantized": _MARKER_VERSION,
            "format": policy.format,
            "dtype": str(jnp.dtype(dtype)),
            "overrides": [[pattern, str(spec)] for pattern, spec in policy.overrides],
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "tensors": described,
        }
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
            f.write(_marker_json(marker))
        config.save_json(os.path.join(tmp, "config.json"))
        if copy_from:
            from gemma4_jax.sources import tokenizer_files

            for path in tokenizer_files(copy_from, copy_from):
                shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        if os.path.isdir(out):
            os.rmdir(out)  # checked empty above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _marker_json(marker: dict) -> str:
    """Indented JSON with one line per tensor (readable for hundreds of tensors)."""
    head = {k: v for k, v in marker.items() if k != "tensors"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    tensors = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in marker["tensors"].items()]
    return "{\n" + "\n".join(lines) + '\n  "tensors": {\n' + ",\n".join(tensors) + "\n  }\n}\n"


def quantize_checkpoint(src: str, out: str, policy: QuantPolicy, dtype="bfloat16", progress=None) -> dict:
    """HF checkpoint directory -> quantized checkpoint directory (see `write_quantized`)."""
    _prepare_output(out)
    config, sources = _hf_source(src)
    return write_quantized(out, config, sources, policy, dtype, copy_from=src, progress=progress)


def load_quantized(path: str, dtype=None):
    """(config, params) of a quantized checkpoint; weights stay packed (QuantizedWeight leaves). `dtype` is the
    compute dtype (default: the dtype the checkpoint was quantized from)."""
    import jax.numpy as jnp

    from gemma4_jax import checkpoint
    from gemma4_jax.config import Gemma4Config

    marker_path = os.path.join(path, MARKER_FILE)
    try:
        with open(marker_path) as f:
            marker = json.load(f)
        version = marker["gemma4_jax_quantized"]
        described = marker["tensors"]
    except FileNotFoundError:
        raise Gemma4Error(f"{path}: no {MARKER_FILE} (not a gemma4-jax quantized checkpoint)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise Gemma4Error(f"{marker_path}: not a valid quantization description ({e})") from None
    if version != _MARKER_VERSION:
        raise Gemma4Error(f"{marker_path}: format version {version}, this gemma4-jax reads {_MARKER_VERSION}")
    config = Gemma4Config.load_json(os.path.join(path, "config.json"), name=os.path.basename(os.path.normpath(path)))
    dtype = jnp.dtype(dtype or marker.get("dtype", "bfloat16"))
    files = checkpoint.SafetensorsDir(path)

    def read(name):
        value = files.read(name)
        if value is None:
            raise Gemma4Error(f"{path}: tensor {name} is missing from {WEIGHTS_FILE}")
        return value

    params: dict = {}
    for p, d in described.items():
        shape = tuple(d["shape"])
        if d["format"] == FLOAT:
            leaf = jnp.asarray(read(p)).astype(dtype)
        else:
            spec, perm, ncontract = TensorSpec(d["format"], d["block"]), tuple(d["perm"]), int(d["ncontract"])
            codes, scales = read(p + ".codes"), read(p + ".scales")
            rows, c = _stored_rows(shape, perm, ncontract)
            expect = _code_shapes(spec, rows, c)
            if tuple(codes.shape) != tuple(expect[0]) or tuple(scales.shape) != tuple(expect[2]):
                raise Gemma4Error(f"{path}: {p} codes {codes.shape} / scales {scales.shape} do not fit {d}")
            leaf = QuantizedWeight(
                jnp.asarray(codes), jnp.asarray(scales), spec.format, spec.block, shape, perm, ncontract, dtype
            )
        tree_set(params, tuple(p.split("/")), leaf)
    return config, params


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
