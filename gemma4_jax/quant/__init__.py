"""Quantization: SFP8, int8, int4, GGUF Q8_0 / Q4_0.

- `codecs`: the formats in numpy, bit-exact (gemma.cpp's SFP8; ggml's Q8_0/Q4_0 byte-identical to gguf-py);
- `weight`: `QuantizedWeight`, the packed weight the JAX model computes with, and tree-level helpers;
- `checkpoint`: the quantized checkpoint directory (`quantize` writes it, `QuantizedSource` reads it);
- `policy`: which tensor gets which storage, for JAX, GGUF and LiteRT side by side.
"""

from gemma4_jax.quant.codecs import FLOAT, FORMATS, GGML_BLOCK, QuantSpec
from gemma4_jax.quant.policy import JaxPolicy, parse_spec
from gemma4_jax.quant.weight import (
    QuantizedWeight,
    dequantize_params,
    has_quantized,
    quantize_leaf,
    quantize_params,
    weight_bytes,
)

__all__ = [
    "FLOAT",
    "FORMATS",
    "GGML_BLOCK",
    "JaxPolicy",
    "QuantSpec",
    "QuantizedWeight",
    "dequantize_params",
    "has_quantized",
    "parse_spec",
    "quantize_leaf",
    "quantize_params",
    "weight_bytes",
]
