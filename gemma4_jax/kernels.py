"""The compiled CPU kernel and its pure-JAX twin: one activation row times a 4-bit weight (int4 with blocks of 32,
GGUF Q4_0), as llama.cpp computes it.

XLA:CPU reads 4-bit weights at about half of llama.cpp's speed (research/xla-cpu-matvec; bench/quant.py): it
dequantizes every weight element to float32 before multiplying. `q4_matvec` quantizes the activation row to int8
per block of 32 instead and multiplies integers (`_cpu_kernels.cc`, built by `pip install` on x86-64 with AVX2,
run by XLA as an FFI custom call on its thread pool). That changes the numerics: the row carries int8 rounding,
about 0.5% of max |y| against float64, as llama.cpp's q4_0 x q8_0 dot does. `q4_matvec_reference` is the same
arithmetic in pure JAX, bit for bit (the tests hold the kernel to it); `matvec` calls the kernel for one row
where it is built and this CPU runs it, and otherwise keeps XLA's float32 form. GEMMA4_JAX_CPU_KERNELS=0 turns the
kernel off (float32 activations everywhere).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # elements per quantization block of weight codes and of the int8 activation row
_INV_127 = np.float32(1) / np.float32(127)  # the kernel's `1.f / 127.f`: d = amax * this, never amax / 127
_TARGETS = {jnp.dtype(jnp.float16): "gemma4_q4_matvec_f16", jnp.dtype(jnp.float32): "gemma4_q4_matvec_f32"}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel library with its FFI targets registered, or None (not built here, or this CPU lacks
    AVX2/FMA/F16C)."""
    here = Path(__file__).parent
    found = [here / f"_cpu_kernels{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return None
    lib = ctypes.cdll.LoadLibrary(str(path))
    if not lib.gemma4_q4_supported():
        return None
    for name in _TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def q4_available() -> bool:
    """Whether `q4_matvec` runs here: built, this CPU supports it, and GEMMA4_JAX_CPU_KERNELS is not 0."""
    return os.environ.get("GEMMA4_JAX_CPU_KERNELS", "1") != "0" and _library() is not None


def q4_fits(fmt: str | None, block: int | None, scales_dtype) -> bool:
    """Whether weights of format `fmt`, `block` and block scales of `scales_dtype` are the kernel's."""
    return fmt in ("int4", "q4_0") and block == BLOCK and jnp.dtype(scales_dtype) in _TARGETS


def q4_matvec(x, codes, scales):
    """x [K] float32, codes uint8 [N, K/2] (per block of 32: element j in the low nibble of byte j, j + 16 in
    its high nibble; value nibble - 8), scales float16/float32 [N, K/32] -> [N] float32, through the compiled
    kernel (`q4_available()` must hold)."""
    if _library() is None:
        raise RuntimeError("the CPU kernel is not built or this CPU lacks AVX2/FMA/F16C (see q4_available)")
    target = _TARGETS[jnp.dtype(scales.dtype)]
    result = jax.ShapeDtypeStruct((codes.shape[0],), jnp.float32)
    return jax.ffi.ffi_call(target, result)(x.astype(jnp.float32), codes, scales)


def q4_matvec_reference(x, codes, scales):
    """`q4_matvec` in pure JAX, bit for bit (see _cpu_kernels.cc for the order of the float steps)."""
    f32 = jnp.float32
    n, nb = scales.shape
    blocks = x.astype(f32).reshape(nb, BLOCK)
    finite = jnp.all(jnp.isfinite(blocks), axis=1)
    d = jnp.where(finite, jnp.max(jnp.abs(blocks), axis=1) * _INV_127, jnp.nan)  # a non-finite row: NaN out
    usable = finite & (d != 0)
    inverse = jnp.where(usable, f32(1) / jnp.where(usable, d, 1), 0)
    xq = jnp.where(finite[:, None], jnp.round(blocks * inverse[:, None]), 0).astype(jnp.int32)  # half to even
    packed = codes.reshape(n, nb, BLOCK // 2)
    q = jnp.concatenate([packed & 0x0F, packed >> 4], axis=2).astype(jnp.int32) - 8
    lanes = (q * xq).reshape(n, nb, 8, 4).sum(-1)  # exact integers: the kernel's 8 int32 lanes per block
    terms = lanes.astype(f32) * (scales.astype(f32) * d)[..., None]
    # Each product must be rounded before it is added, as in the kernel. XLA:CPU contracts a multiply and an add
    # within one fusion into a fused multiply-add; the loop keeps them apart: `terms` is its operand, made
    # before it. A leading block of zeros keeps the loop at two or more trips (XLA removes one-trip loops) and
    # changes nothing: the kernel's accumulator starts at +0 too, and +0 + (+0) = +0.
    terms = jnp.pad(terms, ((0, 0), (1, 0), (0, 0)))
    acc = jax.lax.fori_loop(0, nb + 1, lambda b, acc: acc + terms[:, b], jnp.zeros((n, 8), f32))
    return ((acc[:, 0] + acc[:, 4]) + (acc[:, 2] + acc[:, 6])) + ((acc[:, 1] + acc[:, 5]) + (acc[:, 3] + acc[:, 7]))
