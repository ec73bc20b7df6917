"""Quantization codecs in numpy, bit-exact: SFP8, int8, int4, GGUF Q8_0 / Q4_0.

Inputs are converted to float32 first; everything here is vectorised numpy with no JAX.
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

`quantize_rows` applies one `QuantSpec` to rows [..., C] of a tensor in its stored layout (contracted axes last).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from gemma4_jax.errors import Gemma4Error

FORMATS = ("sfp8", "int8", "int4", "q8_0", "q4_0")
FLOAT = "float"
GGML_BLOCK = 32
SFP8_MAX = 1.875

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


# ----- one spec, applied to rows ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is stored: `format` is "float" or one of FORMATS; `block` is the number of elements per
    scale along the contraction axis (None: one per output channel; Q8_0/Q4_0: 32; SFP8: one per tensor)."""

    format: str
    block: int | None = None

    def __str__(self) -> str:
        if self.format in ("int8", "int4"):
            return f"{self.format}/{'channel' if self.block is None else self.block}"
        return self.format


def code_shapes(spec: QuantSpec, rows: tuple[int, ...], c: int) -> tuple[tuple, Any, tuple, Any]:
    """(codes shape, dtype, scales shape, dtype) of a tensor with outer shape `rows` and contracted size c."""
    nb = 1 if spec.block is None else c // spec.block
    if spec.format == "sfp8":
        return (*rows, c), np.uint8, (), np.float32
    if spec.format in ("int8", "q8_0"):
        return (*rows, c), np.int8, (*rows, nb), np.float16 if spec.format == "q8_0" else np.float32
    return (*rows, c // 2), np.uint8, (*rows, nb), np.float16 if spec.format == "q4_0" else np.float32


def quantize_rows(rows: np.ndarray, spec: QuantSpec, sfp8_scale_value=None) -> tuple[np.ndarray, np.ndarray]:
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
