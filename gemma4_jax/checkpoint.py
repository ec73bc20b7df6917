"""Hugging Face format: `config.json` + `*.safetensors` <-> the official Flax parameter tree (spec §5.3).

Every tensor has one mapping entry (JAX path, HF names, transform both ways), built from the config, so
loading and saving are the same table read in two directions. Loading reads one tensor at a time
(memory-mapped safetensors) and converts it straight to the requested dtype.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import Params, param_shapes, tree_get, tree_set

_TEXT_PREFIXES = ("model.language_model.", "model.")
# Parts of a multimodal checkpoint that are not the text decoder (their own loaders read them).
_OTHER_PARTS = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.", "lm_head.")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One JAX leaf <-> one or more HF tensors."""

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    from_hf: Callable[..., np.ndarray]
    # Reader-layer K/V: in the official tree, absent from HF files written by transformers; zeros if missing.
    optional: bool = False


def _copy(path, name, optional=False):
    return Entry(path, (name,), lambda w: (w,), lambda w: w, optional)


def _transposed(path, name):
    return Entry(path, (name,), lambda w: (w.T,), lambda w: w.T)


def mapping(config: Gemma4Config) -> list[Entry]:
    """The full JAX <-> HF table for `config` (HF names without the `model.` prefix)."""
    cfg = config
    n_layers, p = cfg.num_layers, cfg.per_layer_input_dim
    entries = [
        _copy(("embedder", "input_embedding"), "embed_tokens.weight"),
        _copy(("final_norm", "scale"), "norm.weight"),
    ]
    if p:
        entries += [
            Entry(
                ("embedder", "per_layer_embeddings"),
                ("embed_tokens_per_layer.weight",),
                lambda w: (w.reshape(w.shape[0], -1),),
                lambda w: w.reshape(w.shape[0], n_layers, p),
            ),
            Entry(
                ("embedder", "per_layer_model_projection", "w"),
                ("per_layer_model_projection.weight",),
                lambda w: (w.reshape(w.shape[0], -1).T,),
                lambda w: w.T.reshape(-1, n_layers, p),
            ),
            _copy(("embedder", "per_layer_projection_norm", "scale"), "per_layer_projection_norm.weight"),
        ]
    for i in range(n_layers):
        entries += _layer_entries(cfg, i)
    return entries


def _layer_entries(cfg: Gemma4Config, i: int) -> list[Entry]:
    def jp(*path):
        return (f"layer_{i}", *path)

    hf = f"layers.{i}."
    n, h, k_heads = cfg.num_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
    reader = cfg.is_kv_reader(i)

    def heads_in(path, name, heads, optional=False):
        # [heads, D, H] <-> Linear weight [heads*H, D]
        return Entry(
            path,
            (name,),
            lambda w: (w.transpose(0, 2, 1).reshape(-1, w.shape[1]),),
            lambda w: w.reshape(heads, h, -1).transpose(0, 2, 1),
            optional,
        )

    entries = [
        _copy(jp("pre_attention_norm", "scale"), hf + "input_layernorm.weight"),
        _copy(jp("post_attention_norm", "scale"), hf + "post_attention_layernorm.weight"),
        _copy(jp("post_ffw_norm", "scale"), hf + "post_feedforward_layernorm.weight"),
        _copy(jp("skip_scale"), hf + "layer_scalar"),
        heads_in(jp("attn", "q_einsum", "w"), hf + "self_attn.q_proj.weight", n),
        _copy(jp("attn", "query_norm", "scale"), hf + "self_attn.q_norm.weight"),
        _copy(jp("attn", "key_norm", "scale"), hf + "self_attn.k_norm.weight", optional=reader),
        Entry(
            jp("attn", "attn_vec_einsum", "w"),
            (hf + "self_attn.o_proj.weight",),
            lambda w: (w.reshape(-1, w.shape[2]).T,),
            lambda w: w.T.reshape(n, h, -1),
        ),
    ]
    if cfg.layer_k_eq_v(i):
        entries.append(heads_in(jp("attn", "k_einsum", "w"), hf + "self_attn.k_proj.weight", k_heads, reader))
    else:
        to_linear = lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1])  # noqa: E731
        from_linear = lambda w: w.reshape(k_heads, h, -1).transpose(0, 2, 1)  # noqa: E731
        entries.append(
            Entry(
                jp("attn", "kv_einsum", "w"),
                (hf + "self_attn.k_proj.weight", hf + "self_attn.v_proj.weight"),
                lambda w: (to_linear(w[0]), to_linear(w[1])),
                lambda k, v: np.stack([from_linear(k), from_linear(v)]),
                optional=reader,
            )
        )

    def geglu(scope, hf_mlp):
        return [
            Entry(
                jp(scope, "gating_einsum"),
                (hf + hf_mlp + "gate_proj.weight", hf + hf_mlp + "up_proj.weight"),
                lambda w: (w[0], w[1]),
                lambda gate, up: np.stack([gate, up]),
            ),
            _transposed(jp(scope, "linear"), hf + hf_mlp + "down_proj.weight"),
        ]

    if cfg.num_experts:
        e, f = cfg.num_experts, cfg.expert_hidden
        entries += geglu("mlp2", "mlp.")
        entries += [
            _copy(jp("pre_ffw2_norm", "scale"), hf + "pre_feedforward_layernorm.weight"),
            _copy(jp("post_ffw2_norm", "scale"), hf + "post_feedforward_layernorm_1.weight"),
            _copy(jp("pre_ffw_norm", "scale"), hf + "pre_feedforward_layernorm_2.weight"),
            _copy(jp("post_ffw1_norm", "scale"), hf + "post_feedforward_layernorm_2.weight"),
            Entry(
                jp("mlp", "gating_einsum", "w"),
                (hf + "experts.gate_up_proj",),
                lambda w: (w.reshape(e, 2 * f, -1),),
                lambda w: w.reshape(e, 2, f, -1),
            ),
            Entry(
                jp("mlp", "linear", "w"),
                (hf + "experts.down_proj",),
                lambda w: (w.transpose(0, 2, 1),),
                lambda w: w.transpose(0, 2, 1),
            ),
            _transposed(jp("mlp", "router_logits", "w"), hf + "router.proj.weight"),
            _copy(jp("mlp", "router_scale"), hf + "router.scale"),
            _copy(jp("mlp", "per_expert_scale"), hf + "router.per_expert_scale"),
        ]
    else:
        entries += geglu("mlp", "mlp.")
        entries.append(_copy(jp("pre_ffw_norm", "scale"), hf + "pre_feedforward_layernorm.weight"))
    if cfg.per_layer_input_dim:
        entries += [
            _transposed(jp("per_layer_input_gate", "w"), hf + "per_layer_input_gate.weight"),
            _transposed(jp("per_layer_projection", "w"), hf + "per_layer_projection.weight"),
            _copy(jp("post_per_layer_input_norm", "scale"), hf + "post_per_layer_input_norm.weight"),
        ]
    return entries


def params_to_hf(config: Gemma4Config, params: Params, prefix: str = "model.") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every tensor, one at a time (reader-layer K/V are not written)."""
    for entry in mapping(config):
        if entry.optional:
            continue
        for name, array in zip(entry.hf_names, entry.to_hf(np.asarray(tree_get(params, entry.path))), strict=True):
            yield prefix + name, np.ascontiguousarray(array)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def params_from_hf(
    config: Gemma4Config, read: Callable[[str], np.ndarray | None], dtype=jnp.bfloat16, source: str = "checkpoint"
) -> Params:
    """Builds the parameter tree from HF tensors. `read(name)` returns an array or None if absent."""
    params: Params = {}
    for path, value in hf_to_nested(config, read, dtype, source):
        tree_set(params, path, jnp.asarray(value))
    return params


def hf_to_nested(
    config: Gemma4Config, read: Callable[[str], np.ndarray | None], dtype=jnp.bfloat16, source: str = "checkpoint"
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(official-tree path, numpy array) for every parameter, one at a time; `dtype=None` keeps stored dtypes.

    Absent reader-layer K/V come back as zeros (in the dtype of the tensor read before them)."""
    shapes = param_shapes(config)
    target = None if dtype is None else _np_dtype(dtype)
    missing = []
    last_dtype = target or np.dtype(np.float32)
    for entry in mapping(config):
        expected = tree_get(shapes, entry.path).shape
        arrays = [read(name) for name in entry.hf_names]
        if any(a is None for a in arrays):
            if not entry.optional:
                missing += [n for n, a in zip(entry.hf_names, arrays, strict=True) if a is None]
                continue
            value = np.zeros(expected, target or last_dtype)
        else:
            try:
                value = entry.from_hf(*arrays)
            except ValueError:
                value = None
            if value is None or value.shape != expected:
                got = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(entry.hf_names, arrays, strict=True))
                raise Gemma4Error(
                    f"{source}: shape mismatch for {'/'.join(entry.path)}: file has {got}, config expects {expected}"
                )
            last_dtype = value.dtype
        yield entry.path, value if target is None else value.astype(target, copy=False)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise Gemma4Error(f"{source}: missing tensors {', '.join(missing[:3])}{more}")


_SAFETENSORS_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
}


class SafetensorsDir:
    """All `*.safetensors` files of a directory as one name -> array mapping, read one tensor at a time.

    Tensors are read with plain file reads (no memory map), so after a tensor has been converted and handed
    to JAX nothing of the file stays resident: loading peaks near one copy of the weights.
    """

    def __init__(self, path: str):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise Gemma4Error(f"{path}: no *.safetensors files (expected an HF checkpoint directory)")
        self._where: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, data start)
        for file in files:
            header, data_start = self._read_header(file)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = (file, entry, data_start)

    @staticmethod
    def _read_header(file: str) -> tuple[dict, int]:
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 2 <= header_len <= size - 8:
                    raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
                header = json.loads(f.read(header_len))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise Gemma4Error(f"{file}: not a readable safetensors file ({e})") from None
        # A truncated file can still have a valid header: check the data size the header promises.
        if size < 8 + header_len + max(ends, default=0):
            raise Gemma4Error(f"{file}: truncated ({size} bytes, header needs {8 + header_len + max(ends)})")
        return header, 8 + header_len

    def names(self) -> list[str]:
        return list(self._where)

    def text_prefix(self) -> str:
        """Where the text model's tensors are: `model.` (Gemma4ForCausalLM) or `model.language_model.`."""
        return text_prefix(self.names())

    def dtype(self, name: str) -> np.dtype | None:
        """The stored dtype of tensor `name` (None if absent), from the header alone."""
        if name not in self._where:
            return None
        code = self._where[name][1].get("dtype")
        if code not in _SAFETENSORS_DTYPES:
            raise Gemma4Error(f"{self._where[name][0]}: tensor {name} has unsupported dtype {code!r}")
        return _SAFETENSORS_DTYPES[code]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of tensor `name` (None if absent), from the header alone."""
        return tuple(self._where[name][1]["shape"]) if name in self._where else None

    def _locate(self, name: str) -> tuple[str, np.dtype, tuple[int, ...], int]:
        """(file, dtype, shape, absolute offset of the data) of a present tensor, its byte size checked."""
        file, entry, data_start = self._where[name]
        dtype = self.dtype(name)
        try:
            start, end = entry["data_offsets"]
            shape = tuple(int(n) for n in entry["shape"])
        except (KeyError, ValueError, TypeError) as e:
            raise Gemma4Error(f"{file}: cannot read tensor {name} ({e})") from None
        if end - start != math.prod(shape) * dtype.itemsize:
            raise Gemma4Error(f"{file}: cannot read tensor {name} ({end - start} bytes for shape {shape} of {dtype})")
        return file, dtype, shape, data_start + start

    def read(self, name: str) -> np.ndarray | None:
        """Tensor `name` (None if absent)."""
        if name not in self._where:
            return None
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a present tensor (along its first axis), without reading the rest."""
        file, dtype, shape, offset = self._locate(name)
        row = math.prod(shape[1:])
        with open(file, "rb") as f:
            f.seek(offset + start * row * dtype.itemsize)
            block = np.fromfile(f, dtype, (stop - start) * row)
        if block.size != (stop - start) * row:
            raise Gemma4Error(f"{file}: truncated while reading {name}")
        return block.reshape(stop - start, *shape[1:])

    def memmap(self, name: str) -> np.memmap:
        """A read-only memory map of a present tensor, in place in its file (safetensors stores each tensor as a
        plain little-endian C-order array)."""
        file, dtype, shape, offset = self._locate(name)
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)


def text_prefix(names: list[str]) -> str:
    for prefix in _TEXT_PREFIXES:
        if any(n.startswith(prefix + "embed_tokens.weight") for n in names):
            return prefix
    raise Gemma4Error("no text embedding tensor (model[.language_model].embed_tokens.weight) in the checkpoint")


def open_hf_checkpoint(
    path: str, config: Gemma4Config | None = None
) -> tuple[Gemma4Config, Callable[[str], np.ndarray | None], list[str]]:
    """(config, read(name without prefix), names of the non-text tensors) of an HF directory, checked: every
    text tensor belongs to the config (`config.json`, or `config` if given). Nothing is read yet."""
    if not os.path.isdir(path):
        raise Gemma4Error(f"checkpoint directory not found: {path}")
    hint = "does the given --variant/--config match the weights?" if config else "does config.json match the weights?"
    if config is None:
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise Gemma4Error(f"{path}: missing config.json (expected an HF checkpoint directory)")
        config = Gemma4Config.load_json(config_path, name=os.path.basename(os.path.normpath(path)))
    files = SafetensorsDir(path)
    names = files.names()
    prefix = text_prefix(names)
    known = {prefix + n for entry in mapping(config) for n in entry.hf_names}
    # Reader layers' K/V, which the official converter writes, are in the mapping (as optional) and load.
    unexpected = [n for n in names if n not in known and not n.startswith(_OTHER_PARTS)]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise Gemma4Error(
            f"{path}: tensors not in a {config.num_layers}-layer config: {', '.join(sorted(unexpected)[:3])}{more}"
            f" — {hint}"
        )
    # lm_head is tied to the embedding (a copy, when written at all): not "other" weights.
    other = [n for n in names if n.startswith(_OTHER_PARTS) and not n.startswith("lm_head.")]
    return config, lambda name: files.read(prefix + name), other


def load_hf_checkpoint(
    path: str, dtype=jnp.bfloat16, config: Gemma4Config | None = None
) -> tuple[Gemma4Config, Params]:
    """Loads `config.json` (or `config`) + `*.safetensors` (as `save_pretrained` writes them) into the official
    tree."""
    config, read, _ = open_hf_checkpoint(path, config)
    return config, params_from_hf(config, read, dtype, source=path)


def save_hf_checkpoint(path: str, config: Gemma4Config, params: Params) -> None:
    """Writes `config.json` + `model.safetensors` that transformers' `Gemma4ForCausalLM` loads. Atomic per file."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = dict(params_to_hf(config, jax.device_get(params)))
    atomic_write(
        os.path.join(path, "model.safetensors"), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    atomic_write(os.path.join(path, "config.json"), lambda tmp: config.save_json(tmp))


def atomic_write(dest: str, write: Callable[[str], None]) -> None:
    """Writes through `write(tmp_path)` next to `dest`, then renames: a crash never leaves a partial `dest`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".tmp-", suffix="-" + os.path.basename(dest))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
