"""The quantized checkpoint directory that `gemma4-jax quantize` writes and every command loads.

    DIR/config.json          the model config (as in an HF checkpoint)
    DIR/quantization.json    the marker: format, compute dtype, and per tensor its spec, shape and stored layout
    DIR/model.safetensors    "<path>.codes" + "<path>.scales" per quantized tensor, "<path>" per float tensor
    plus the tokenizer files of the source checkpoint, if any.

`quantize` streams any `WeightSource` (HF, orbax, random weights, a tree in memory) tensor by tensor into it;
`QuantizedSource` reads it back, as packed `QuantizedWeight`s (`load_weight`) or dequantized (`read`).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import files
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.param_spec import Leaf
from gemma4_jax.quant.codecs import FLOAT, QuantSpec, code_shapes
from gemma4_jax.quant.policy import JaxPolicy
from gemma4_jax.quant.weight import QuantizedWeight, quantize_array, quantized_weight, stored_rows
from gemma4_jax.sources import WeightSource, copy_tokenizer_files

MARKER_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
MARKER_VERSION = 1


def is_quantized_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER_FILE))


def _planned_tensors(leaf: Leaf, spec: QuantSpec) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The safetensors entries of one leaf: float32 as is, or its codes and scales."""
    if spec.format == FLOAT:
        return [(leaf.name, leaf.shape, np.dtype(np.float32))]
    rows, c = stored_rows(leaf)
    codes_shape, codes_dtype, scales_shape, scales_dtype = code_shapes(spec, rows, c)
    return [
        (leaf.name + ".codes", codes_shape, np.dtype(codes_dtype)),
        (leaf.name + ".scales", scales_shape, np.dtype(scales_dtype)),
    ]


def quantize(source: WeightSource, out: str, policy: JaxPolicy, *, dtype="bfloat16", progress: bool = True) -> dict:
    """Quantizes `source` tensor by tensor into the new directory `out` (atomic: it appears when complete). Float
    tensors (norms, scalars, router: a few KB) are stored in float32; `dtype` is the compute dtype recorded for
    loading. Returns a summary (bytes before/after, tensors per spec, seconds)."""
    if isinstance(source, QuantizedSource):
        raise Gemma4Error(
            f"{source.path} is already a quantized checkpoint; quantize the float checkpoint it came from"
        )
    start = time.perf_counter()
    files.check_output(out, directory=True)
    leaves = [leaf for leaf in source.leaves() if not leaf.unused]  # reader K/V: never used, not stored
    specs = {leaf.path: policy.choose(leaf) for leaf in leaves}
    plan = [t for leaf in leaves for t in _planned_tensors(leaf, specs[leaf.path])]
    meter = files.Progress(
        f"quantizing to {policy.format}", source.nbytes(leaves=leaves), min_total=10**8 if progress else math.inf
    )
    bytes_before = bytes_after = 0
    counts: dict[str, int] = {}
    described = {}
    with files.atomic_output(out, directory=True) as tmp:
        with files.SafetensorsWriter(os.path.join(tmp, WEIGHTS_FILE), plan, {"format": "gemma4-jax-quantized"}) as w:
            for leaf in leaves:
                spec = specs[leaf.path]
                value = source.read(leaf)
                bytes_before += value.nbytes
                if spec.format == FLOAT:
                    stored = value.astype(np.float32)
                    w.write(leaf.name, stored)
                    bytes_after += stored.nbytes
                    described[leaf.name] = {"format": FLOAT, "shape": list(leaf.shape)}
                else:
                    codes, scales = quantize_array(value, spec, leaf)
                    w.write(leaf.name + ".codes", codes)
                    w.write(leaf.name + ".scales", scales)
                    bytes_after += codes.nbytes + scales.nbytes
                    described[leaf.name] = {
                        "format": spec.format,
                        "block": spec.block,
                        "shape": list(leaf.shape),
                        "perm": list(leaf.perm),
                        "ncontract": leaf.ncontract,
                    }
                counts[str(spec)] = counts.get(str(spec), 0) + 1
                meter.advance(value.nbytes, leaf.name)
                del value
        marker = {
            "gemma4_jax_quantized": MARKER_VERSION,
            "format": policy.format,
            "dtype": str(jnp.dtype(dtype)),
            "overrides": [[pattern, str(spec)] for pattern, spec in policy.overrides],
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "tensors": described,
        }
        files.write_text(os.path.join(tmp, MARKER_FILE), _marker_json(marker))
        source.config.save_json(os.path.join(tmp, "config.json"))
        copy_tokenizer_files(source, tmp)
    meter.close()
    return {
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "tensors": counts,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _marker_json(marker: dict) -> str:
    """Indented JSON with one line per tensor (readable for hundreds of tensors)."""
    head = {k: v for k, v in marker.items() if k != "tensors"}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    tensors = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in marker["tensors"].items()]
    return "{\n" + "\n".join(lines) + '\n  "tensors": {\n' + ",\n".join(tensors) + "\n  }\n}\n"


class QuantizedSource(WeightSource):
    """A quantized checkpoint directory: leaves as packed `QuantizedWeight`s (`load_weight`) or dequantized."""

    def __init__(self, path: str):
        marker_path = os.path.join(path, MARKER_FILE)
        try:
            with files.reading(marker_path), open(marker_path, encoding="utf-8") as f:
                marker = json.load(f)
            version = marker["gemma4_jax_quantized"]
            self.described = dict(marker["tensors"])
            self.compute_dtype = jnp.dtype(marker.get("dtype", "bfloat16"))
        except (ValueError, KeyError, TypeError) as e:
            raise Gemma4Error(f"{marker_path}: not a valid quantization description ({e})") from None
        if version != MARKER_VERSION:
            raise Gemma4Error(f"{marker_path}: format version {version}, this gemma4-jax reads {MARKER_VERSION}")
        config = Gemma4Config.load_json(
            os.path.join(path, "config.json"), name=os.path.basename(os.path.normpath(path))
        )
        super().__init__(config, f"quantized checkpoint {path}", os.path.abspath(path))
        self.path, self.format = path, marker.get("format")
        self.files = files.SafetensorsDir(os.path.join(path, WEIGHTS_FILE))
        for leaf in self.leaves():
            self._check(leaf)

    def packed_nbytes(self) -> int:
        """Bytes of the stored codes, scales and float tensors: what loading puts on the device."""
        return sum(math.prod(self.files.shape(n)) * self.files.dtype(n).itemsize for n in self.files.names())

    def spec(self, leaf: Leaf) -> QuantSpec | None:
        d = self.described.get(leaf.name)
        return None if d is None else QuantSpec(d["format"], d.get("block"))

    def _check(self, leaf: Leaf) -> None:
        d = self.described.get(leaf.name)
        if d is None:
            if not leaf.unused:
                raise Gemma4Error(f"{self.path}: {MARKER_FILE} has no entry for {leaf.name}")
            return
        spec = self.spec(leaf)
        if tuple(d["shape"]) != leaf.shape or (
            spec.format != FLOAT and (tuple(d["perm"]), d["ncontract"]) != (leaf.perm, leaf.ncontract)
        ):
            raise Gemma4Error(f"{self.path}: {leaf.name} is described as {d}, the config expects shape {leaf.shape}")
        for name, shape, dtype in _planned_tensors(leaf, spec):
            if self.files.shape(name) is None:
                raise Gemma4Error(f"{self.path}: tensor {name} is missing from {WEIGHTS_FILE}")
            if self.files.shape(name) != shape or self.files.dtype(name) != dtype:
                raise Gemma4Error(
                    f"{self.path}: tensor {name} is {self.files.dtype(name)} {self.files.shape(name)}, "
                    f"expected {dtype} {shape}"
                )

    def has(self, leaf: Leaf) -> bool:
        return leaf.name in self.described

    def dtype(self, leaf: Leaf) -> np.dtype:
        from gemma4_jax.hf_format import np_dtype

        return np_dtype(self.compute_dtype)

    def load_weight(self, leaf: Leaf, dtype=None):
        """The leaf for the model: a QuantizedWeight computing in `dtype` (default: the checkpoint's), or a float
        array."""
        dtype = jnp.dtype(dtype or self.compute_dtype)
        spec = self.spec(leaf)
        if spec is None:  # unused reader K/V
            return jnp.zeros(leaf.shape, dtype)
        if spec.format == FLOAT:
            return jnp.asarray(self.files.read(leaf.name)).astype(dtype)
        codes, scales = self.files.read(leaf.name + ".codes"), self.files.read(leaf.name + ".scales")
        return quantized_weight(codes, scales, spec, leaf, dtype)

    def read(self, leaf: Leaf, dtype=None) -> np.ndarray:
        """The leaf dequantized (float32 unless `dtype`)."""
        from gemma4_jax.hf_format import np_dtype

        weight = self.load_weight(leaf, jnp.float32)
        value = weight.materialize(jnp.float32) if isinstance(weight, QuantizedWeight) else weight
        return np.asarray(jax.device_get(value)).astype(np_dtype(dtype or jnp.float32), copy=False)
