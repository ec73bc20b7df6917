"""`gemma4-jax convert`: official orbax (Flax) checkpoints <-> HF safetensors, lossless, either direction.

Values and dtypes are copied as stored (bf16 stays bf16, f32 stays f32); only layouts change (spec §5.3).
HF output is written tensor by tensor (peak: one tensor); orbax output needs the whole tree in memory once,
because orbax writes a checkpoint in one call. The output directory appears only when complete: everything
is written into a temporary directory next to it and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from gemma4_jax.errors import Gemma4Error

# transformers' own default shard size: files stay below it, one tensor never straddles two.
MAX_SHARD_BYTES = 5 * 10**9


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert between official orbax (Flax) and HF safetensors checkpoints",
        description="Convert a checkpoint between the official orbax (Flax) layout and HF safetensors, "
        "losslessly (values and dtypes as stored). Tokenizer files travel along.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="source: orbax or HF directory, kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION], or hf:OWNER/NAME",
    )
    p.add_argument("--to", required=True, choices=("orbax", "hf"), help="output format")
    p.add_argument("-o", "--out", required=True, help="output directory (must not exist yet)")
    p.add_argument("--variant", help="force the variant of an orbax source (default: recognised from its shapes)")
    p.add_argument("--config", help="HF-style config.json describing the source (for non-official sizes)")
    p.add_argument(
        "--layout",
        choices=("nested", "flat"),
        default="nested",
        help="orbax output layout: nested = the Flax param tree (default), flat = transformer/... keys",
    )
    p.add_argument(
        "--text-only",
        action="store_true",
        help="convert only the text decoder when the source also has vision/audio encoder weights",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from gemma4_jax.sources import Progress, gb

    start = time.perf_counter()
    out = os.path.abspath(args.out)
    if os.path.lexists(out):
        raise Gemma4Error(f"output directory already exists: {out} (convert writes a new directory)")
    if not os.path.isdir(os.path.dirname(out)):
        raise Gemma4Error(f"parent directory of the output does not exist: {os.path.dirname(out)}")
    source = open_source(args.checkpoint, args.variant, args.config)
    if source.other and not args.text_only:
        more = f" (and {len(source.other) - 1} more)" if len(source.other) > 1 else ""
        raise Gemma4Error(
            f"{source.path} has weights outside the text decoder ({source.other[0]}{more}), which convert does "
            "not map yet; pass --text-only to convert the text decoder alone"
        )
    staging = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.tmp-")
    try:
        target = os.path.join(staging, "out")
        progress = Progress(f"converting {os.path.basename(source.path)}", source.nbytes)
        if args.to == "hf":
            files = write_hf(target, source, progress)
        else:
            files = write_orbax(target, source, args.layout, progress)
        progress.close()
        copied = [os.path.basename(f) for f in source.tokenizer_files]
        for file in source.tokenizer_files:
            shutil.copyfile(file, os.path.join(target, os.path.basename(file)))
        os.rename(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dtypes = ", ".join(sorted({str(d) for d in source.dtypes.values()}))
    extra = f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer files in the source"
    print(
        f"wrote {out}: {files} ({source.config.name}, {len(source.order)} tensors, {gb(source.nbytes)}, "
        f"{dtypes}){extra}; {time.perf_counter() - start:.1f} s"
    )
    return 0


class Source:
    """A checkpoint seen as official-tree leaves in their stored dtypes, read one at a time in `order`."""

    def __init__(self, path, config, read_all, dtypes, stored, other, tokenizer_files):
        from gemma4_jax.checkpoint import mapping
        from gemma4_jax.sources import expected_shapes

        self.path, self.config, self._read_all = path, config, read_all
        self.shapes, _ = expected_shapes(config)
        self.order = [entry.path for entry in mapping(config)]  # every leaf, in the HF table's order
        self.dtypes: dict[tuple[str, ...], np.dtype] = dtypes
        self.stored: set[tuple[str, ...]] = stored  # leaves the source really has (others: zero reader K/V)
        self.other: list[str] = other
        self.tokenizer_files: list[str] = tokenizer_files

    def leaves(self) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        for expected, (path, value) in zip(self.order, self._read_all(), strict=True):
            if path != expected or value.shape != self.shapes[path] or value.dtype != self.dtypes[path]:
                raise RuntimeError(f"source yielded {path} {value.shape} {value.dtype}, expected {expected}")
            yield path, value

    @property
    def nbytes(self) -> int:
        return sum(math.prod(self.shapes[p]) * self.dtypes[p].itemsize for p in self.order)


def open_source(spec: str, variant: str | None, config_file: str | None) -> Source:
    """Opens and checks a source without reading any tensor (bad sources fail before anything is written)."""
    from gemma4_jax import checkpoint, sources

    forced = sources.given_config(variant, config_file)
    root = sources.resolve(spec)
    kind, path = sources.find_checkpoint(root)
    tokenizer_files = sources.tokenizer_files(path, root)
    if kind == "orbax":
        ckpt = sources.OrbaxCheckpoint(path)
        cfg = ckpt.config(variant, config_file)
        shapes, _ = sources.expected_shapes(cfg)
        order = [entry.path for entry in checkpoint.mapping(cfg)]
        # Absent reader K/V (allowed by ckpt.config) become zeros in the dtype of their layer's queries.
        dtypes = {
            p: (ckpt.leaves[p] if p in ckpt.leaves else ckpt.leaves[(p[0], "attn", "q_einsum", "w")]).dtype
            for p in order
        }

        def read_all():
            for p in order:
                yield p, ckpt.read(p) if p in ckpt.leaves else np.zeros(shapes[p], dtypes[p])

        return Source(path, cfg, read_all, dtypes, set(ckpt.leaves), ckpt.other, tokenizer_files)
    cfg, read, other = checkpoint.open_hf_checkpoint(path, forced)
    dtypes, stored = _hf_dtypes(path, cfg)
    return Source(
        path, cfg, lambda: checkpoint.hf_to_nested(cfg, read, None, source=path), dtypes, stored, other, tokenizer_files
    )


def _hf_dtypes(path: str, config) -> tuple[dict[tuple[str, ...], np.dtype], set[tuple[str, ...]]]:
    """(stored dtype of every official-tree leaf, leaves present) of an HF directory, from the headers alone."""
    from gemma4_jax import checkpoint

    files = checkpoint.SafetensorsDir(path)
    prefix = files.text_prefix()
    dtypes, stored, missing = {}, set(), []
    last = np.dtype(np.float32)
    for entry in checkpoint.mapping(config):
        found = [files.dtype(prefix + n) for n in entry.hf_names]
        if all(d is not None for d in found):
            last = np.result_type(*found)
            stored.add(entry.path)
        elif not entry.optional:
            missing += [n for n, d in zip(entry.hf_names, found, strict=True) if d is None]
        dtypes[entry.path] = last
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise Gemma4Error(f"{path}: missing tensors {', '.join(missing[:3])}{more}")
    return dtypes, stored


def write_hf(target: str, source: Source, progress=None) -> str:
    """config.json + safetensors shard(s) (+ index when sharded), tensor by tensor in one pass."""
    import jax

    from gemma4_jax import checkpoint

    safetensors_dtype = {v: k for k, v in checkpoint._SAFETENSORS_DTYPES.items()}
    plan: list[tuple[str, tuple[int, ...], np.dtype]] = []  # HF tensors in write order
    entries = {entry.path: entry for entry in checkpoint.mapping(source.config)}
    for path in source.order:
        if path not in source.stored:
            continue  # zero reader K/V: not part of the HF format
        dtype = source.dtypes[path]
        outs = jax.eval_shape(entries[path].to_hf, jax.ShapeDtypeStruct(source.shapes[path], dtype))
        plan += [("model." + n, tuple(o.shape), dtype) for n, o in zip(entries[path].hf_names, outs, strict=True)]
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for tensor in plan:
        nbytes = math.prod(tensor[1]) * tensor[2].itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    os.makedirs(target)

    def hf_tensors():
        for path, value in source.leaves():
            if path in source.stored:
                yield from zip(entries[path].hf_names, entries[path].to_hf(value), strict=True)
            if progress:
                progress.advance(value.nbytes)

    stream = hf_tensors()
    for file_name, tensors in zip(names, shards, strict=True):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": safetensors_dtype[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        with open(os.path.join(target, file_name), "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name, shape, dtype in tensors:
                got_name, array = next(stream)
                if "model." + got_name != name or array.shape != shape or array.dtype != dtype:
                    raise RuntimeError(f"HF writer out of step: got {got_name} {array.shape}, planned {name} {shape}")
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    for _ in stream:  # the remaining (unstored) leaves: drives progress and the source's own final checks
        pass
    if len(names) > 1:
        weight_map = {
            name: file_name for file_name, tensors in zip(names, shards, strict=True) for name, _, _ in tensors
        }
        total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        with open(os.path.join(target, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    source.config.save_json(os.path.join(target, "config.json"))
    return f"HF safetensors, {len(names)} file{'s' if len(names) > 1 else ''}"


def write_orbax(target: str, source: Source, layout: str = "nested", progress=None) -> str:
    """The official tree as an orbax checkpoint (OCDBT, as published), plus config.json for our loader."""
    from gemma4_jax import sources
    from gemma4_jax.model import tree_set

    tree: dict = {}
    for path, value in source.leaves():
        tree_set(tree, path, value)
        if progress:
            progress.advance(value.nbytes)
    sources.save_orbax(target, tree, layout, source.config)
    source.config.save_json(os.path.join(target, "config.json"))
    return f"orbax checkpoint ({layout} layout, OCDBT)"
