"""Official orbax (Flax) checkpoints <-> HF safetensors, lossless, either direction (`gemma4-jax convert`).

Values and dtypes are copied as stored (bf16 stays bf16, f32 stays f32); only layouts change (spec §5.3). HF output
is written tensor by tensor (peak: one tensor); orbax output needs the whole tree in memory once, because orbax
writes a checkpoint in one call. The output directory appears only when complete (`files.atomic_output`).
"""

from __future__ import annotations

import os
import time

from gemma4_jax import files, sources
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import tree_set

TARGETS = ("hf", "orbax")
ORBAX_LAYOUTS = ("nested", "flat")


def convert(source: sources.WeightSource, out: str, to: str, *, layout: str = "nested", text_only: bool = False) -> str:
    """Writes `source` to the new directory `out` as `to` ("hf" or "orbax" in `layout`), tokenizer files along.
    Returns a one-line summary."""
    from gemma4_jax.quant.checkpoint import QuantizedSource

    start = time.perf_counter()
    if to not in TARGETS:
        raise Gemma4Error(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if layout not in ORBAX_LAYOUTS:
        raise Gemma4Error(f"--layout must be one of {', '.join(ORBAX_LAYOUTS)}, got {layout!r}")
    if layout != "nested" and to != "orbax":
        raise Gemma4Error("--layout applies to --to orbax")
    if isinstance(source, QuantizedSource | sources.RandomSource):
        raise Gemma4Error(f"convert copies stored weights losslessly; {source.description} has none to copy")
    if source.other and not text_only:  # a lossless copy may not drop what it cannot map
        more = f" (and {len(source.other) - 1} more)" if len(source.other) > 1 else ""
        raise Gemma4Error(
            f"{source.description} has tensors outside the parameter spec ({source.other[0]}{more}), which convert "
            "cannot map; pass --text-only to convert the text decoder alone"
        )
    out = files.check_output(out, directory=True)
    stored = {leaf.path: source.dtype(leaf) for leaf in source.leaves() if source.has(leaf)}
    progress = files.Progress(f"converting {source.config.name}", source.nbytes(), min_total=10**8)
    with files.atomic_output(out, directory=True) as tmp:
        leaves = sources.iterate(source, progress=progress)
        if to == "hf":
            names = write_hf_from(tmp, source, stored, leaves)
            what = f"HF safetensors, {len(names)} file{'s' if len(names) > 1 else ''}"
        else:
            write_orbax_from(tmp, source, leaves, layout)
            what = f"orbax checkpoint ({layout} layout, OCDBT)"
        copied = sources.copy_tokenizer_files(source, tmp)
    progress.close()
    dtypes = ", ".join(sorted({str(d) for d in stored.values()}))
    extra = f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer files in the source"
    return (
        f"wrote {out}: {what} ({source.config.name}, {len(stored)} tensors, {files.human_bytes(source.nbytes())}, "
        f"{dtypes}){extra}; {time.perf_counter() - start:.1f} s"
    )


def write_hf_from(directory: str, source: sources.WeightSource, stored: dict, leaves) -> list[str]:
    """The HF files of `leaves` (the stored ones; zero reader K/V are not part of the HF format)."""
    from gemma4_jax.hf_format import write_hf

    return write_hf(directory, source.config, stored, leaves)


def write_orbax_from(directory: str, source: sources.WeightSource, leaves, layout: str) -> None:
    """The official tree as an orbax checkpoint (OCDBT, as published), plus config.json for our loader."""
    from gemma4_jax import orbax_format

    tree: dict = {}
    for leaf, value in leaves:
        tree_set(tree, leaf.path, value)
    target = os.path.join(directory, "ckpt")  # orbax creates its own directory; ours holds it until renamed
    orbax_format.save_orbax(target, tree, layout, source.config)
    del tree
    for name in os.listdir(target):
        os.rename(os.path.join(target, name), os.path.join(directory, name))
    os.rmdir(target)
    source.config.save_json(os.path.join(directory, "config.json"))
