"""JAX functions → one .tflite with named signatures, through `jax.export` and `litert-converter` (no TF/torch).

Each signature is traced on its own (`jax.export`), its StableHLO parsed into the converter's MLIR context and
legalized to VHLO; the modules are merged, run through the TFLite conversion passes and serialized.

The converter holds ~7x a model's constant bytes, so the weights do not go through it: they are signature
inputs during conversion (a `dot_general` with an [out, in] input converts to FULLY_CONNECTED just as with a
constant), and `bind_constants` turns those inputs into constant tensors of the serialized model afterwards.
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


@dataclass
class Constant:
    """The data a signature input is replaced with: `data` as stored (int4 already packed), its TFLite type
    (`schema_py_generated.TensorType`) and per-channel `scale` (axis 0, zero points 0) or None."""

    data: np.ndarray
    tensor_type: int
    scale: np.ndarray | None = None


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def bind_constants(
    model_bytes: bytes,
    constants: dict[str, Constant],
    path: str,
    weight_only: bool = False,
    signatures: Sequence[str] | None = None,
) -> None:
    """Writes `model_bytes` to `path` with the signature inputs named in `constants` turned into constant
    tensors (removed from the subgraph inputs and signature defs; one buffer per constant, shared by all
    signatures; constants with the same `data` array share one). Quantized constants must feed only
    FULLY_CONNECTED weights (tensors as ai-edge-quantizer's dynamic recipe writes them: same type, scales,
    zero points, packing). `weight_only` inserts a DEQUANTIZE before the first use of each quantized constant
    (float compute on the same weights: the checks' twin). `signatures`: keep only these (and their subgraphs).
    Buffer data follows the flatbuffer (TFLite's offset/size layout, as ai-edge-quantizer writes models), so
    models over 2 GB work and the data is written straight from the arrays."""
    s = _schema()
    model = s.ModelT.InitFromPackedBuf(model_bytes, 0)
    if signatures is not None:
        kept = [sig for sig in model.signatureDefs if sig.signatureKey.decode() in signatures]
        model.subgraphs = [model.subgraphs[sig.subgraphIndex] for sig in kept]
        for index, sig in enumerate(kept):
            sig.subgraphIndex = index
        model.signatureDefs = kept
    buffer_of: dict[int, int] = {}
    data: dict[int, np.ndarray] = {}
    dequantize_code = None
    for sig in model.signatureDefs:
        sg = model.subgraphs[sig.subgraphIndex]
        bound = {}
        for entry in sig.inputs:
            name = entry.name.decode()
            if name in constants:
                bound[entry.tensorIndex] = name
        sig.inputs = [e for e in sig.inputs if e.tensorIndex not in bound]
        sg.inputs = np.asarray([i for i in sg.inputs if i not in bound], np.int32)
        consumers: dict[int, list[tuple[int, int]]] = {}
        for op_index, op in enumerate(sg.operators):
            for slot, t in enumerate(op.inputs):
                if t in bound:
                    consumers.setdefault(int(t), []).append((op_index, slot))
        inserted = []  # (before op index, DEQUANTIZE op)
        for t, name in bound.items():
            const = constants[name]
            tensor = sg.tensors[t]
            if id(const.data) not in buffer_of:  # keyed by array: a tied table bound twice is stored once
                buffer_of[id(const.data)] = len(model.buffers)
                model.buffers.append(s.BufferT())
                data[buffer_of[id(const.data)]] = const.data
            tensor.buffer = buffer_of[id(const.data)]
            tensor.type = const.tensor_type
            if const.scale is None:
                continue
            for op_index, slot in consumers.get(t, []):
                op = sg.operators[op_index]
                if model.operatorCodes[op.opcodeIndex].builtinCode != s.BuiltinOperator.FULLY_CONNECTED or slot != 1:
                    raise ValueError(f"quantized constant {name} feeds an op other than FULLY_CONNECTED's weights")
            q = s.QuantizationParametersT()
            q.scale = np.asarray(const.scale, np.float32)
            q.zeroPoint = np.zeros(len(const.scale), np.int64)
            q.quantizedDimension = 0
            tensor.quantization = q
            if weight_only and t in consumers:
                if dequantize_code is None:
                    code = s.OperatorCodeT()
                    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.DEQUANTIZE
                    code.version = 1
                    dequantize_code = len(model.operatorCodes)
                    model.operatorCodes.append(code)
                out = s.TensorT()
                out.name = tensor.name + b"_dequant"
                out.shape = tensor.shape
                out.type = s.TensorType.FLOAT32
                out.buffer = 0
                sg.tensors.append(out)
                op = s.OperatorT()
                op.opcodeIndex = dequantize_code
                op.inputs = np.asarray([t], np.int32)
                op.outputs = np.asarray([len(sg.tensors) - 1], np.int32)
                for op_index, slot in consumers[t]:
                    inputs = np.array(sg.operators[op_index].inputs, np.int32)  # parsed arrays are read-only
                    inputs[slot] = len(sg.tensors) - 1
                    sg.operators[op_index].inputs = inputs
                inserted.append((min(i for i, _ in consumers[t]), op))
        for before, op in sorted(inserted, key=lambda x: x[0], reverse=True):
            sg.operators.insert(before, op)
    _write(model, data, path)


def _round_up_16(n: int) -> int:
    return (n + 15) & ~15


def _write(model, data: dict[int, np.ndarray], path: str) -> None:
    """Serializes `model` with the buffers in `data` stored after the flatbuffer (16-byte aligned): the
    flatbuffer is packed with placeholder offsets, which have a fixed width, so packing again with the real
    ones gives the same length."""
    import flatbuffers

    def pack() -> bytearray:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return builder.Output()

    for index in data:
        model.buffers[index].data = None
        model.buffers[index].offset = model.buffers[index].size = 1
    head = pack()
    offset = _round_up_16(len(head))
    for index, array in data.items():
        model.buffers[index].offset, model.buffers[index].size = offset, array.nbytes
        offset = _round_up_16(offset + array.nbytes)
    final = pack()
    assert len(final) == len(head), "buffer offsets changed the flatbuffer's length"
    with open(path, "wb") as f:
        f.write(final)
        for index, array in data.items():
            f.write(b"\0" * (model.buffers[index].offset - f.tell()))
            f.write(np.ascontiguousarray(array).data)
        f.write(b"\0" * (_round_up_16(f.tell()) - f.tell()))
