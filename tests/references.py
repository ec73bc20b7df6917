"""Reference files that nobody on this project wrote, read from the llama-cpp-python sdist.

`scripts/test.sh` downloads `llama_cpp_python-0.3.36.tar.gz` from PyPI into `.cache/sdist/` (it also builds
llama.cpp from it). Its vendored llama.cpp carries Google's Gemma 4 chat templates
(`models/templates/google-gemma-4-31B-it*.jinja`) and the real Gemma 4 vocabulary
(`models/ggml-vocab-gemma-4.gguf` with tokenization test vectors `.inp` / `.out`).
"""

from __future__ import annotations

import functools
import os
import tarfile

SDIST = os.environ.get(
    "GEMMA4_LLAMA_CPP_SDIST",
    os.path.join(os.path.dirname(__file__), "..", ".cache", "sdist", "llama_cpp_python-0.3.36.tar.gz"),
)
_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


@functools.cache
def llama_cpp_file(path: str) -> bytes:
    """A file of the vendored llama.cpp tree, e.g. `models/templates/google-gemma-4-31B-it.jinja`."""
    if not os.path.isfile(SDIST):
        raise FileNotFoundError(
            f"{SDIST} is missing: run scripts/test.sh (it downloads it), or `pip download --no-deps --no-binary "
            ":all: llama-cpp-python==0.3.36 -d .cache/sdist`, or set GEMMA4_LLAMA_CPP_SDIST"
        )
    with tarfile.open(SDIST) as tar:
        return tar.extractfile(_ROOT + path).read()


def gemma4_chat_template(name: str = "google-gemma-4-31B-it.jinja") -> str:
    return llama_cpp_file(f"models/templates/{name}").decode("utf-8")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(data: bytes) -> dict:
    """The key/value metadata of a GGUF file (v3). A direct parse: gguf-py's GGUFReader takes minutes on the
    262k-token vocab because it builds a numpy view per string."""
    import struct

    offset = 0

    def take(fmt):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string():
        nonlocal offset
        n = take("<Q")
        offset += n
        return data[offset - n : offset].decode("utf-8")

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = take("<I"), take("<Q")
            return [value(item_kind) for _ in range(count)]
        return take(_GGUF_SCALARS[kind])

    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    offset = 4
    take("<I")  # version
    take("<Q")  # tensor count
    kv_count = take("<Q")
    out = {}
    for _ in range(kv_count):
        key = string()
        out[key] = value(take("<I"))
    return out


@functools.cache
def llama_cpp_gelu_table():
    """llama.cpp's own CPU GELU table (`ggml_table_gelu_f16`, indexed by the bits of an f16 input, filled by
    `ggml_cpu_init` with f16(gelu_tanh_f32(x))), read out of the built `libggml-cpu` as float32 [65536]."""
    import ctypes

    import llama_cpp
    import numpy as np

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    raw = np.ctypeslib.as_array((ctypes.c_uint16 * 65536).in_dll(lib, "ggml_table_gelu_f16"))
    return raw.copy().view(np.float16).astype(np.float32)


def llama_cpp_gelu(x, approximate: bool = True):
    """GELU as llama.cpp's CPU backend computes it in f32 models (GGML_GELU_FP16, ggml-cpu/vec.h
    `ggml_vec_gelu_f32` / `ggml_vec_geglu_f32`): 0 for x <= -10, x for x >= 10, otherwise the table entry of
    f16(x). A drop-in for `jax.nn.gelu(x, approximate=True)` (the only GELU Gemma 4 uses)."""
    import jax
    import jax.numpy as jnp

    assert approximate, "Gemma 4 uses the tanh approximation"
    xf = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(xf.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
    y = jnp.asarray(llama_cpp_gelu_table())[bits]
    return jnp.where(xf <= -10.0, 0.0, jnp.where(xf >= 10.0, xf, y)).astype(x.dtype)
