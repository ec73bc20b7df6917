"""The Hugging Face format: `config.json` + `*.safetensors` <-> the official Flax parameter tree (spec §5.2, §5.3).

The names, shapes and transforms of every tensor come from the parameter spec (`gemma4_jax.param_spec`), so
loading and saving read one table in two directions. Loading reads one tensor at a time and converts it straight to
the requested dtype; saving streams tensor by tensor into shards, so neither holds a second copy of the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemma4_jax import files, param_spec
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.files import SafetensorsDir
from gemma4_jax.model import Params, tree_get, tree_set
from gemma4_jax.param_spec import Leaf, Path
from gemma4_jax.sources import WeightSource

TEXT_PREFIXES = ("model.language_model.", "model.")
# Parts of a multimodal checkpoint that are not the text decoder (their own loaders read them).
OTHER_PARTS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.", "lm_head.")
CONFIG_FILE = "config.json"
# transformers' own default shard size: files stay below it, one tensor never straddles two.
MAX_SHARD_BYTES = 5 * 10**9


def np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def text_prefix(names: Iterable[str]) -> str:
    """Where the text model's tensors are: `model.` (Gemma4ForCausalLM) or `model.language_model.` (multimodal)."""
    names = list(names)
    for prefix in TEXT_PREFIXES:
        if any(n == prefix + "embed_tokens.weight" for n in names):
            return prefix
    raise Gemma4Error("no text embedding tensor (model[.language_model].embed_tokens.weight) in the checkpoint")


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(n.endswith(".safetensors") for n in os.listdir(path))


# ----- names ------------------------------------------------------------------------------------------------


def text_prefix_of(config: Gemma4Config) -> str:
    """Where a checkpoint we write keeps the text model: under `model.language_model.` in a multimodal
    `Gemma4ForConditionalGeneration`, under `model.` in a text-only `Gemma4ForCausalLM`."""
    return TEXT_PREFIXES[0] if config.multimodal else TEXT_PREFIXES[1]


def full_name(leaf: Leaf, name: str, text_prefix: str) -> str:
    """A leaf's HF tensor name in a checkpoint: text tensors under the text prefix, the encoders' under `model.`."""
    return (text_prefix if leaf.part == "text" else "model.") + name


# ----- reading -----------------------------------------------------------------------------------------------


def params_to_hf(
    config: Gemma4Config, params: Params, text_prefix: str | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (full HF name, array) for every tensor, one at a time (reader-layer K/V are not written)."""
    prefix = text_prefix_of(config) if text_prefix is None else text_prefix
    for leaf in param_spec.param_spec(config):
        if not leaf.unused:
            for name, array in zip(leaf.hf, leaf.to_hf(np.asarray(tree_get(params, leaf.path))), strict=True):
                yield full_name(leaf, name, prefix), np.ascontiguousarray(array)


def params_from_hf(
    config: Gemma4Config,
    read: Callable[[str], np.ndarray | None],
    dtype=None,
    *,
    text_prefix: str | None = None,
    parts=param_spec.PARTS,
    source: str = "checkpoint",
) -> Params:
    """The official tree (of the given `parts`) from HF tensors: `read(full name)` returns an array or None if
    absent (absent unused reader K/V become zeros). `dtype=None` keeps the stored dtypes."""
    prefix = text_prefix_of(config) if text_prefix is None else text_prefix
    params: Params = {}
    missing = []
    for leaf in param_spec.param_spec(config):
        if leaf.part not in parts:
            continue
        names = [full_name(leaf, n, prefix) for n in leaf.hf]
        arrays = [read(n) for n in names]
        if any(a is None for a in arrays):
            if not leaf.unused:
                missing += [n for n, a in zip(names, arrays, strict=True) if a is None]
                continue
            value = np.zeros(leaf.shape, np.float32)
        else:
            try:
                value = leaf.from_hf(*[np.asarray(a) for a in arrays])
            except ValueError as e:
                raise Gemma4Error(f"{source}: shape mismatch for {leaf.name}: {e}; does the config match?") from None
        tree_set(params, leaf.path, jnp.asarray(value if dtype is None else value.astype(np_dtype(dtype))))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise Gemma4Error(f"{source}: missing tensors {', '.join(missing[:3])}{more}")
    return params


def read_config(path: str, config: Gemma4Config | None = None) -> Gemma4Config:
    """`config` if given, else the directory's config.json."""
    if config is not None:
        return config
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise Gemma4Error(f"{path}: missing config.json (expected an HF checkpoint directory)")
    return Gemma4Config.load_json(config_path, name=os.path.basename(os.path.normpath(path)))


def open_hf_checkpoint(
    path: str, config: Gemma4Config | None = None, text_only: bool = False
) -> tuple[Gemma4Config, SafetensorsDir, str, list[str]]:
    """(config, files, text prefix, names of the tensors not read) of an HF directory, checked: every tensor belongs
    to the config (`config.json`, or `config` if given). `text_only` drops the config's encoders, and their tensors
    stay unread. Nothing is read yet."""
    if not os.path.isdir(path):
        raise Gemma4Error(f"checkpoint directory not found: {path}")
    hint = "does the given --variant/--config match the weights?" if config else "does config.json match the weights?"
    config = read_config(path, config)
    if text_only:
        config = config.text_only()
    st = SafetensorsDir(path)
    names = st.names()
    prefix = text_prefix(names)
    known = {full_name(leaf, n, prefix) for leaf in param_spec.param_spec(config) for n in leaf.hf}
    # Reader layers' K/V, which the official converter writes, are in the spec (as unused) and load.
    unexpected = [n for n in names if n not in known and not n.startswith(OTHER_PARTS)]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise Gemma4Error(
            f"{path}: tensors not in a {config.num_layers}-layer config: {', '.join(sorted(unexpected)[:3])}{more}"
            f" — {hint}"
        )
    # lm_head is tied to the embedding (a copy, when written at all): not "other" weights.
    other = [n for n in names if n not in known and not n.startswith("lm_head.")]
    return config, st, prefix, other


def load_hf_checkpoint(
    path: str, dtype=jnp.bfloat16, config: Gemma4Config | None = None
) -> tuple[Gemma4Config, Params]:
    """Loads `config.json` (or `config`) + `*.safetensors` (as `save_pretrained` writes them) into the official
    tree."""
    config, st, prefix, _ = open_hf_checkpoint(path, config)
    return config, params_from_hf(config, st.read, dtype, text_prefix=prefix, source=path)


class HFSource(WeightSource):
    """An HF checkpoint directory read leaf by leaf (and row block by row block, for streaming exports)."""

    def __init__(self, path: str, config: Gemma4Config | None = None, text_only: bool = False):
        config, self.files, self.prefix, other = open_hf_checkpoint(path, config, text_only)
        super().__init__(config, f"checkpoint {path}", os.path.abspath(path), other)
        self.path = path
        missing = [
            name for leaf in self.leaves() if not leaf.unused for name in self._names(leaf) if name not in self.files
        ]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            hint = "; --text-only loads the text model alone" if self.config.multimodal else ""
            raise Gemma4Error(f"{path}: missing tensors {', '.join(missing[:3])}{more}{hint}")
        for leaf in self.leaves():
            for name, want in zip(self._names(leaf), leaf.hf_shapes, strict=True):
                got = self.files.shape(name)
                if got is not None and got != want:
                    raise Gemma4Error(
                        f"{path}: shape mismatch for {leaf.name}: {name} has shape {got}, expected {want}; "
                        "does the config match?"
                    )
                dtype = self.files.dtype(name)
                if dtype is not None and dtype not in files.FLOAT_DTYPES:
                    raise Gemma4Error(f"{path}: tensor {name} has dtype {dtype}, expected a float type")

    def _names(self, leaf: Leaf) -> list[str]:
        return [full_name(leaf, n, self.prefix) for n in leaf.hf]

    def has(self, leaf: Leaf) -> bool:
        return all(n in self.files for n in self._names(leaf))

    def dtype(self, leaf: Leaf) -> np.dtype:
        if self.has(leaf):
            return np.result_type(*[self.files.dtype(n) for n in self._names(leaf)])
        return self.dtype(param_spec.leaf_of(self.config, (leaf.path[0], "attn", "q_einsum", "w")))

    def read(self, leaf: Leaf, dtype=None) -> np.ndarray:
        target = np_dtype(dtype) if dtype is not None else self.dtype(leaf)
        if not self.has(leaf):  # unused reader K/V, not written by transformers
            return np.zeros(leaf.shape, target)
        # The HF tensors are read into aligned buffers; a transposed or converted leaf gets one more.
        return files.as_aligned(leaf.from_hf(*[self.files.read(n) for n in self._names(leaf)]), target)

    def hf_rows(self, leaf: Leaf, index: int, start: int, stop: int) -> np.ndarray:
        return self.files.read_rows(self._names(leaf)[index], start, stop)


# ----- writing -----------------------------------------------------------------------------------------------


def write_hf(
    directory: str,
    config: Gemma4Config,
    dtypes: dict[Path, np.dtype],
    leaves: Iterable[tuple[Leaf, np.ndarray]],
    progress: files.Progress | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Writes config.json and the safetensors shard(s) (+ index when sharded) into the existing `directory`, tensor
    by tensor in one pass, named as transformers' `Gemma4ForCausalLM` (text-only configs) or
    `Gemma4ForConditionalGeneration` (with encoders) names them. `dtypes` names the leaves to write and their stored
    dtype; `leaves` yields every spec leaf in spec order (those not in `dtypes` are read past). Returns the weight
    file names."""
    prefix = text_prefix_of(config)
    plan: list[tuple[str, tuple[int, ...], np.dtype]] = []
    for leaf in param_spec.param_spec(config):
        if leaf.path in dtypes:
            plan += [
                (full_name(leaf, n, prefix), s, np.dtype(dtypes[leaf.path]))
                for n, s in zip(leaf.hf, leaf.hf_shapes, strict=True)
            ]
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for tensor in plan:
        nbytes = math.prod(tensor[1]) * tensor[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    def hf_tensors():
        for leaf, value in leaves:
            if leaf.path in dtypes:
                value = np.asarray(value).astype(dtypes[leaf.path], copy=False)
                yield from ((full_name(leaf, n, prefix), a) for n, a in zip(leaf.hf, leaf.to_hf(value), strict=True))
            if progress:
                progress.advance(value.nbytes)

    stream = hf_tensors()
    for file_name, tensors in zip(names, shards, strict=True):
        with files.SafetensorsWriter(os.path.join(directory, file_name), tensors) as writer:
            for _ in tensors:
                name, array = next(stream)
                writer.write(name, array)
    for _ in stream:  # the remaining (unwritten) leaves: drives progress and the source's own final checks
        pass
    if len(names) > 1:
        weight_map = {n: f for f, tensors in zip(names, shards, strict=True) for n, _, _ in tensors}
        total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        files.write_json(
            os.path.join(directory, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    config.save_json(os.path.join(directory, CONFIG_FILE))
    return names


def save_hf_checkpoint(path: str, config: Gemma4Config, params: Params, dtype=None) -> None:
    """Writes `path` (a new or empty directory, atomically) with config.json + model.safetensors that transformers'
    `Gemma4ForCausalLM` (or, with encoders, `Gemma4ForConditionalGeneration`) loads. Leaves are stored in their
    own dtype, or `dtype`."""
    params = jax.device_get(params)
    dtypes = {}
    for leaf in param_spec.param_spec(config):
        if not leaf.unused:
            dtypes[leaf.path] = np_dtype(dtype) if dtype is not None else np.asarray(tree_get(params, leaf.path)).dtype
    leaves = ((leaf, np.asarray(tree_get(params, leaf.path))) for leaf in param_spec.param_spec(config))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_output(path, directory=True) as tmp:
        write_hf(tmp, config, dtypes, leaves)
