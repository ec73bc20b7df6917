"""JAX functions → one .tflite with named signatures, through `jax.export` and `litert-converter` (no TF/torch).

Each signature is traced on its own (`jax.export`), its StableHLO parsed into the converter's MLIR context and
legalized to VHLO; the modules are merged (constants the signatures share — the weights — are stored once),
run through the TFLite conversion passes and serialized.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np


@dataclass
class Signature:
    name: str
    fn: Callable[..., dict]  # positional inputs in `inputs` order -> {output name: array}
    inputs: Sequence[tuple[str, tuple[int, ...], np.dtype]]
    outputs: Sequence[str]


def convert(signatures: Sequence[Signature], keep_names: bool = True) -> bytes:
    """`keep_names` keeps the `jax.named_scope` paths in tensor names (quantization recipes select by them)."""
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir._mlir_libs import converter_api_ext

    ctx = ir.Context()
    converter_api_ext.prepare_mlir_context(ctx)
    modules = []
    with ctx:
        for sig in signatures:

            def flat(*args, sig=sig):
                out = sig.fn(*args)
                return tuple(out[name] for name in sig.outputs)

            specs = [jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in sig.inputs]
            exported = jax.export.export(jax.jit(flat), platforms=["cpu"])(*specs)
            text = exported.mlir_module_serialized
            del exported
            module = ir.Module.parse(text)
            del text
            passes = "vhlo-legalize-stablehlo, reconcile-unrealized-casts" + ("" if keep_names else ", strip-debuginfo")
            pm = passmanager.PassManager.parse(f"builtin.module({passes})")
            pm.run(module.operation)
            converter_api_ext.set_signature(
                module.operation,
                signature_name=sig.name,
                input_names=[name for name, _, _ in sig.inputs],
                output_names=list(sig.outputs),
            )
            modules.append(module)
            gc.collect()
        merged = converter_api_ext.merge_modules(modules) if len(modules) > 1 else modules[0]
        del modules
        gc.collect()
        cfg = converter_api_ext.ConvertToTFLConfig()
        cfg.model_origin_framework = "JAX"
        if hasattr(cfg, "enable_x64"):
            cfg.enable_x64 = False
        cfg.canonicalizing_inf_as_min_max_float = False
        converter_api_ext.run_convert_to_tfl_passes(merged, passmanager.PassManager(), cfg)
        try:
            return bytes(converter_api_ext.export_flatbuffer_to_bytes(merged.operation))
        except TypeError:
            return bytes(converter_api_ext.export_flatbuffer_to_bytes(merged))
