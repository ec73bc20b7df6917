"""The Per-Layer Embedding table kept off the accelerator (spec §2.4).

E2B's PLE table `embedder/per_layer_embeddings` [V, L, P] has 2.35 B parameters, more than the rest of the
text model, yet each token reads only its own row of L·P values. `HostPLE` keeps the table in host RAM (a
numpy array) or memory-mapped from disk (the tensor inside a safetensors file, or a `.npy`), gathers the rows
of the current tokens on the host and hands the device only `[B, T, L, P]` — what `model.apply(...,
per_layer_tokens=rows)` consumes. The sampler does this for the prompt and for every decoded token.

A `HostPLE` may also stand in the parameter tree where the table was (`place_table`): it is a lookup-only
weight object, so `model.apply` with such a tree gathers its rows through a host callback and every command
that takes a parameter tree keeps working.
"""

from __future__ import annotations

import functools
import glob
import itertools
import os
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error

TABLE_PATH = ("embedder", "per_layer_embeddings")
HF_TABLE_NAME = "embed_tokens_per_layer.weight"  # after the model[.language_model]. prefix
PLE_MODES = ("device", "host", "mmap")


class HostPLE:
    """The PLE table [V, L, P] outside the device parameters.

    `table` is a numpy array (host RAM) or a read-only `np.memmap`; the HF packed layout [V, L·P] is accepted
    too (it is layer-major, so the reshape is a view and a memory map stays a memory map).
    """

    def __init__(self, table: np.ndarray, config: Gemma4Config, source: str = "host RAM"):
        v, n_layers, p = config.vocab_size, config.num_layers, config.per_layer_input_dim
        if not p:
            raise Gemma4Error(f"{config.name} has no Per-Layer Embeddings")
        if tuple(table.shape) == (v, n_layers * p):
            table = table.reshape(v, n_layers, p)
        if tuple(table.shape) != (v, n_layers, p):
            raise Gemma4Error(
                f"{source}: PLE table of shape {tuple(table.shape)}, {config.name} expects {(v, n_layers, p)}"
            )
        self.table = table
        self.config = config
        self.source = source
        # jit sees only this key (pytree aux data, and the callback's argument), never the table: a compiled
        # forward does not keep a table alive after its HostPLE is gone.
        self.key = next(_KEYS)
        _TABLES[self.key] = self

    @classmethod
    def from_npy(cls, path: str, config: Gemma4Config) -> HostPLE:
        """Memory-maps a `.npy` file (written by `save_npy`)."""
        try:
            table = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise Gemma4Error(f"{path}: cannot memory-map the PLE table ({e})") from None
        return cls(table, config, source=path)

    @classmethod
    def from_safetensors(cls, checkpoint_dir: str, config: Gemma4Config) -> HostPLE:
        """Memory-maps the table in place inside an HF checkpoint's safetensors file: no copy, no conversion.

        safetensors stores each tensor as a plain little-endian C-order array at a known offset, so the file
        bytes are the array.
        """
        from gemma4_jax.files import SafetensorsDir
        from gemma4_jax.hf_format import text_prefix

        st = SafetensorsDir(checkpoint_dir)
        name = text_prefix(st.names()) + HF_TABLE_NAME
        if name not in st:
            raise Gemma4Error(f"{checkpoint_dir}: no PLE table ({name}) in the safetensors files")
        table = st.memmap(name)
        return cls(table, config, source=f"{table.filename} (memory-mapped)")

    # ----- the host side ------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.table.shape)

    @property
    def dtype(self):
        return self.table.dtype

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)

    @property
    def memory_mapped(self) -> bool:
        return isinstance(self.table, np.memmap)

    def rows(self, tokens) -> np.ndarray:
        """[...] token ids -> [..., L, P] rows in the table's dtype. Ids outside the vocabulary (multimodal
        placeholders) read the pad row 0, as `model.per_layer_token_ids` does on the device."""
        ids = np.asarray(tokens)
        ids = np.where((ids >= 0) & (ids < self.config.vocab_size), ids, 0)
        # np.take on a memory map reads only the pages of these rows.
        return np.asarray(np.take(self.table, ids, axis=0))

    def save_npy(self, path: str) -> None:
        """Writes the table [V, L, P] as a `.npy` that `from_npy` memory-maps (atomic)."""
        from gemma4_jax.files import atomic_output

        if not path.endswith(".npy"):
            raise Gemma4Error(f"{path}: the PLE table file must end in .npy")
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.save(f, self.table)

    # ----- as a weight object inside a parameter tree (model.py, "weights") ----------------------------

    def take(self, ids, dtype):
        """Rows of `ids` inside a jitted forward: gathered on the host by a callback, only the rows go to the
        device."""
        out = jax.ShapeDtypeStruct((*ids.shape, *self.shape[1:]), self.dtype)
        gather = functools.partial(_gather_rows, self.key)
        return jax.pure_callback(gather, out, ids, vmap_method="expand_dims").astype(dtype)

    def materialize(self, dtype):
        """The whole table as a device array (what keeping it off the device avoids; for conversions only)."""
        return jnp.asarray(self.table).astype(dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.table, dtype)

    def __repr__(self) -> str:
        return f"HostPLE({self.shape}, {self.dtype}, {self.source})"


_KEYS = itertools.count()
_TABLES: weakref.WeakValueDictionary[int, HostPLE] = weakref.WeakValueDictionary()


def _gather_rows(key: int, ids):
    return _TABLES[key].rows(ids)


# No array leaves, so jit never transfers the table; its key is the aux data (each HostPLE compiles once).
jax.tree_util.register_pytree_node(HostPLE, lambda host: ((), host.key), lambda key, _: _TABLES[key])


def split_table(params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(params without the PLE table, the table or None). The caller's tree is not modified."""
    embedder = params.get(TABLE_PATH[0], {})
    if TABLE_PATH[1] not in embedder:
        return params, None
    rest = {k: v for k, v in embedder.items() if k != TABLE_PATH[1]}
    return {**params, TABLE_PATH[0]: rest}, embedder[TABLE_PATH[1]]


def host_table(source, mode: str) -> HostPLE:
    """The PLE table of a `sources.WeightSource` off the device: read into host RAM ("host") or memory-mapped from
    the HF checkpoint's safetensors file ("mmap")."""
    from gemma4_jax import param_spec

    if mode == "mmap":
        return HostPLE.from_safetensors(source.directory, source.config)
    return HostPLE(source.read(param_spec.leaf_of(source.config, TABLE_PATH)), source.config)


def place_table(config: Gemma4Config, params: dict[str, Any], mode: str, checkpoint_dir: str | None = None):
    """The parameter tree with its PLE table where `mode` says: "device" (unchanged), "host" (a numpy array in
    RAM) or "mmap" (memory-mapped from the checkpoint's safetensors file). Off the device, the table leaf is a
    `HostPLE`; the device copy is freed once the caller drops the tree it passed in."""
    if mode not in PLE_MODES:
        raise Gemma4Error(f"--ple must be one of {', '.join(PLE_MODES)}, got {mode!r}")
    if mode == "device":
        return params
    if not config.per_layer_input_dim:
        raise Gemma4Error(f"--ple {mode}: {config.name} has no Per-Layer Embeddings table")
    rest, table = split_table(params)
    if table is None:
        raise Gemma4Error("the parameters have no PLE table to move off the device")
    if isinstance(table, HostPLE):
        host = table
    elif mode == "host":
        # On an accelerator this copies to host RAM; on the CPU backend it is a view of the same buffer (the
        # device already is host RAM), so the table never exists twice.
        host = HostPLE(np.asarray(table), config)
    else:
        if checkpoint_dir is None or not glob.glob(os.path.join(checkpoint_dir, "*.safetensors")):
            raise Gemma4Error(
                "--ple mmap memory-maps the table from an HF checkpoint's safetensors file: give --checkpoint with "
                "one (`gemma4-jax convert` writes one from an orbax checkpoint)"
            )
        host = HostPLE.from_safetensors(checkpoint_dir, config)
    return {**rest, TABLE_PATH[0]: {**rest[TABLE_PATH[0]], TABLE_PATH[1]: host}}
