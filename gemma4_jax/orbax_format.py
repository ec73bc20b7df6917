"""The official Flax/orbax format (as published on Kaggle): reading it leaf by leaf, and writing it (spec §5.1).

Official orbax checkpoints come in three on-disk layouts, all read here as the NESTED tree `model.apply` takes:
- NESTED: the Flax `model.init()['params']` tree itself (`layer_0/attn/q_einsum/w`, ...);
- FLAT: one level of `transformer/<module path>` keys holding `{leaf: array}` (`transformer/layer_0/attn/q_einsum`
  -> `{'w': ...}`); the dense MLP's `gating_einsum`/`linear` carry an extra `w` there that NESTED does not;
- STACKED: layers of the same position in the attention pattern stacked on a leading axis
  (`transformer/stacked_layers/attention_type_{j}/...`, layer = slice * pattern_length + j).
They carry no config: the variant is recognised from the tensor shapes (each tensor's TensorStore metadata; no data
is read), `--variant` forces one and `--config` gives an HF-style config.json for other sizes.

Each tensor is read on its own with TensorStore straight into a buffer of the requested dtype (the cast happens
chunk by chunk inside TensorStore), so loading peaks near one copy of the weights in that dtype. The buffers are
64-byte aligned, which lets JAX's CPU backend adopt them without another copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator

import numpy as np

from gemma4_jax import param_spec
from gemma4_jax.config import OFFICIAL_VARIANTS, PRESETS, Gemma4Config, get_config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.files import aligned_empty
from gemma4_jax.param_spec import Leaf
from gemma4_jax.sources import WeightSource

Path = tuple[str, ...]

_MULTIMODAL_EMBEDDER = ("mm_", "audio_")
_LAYER = re.compile(r"^layer_(\d+)$")
_STACKED = re.compile(r"^transformer/stacked_layers/attention_type_(\d+)(/.*)?$")

# ----- orbax checkpoints --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredLeaf:
    """Where one NESTED leaf lives in the checkpoint."""

    name: str  # orbax's parameter name (the TensorStore key)
    shape: tuple[int, ...]  # of the NESTED leaf (a STACKED slice drops the stacking axis)
    dtype: np.dtype
    index: int | None = None  # slice of a STACKED parameter


def _flatten(tree, prefix: Path = ()) -> Iterator[tuple[Path, object]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, (*prefix, str(key)))
    else:
        yield prefix, tree


def _is_text(path: Path) -> bool:
    if path[0] == "embedder":
        return len(path) > 1 and not path[1].startswith(_MULTIMODAL_EMBEDDER)
    return path[0] == "final_norm" or bool(_LAYER.match(path[0]))


def _tower_of(path: Path) -> str | None:
    """ "vision" / "audio" for a NESTED leaf of an encoder or its projection into the text width, else None."""
    if path[0] == "vision_encoder" or path[:2] == ("embedder", "mm_input_projection"):
        return "vision"
    if path[0] == "audio_encoder" or path[:2] == ("embedder", "audio_input_projection"):
        return "audio"
    return None


def with_stored_towers(config: Gemma4Config, found) -> Gemma4Config:
    """`config` with just the encoders whose tensors the checkpoint has (a text-only checkpoint of a multimodal
    variant loads as its text decoder)."""
    present = {_tower_of(path) for path in found}
    return config.replace(
        vision=config.vision if "vision" in present else None, audio=config.audio if "audio" in present else None
    )


def _layout(top_keys: set[str]) -> str:
    if any(_STACKED.match(k) for k in top_keys):
        return "stacked"
    if top_keys and all(k.startswith(("transformer/", "SigLiPFromPatches_0/")) for k in top_keys):
        return "flat"
    return "nested"


def _drop_dense_mlp_w(raw: dict[Path, StoredLeaf]) -> dict[Path, StoredLeaf]:
    """FLAT/STACKED keep a `w` under the dense MLP's `gating_einsum`/`linear`; the NESTED tree has none there
    (the MoE's `mlp/gating_einsum/w` keeps it: a layer with a router is a MoE layer)."""
    moe_layers = {p[0] for p in raw if p[1:3] == ("mlp", "router_logits")}
    out = {}
    for path, leaf in raw.items():
        dense_mlp = len(path) == 4 and path[1] == "mlp" and path[2] in ("gating_einsum", "linear") and path[3] == "w"
        out[path[:-1] if dense_mlp and path[0] not in moe_layers else path] = leaf
    return out


class OrbaxSource(WeightSource):
    """An orbax checkpoint directory, seen as NESTED leaves read one at a time.

    `stored`: NESTED path -> StoredLeaf for every tensor of the text decoder and (NESTED layout) of the encoders;
    `other`: names of the tensors left unread (the encoders with `text_only`, and those of the FLAT / STACKED
    layouts, whose encoder naming the project does not map). The config is --config, --variant, a config.json of
    ours beside the tensors, or recognised from the shapes; it has the encoders the checkpoint has.
    """

    def __init__(
        self,
        path: str,
        variant: str | None = None,
        config_file: str | None = None,
        directory: str | None = None,
        text_only: bool = False,
    ):
        self.path = os.path.abspath(path)
        try:
            with open(os.path.join(self.path, "_METADATA")) as f:
                info = json.load(f)
            names = _tensor_names(info)
        except FileNotFoundError:
            raise Gemma4Error(f"{path}: not a readable orbax checkpoint (no _METADATA file)") from None
        except Exception as e:  # not JSON, or not orbax's tree metadata
            raise Gemma4Error(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
        if not names:
            raise Gemma4Error(f"{path}: not a readable orbax checkpoint (its tensor metadata is missing or damaged)")
        if {p[0] for p in names} == {"collections", "opt_state", "params", "step"}:  # a Kauldron training state
            names = {p[1:]: name for p, name in names.items() if p[0] == "params"}
        self._use_ocdbt = bool(info.get("use_ocdbt", True))
        self._use_zarr3 = bool(info.get("use_zarr3", False))
        self._stores = self._open_all(names.values())
        self.layout = _layout({p[0] for p in names})
        stacked_positions = [int(m.group(1)) for p in names if (m := _STACKED.match(p[0]))]
        self._pattern_length = 1 + max(stacked_positions, default=0)
        raw: dict[Path, StoredLeaf] = {}
        other: list[str] = []
        for stored_path, name in names.items():
            for nested, leaf in self._nested_leaves(stored_path, name):
                tower = _tower_of(nested) if nested and self.layout == "nested" else None
                if nested and (_is_text(nested) or (tower and not text_only)):
                    raw[nested] = leaf
                else:
                    other.append("/".join(stored_path))
        self.stored = _drop_dense_mlp_w(raw) if self.layout != "nested" else raw
        if not self.stored:
            raise Gemma4Error(f"{path}: the orbax checkpoint has no Gemma text-decoder tensors (embedder, layer_N)")
        config = self._config(variant, config_file)
        super().__init__(config, f"checkpoint {path}", directory or self.path, sorted(set(other)))

    def _nested_leaves(self, stored_path: Path, name: str) -> Iterator[tuple[Path, StoredLeaf]]:
        shape, dtype = tuple(self._stores[name].shape), self._stores[name].dtype.numpy_dtype
        if self.layout == "nested":
            yield stored_path, StoredLeaf(name, shape, dtype)
            return
        key, leaf_keys = stored_path[0], stored_path[1:]
        stacked = _STACKED.match(key)
        if stacked:
            position, rest = int(stacked.group(1)), [p for p in (stacked.group(2) or "").split("/") if p]
            period = self._pattern_length
            for i in range(shape[0]):
                path = (f"layer_{i * period + position}", *rest, *leaf_keys)
                yield path, StoredLeaf(name, shape[1:], dtype, index=i)
        elif key.startswith("transformer/"):
            yield (*key.split("/")[1:], *leaf_keys), StoredLeaf(name, shape, dtype)
        else:
            yield (), StoredLeaf(name, shape, dtype)

    def has(self, leaf: Leaf) -> bool:
        return leaf.path in self.stored

    def dtype(self, leaf: Leaf) -> np.dtype:
        # Absent reader K/V (allowed by the config check) take the dtype of their layer's queries.
        stored = self.stored.get(leaf.path) or self.stored[(leaf.path[0], "attn", "q_einsum", "w")]
        return stored.dtype

    reads_slices = True  # TensorStore reads a slice of a tensor without the rest

    def read(self, leaf: Leaf, dtype=None) -> np.ndarray:
        """One leaf, converted to `dtype` (None: as stored) while it is read, in a 64-byte-aligned buffer."""
        return self.read_slice(leaf, dtype, ())

    def read_slice(self, leaf: Leaf, dtype, index: tuple[slice, ...]) -> np.ndarray:
        import tensorstore as ts

        from gemma4_jax.hf_format import np_dtype

        target = np_dtype(dtype) if dtype is not None else self.dtype(leaf)
        shape = (
            tuple(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape, strict=False)) + leaf.shape[len(index) :]
        )
        if leaf.path not in self.stored:  # unused reader K/V
            out = aligned_empty(shape, target)
            out[...] = 0
            return out
        path, leaf = leaf.path, self.stored[leaf.path]
        try:
            store = self._stores[leaf.name]
            if leaf.index is not None:
                store = store[leaf.index]
            if index:
                store = store[index].translate_to[(0,) * len(shape)]
            if store.dtype.numpy_dtype != target:
                store = ts.cast(store, ts.dtype(target.name))
            out = aligned_empty(shape, target)
            ts.array(out).write(store).result()
        except Exception as e:  # tensorstore reports missing/damaged data as ValueError/OSError/...
            raise Gemma4Error(
                f"{self.path}: cannot read tensor {'/'.join(path)} ({leaf.name}): {_tensorstore_error(e)}"
            ) from None
        return out

    def _open_all(self, names) -> dict:
        """name -> opened TensorStore of every tensor, opened concurrently; a tensor that cannot be opened is one
        error line. Every open is waited for, failed or not (orbax's asyncio metadata reader left opens running
        after its event loop closed, and their callbacks printed tracebacks after our error line)."""
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from etils import epath

        # One context for all tensors: OCDBT manifest and B-tree caches are shared between them.
        context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        opening = {}
        for name in names:
            info = ocp.type_handlers.ParamInfo(
                name=name,
                parent_dir=epath.Path(self.path),
                use_zarr3=self._use_zarr3,
                is_ocdbt_checkpoint=self._use_ocdbt,
                ts_context=context,
            )
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            opening[name] = ts.open(spec, context=context, open=True)
        stores, failed = {}, None
        for name, future in opening.items():
            try:
                stores[name] = future.result()
            except Exception as e:  # tensorstore reports missing/damaged data as ValueError/OSError/...
                failed = failed or f"{self.path}: cannot read tensor {name}: {_tensorstore_error(e)}"
        if failed:
            raise Gemma4Error(failed)
        return stores

    def _config(self, variant: str | None, config_file: str | None) -> Gemma4Config:
        """The config that matches the tensors: --config, --variant, our config.json, or recognised from shapes."""
        if variant and config_file:
            raise Gemma4Error("give --variant or --config, not both")
        found = {path: leaf.shape for path, leaf in self.stored.items()}
        own = os.path.join(self.path, "config.json")
        if config_file:
            cfg, what = Gemma4Config.load_json(config_file), f"--config {config_file}"
        elif variant:
            cfg, what = get_config(variant), f"--variant {variant}"
        elif os.path.isfile(own):
            cfg, what = Gemma4Config.load_json(own), own
        else:
            return recognise_variant(found, self.path)
        cfg = with_stored_towers(cfg, found)
        problem = shape_mismatch(cfg, found, what)
        if problem:
            raise Gemma4Error(f"{self.path}: {what} does not match the checkpoint: {problem}")
        return cfg


def _tensorstore_error(e: Exception) -> str:
    """TensorStore's message without the trailer that spells out the whole spec it opened (a screenful of JSON)."""
    return f"{type(e).__name__}: " + re.sub(r"\s*\[tensorstore_spec=.*$", "", str(e), flags=re.S)


_TENSOR_TYPES = ("jax.Array", "np.ndarray", "scalar")  # orbax's value types stored as TensorStore arrays


def _tensor_names(info: dict) -> dict[Path, str]:
    """Tree path -> orbax parameter name (its TensorStore key: the path joined by dots) of every tensor an orbax
    `_METADATA` lists."""
    names = {}
    for entry in info["tree_metadata"].values():
        value = entry["value_metadata"]
        if value["value_type"] in _TENSOR_TYPES and not value.get("skip_deserialize"):
            path = tuple(str(key["key"]) for key in entry["key_metadata"])
            names[path] = ".".join(path)
    return names


# ----- matching tensors to a config --------------------------------------------------------------------


def shape_mismatch(config: Gemma4Config, found: dict[Path, tuple[int, ...]], what: str) -> str | None:
    """The first difference between the checkpoint's tensors and `config`'s, in words; None if they match."""
    expected = param_spec.shapes(config)
    optional = {leaf.path for leaf in param_spec.param_spec(config) if leaf.unused}
    for path, shape in expected.items():
        if path in found and tuple(found[path]) != shape:
            return f"tensor {'/'.join(path)} has shape {tuple(found[path])}, {what} expects {shape}"
    missing = [p for p in expected if p not in found and p not in optional]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"tensor {'/'.join(missing[0])}{more} of {what} is not in the checkpoint"
    extra = [p for p in found if p not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"the checkpoint has tensor {'/'.join(extra[0])}{more}, which {what} does not"
    return None


def recognise_variant(found: dict[Path, tuple[int, ...]], where: str) -> Gemma4Config:
    """The preset (official variant) whose parameter shapes are exactly the checkpoint's."""
    embedding = found.get(("embedder", "input_embedding"))
    if embedding is None or len(embedding) != 2:
        raise Gemma4Error(f"{where}: no embedder/input_embedding [vocab, width] tensor: not a Gemma 4 checkpoint")
    layers = sum(1 for p in found if p[-1] == "skip_scale" and _LAYER.match(p[0]))
    described = f"vocab {embedding[0]}, width {embedding[1]}, {layers} layers"
    # The official variants, and the toy presets (tests, demos) too: only presets of the same size are checked.
    candidates = [
        with_stored_towers(c, found)
        for c in PRESETS.values()
        if (c.vocab_size, c.embed_dim, c.num_layers) == (*embedding, layers)
    ]
    nearest = ""
    for cfg in candidates:
        problem = shape_mismatch(cfg, found, cfg.name)
        if problem is None:
            return cfg
        nearest = nearest or f"; nearest is {cfg.name}, but {problem}"
    raise Gemma4Error(
        f"{where}: the tensor shapes ({described}) are not those of an official variant "
        f"({', '.join(OFFICIAL_VARIANTS)}){nearest}. Pass --config FILE (an HF-style config.json) for other sizes"
    )


# ----- writing orbax checkpoints ------------------------------------------------------------------------


def pattern_length(config: Gemma4Config) -> int:
    """The shortest period of the layer-type string (5 on E2B, 6 on the others)."""
    types = config.layer_types
    return next(p for p in range(1, len(types) + 1) if all(types[i] == types[i % p] for i in range(len(types))))


def to_layout(params: dict, layout: str, config: Gemma4Config | None = None) -> dict:
    """The NESTED tree re-keyed as the FLAT or STACKED on-disk layout (spec §5.1)."""
    if layout == "nested":
        return params
    leaves = dict(_flatten(params))
    moe_layers = {p[0] for p in leaves if p[1:3] == ("mlp", "router_logits")}
    flat: dict[str, dict] = {}
    for path, value in leaves.items():
        if len(path) == 3 and path[1] == "mlp" and path[2] in ("gating_einsum", "linear") and path[0] not in moe_layers:
            path = (*path, "w")
        flat.setdefault("transformer/" + "/".join(path[:-1]), {})[path[-1]] = value
    if layout == "flat":
        return flat
    if layout != "stacked" or config is None:
        raise ValueError(f"unknown layout {layout!r} (or no config for stacked)")
    period = pattern_length(config)
    stacked: dict[str, dict] = {}
    groups: dict[tuple[str, str], dict[int, object]] = {}
    for key, leaves_of_key in flat.items():
        parts = key.split("/")
        layer = _LAYER.match(parts[1]) if len(parts) > 1 else None
        if not layer:
            stacked[key] = leaves_of_key
            continue
        index = int(layer.group(1))
        target = "/".join(["transformer/stacked_layers", f"attention_type_{index % period}", *parts[2:]])
        for leaf, value in leaves_of_key.items():
            groups.setdefault((target, leaf), {})[index // period] = value
    for (target, leaf), slices in groups.items():
        shapes = {np.shape(v) for v in slices.values()}
        if len(shapes) != 1:
            raise Gemma4Error(f"cannot stack {target}/{leaf}: its layers differ in shape {sorted(shapes)}")
        stacked.setdefault(target, {})[leaf] = np.stack([np.asarray(slices[i]) for i in sorted(slices)])
    return stacked


def save_orbax(path: str, params: dict, layout: str = "nested", config: Gemma4Config | None = None) -> None:
    """Writes `params` (NESTED; numpy or JAX leaves, dtypes as given) as an orbax PyTree checkpoint with OCDBT,
    the format of the official checkpoints. `path` must not exist yet.

    Orbax's default numpy handler deep-copies every array before writing (so a caller may modify them during an
    asynchronous save), which doubles peak memory; this save is synchronous, so it writes from the arrays given.
    """
    import jax
    import orbax.checkpoint as ocp

    tree = jax.tree_util.tree_map(np.asarray, to_layout(params, layout, config))
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused (leaves are numpy); orbax warns without one
    )
    saver = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True, type_handler_registry=registry))
    saver.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))
    saver.close()
