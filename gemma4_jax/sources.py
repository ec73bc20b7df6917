"""Where weights come from: official Flax/orbax checkpoints (as published on Kaggle), HF directories, and the
`kaggle:` / `hf:` download specs. `load_checkpoint` is the one entry point.

Official orbax checkpoints (spec §5.1) come in three on-disk layouts, all read here into the NESTED tree that
`model.apply` takes:
- NESTED: the Flax `model.init()['params']` tree itself (`layer_0/attn/q_einsum/w`, ...);
- FLAT: one level of `transformer/<module path>` keys holding `{leaf: array}` (`transformer/layer_0/attn/q_einsum`
  -> `{'w': ...}`); the dense MLP's `gating_einsum`/`linear` carry an extra `w` there that NESTED does not;
- STACKED: layers of the same position in the attention pattern stacked on a leading axis
  (`transformer/stacked_layers/attention_type_{j}/...`, layer = slice * pattern_length + j).
They carry no config: the variant is recognised from the tensor shapes (orbax metadata only, nothing is read),
`--variant` forces one and `--config` gives an HF-style config.json for other sizes.

Each tensor is read on its own with TensorStore straight into a buffer of the requested dtype (the cast happens
chunk by chunk inside TensorStore), so loading peaks near one copy of the weights in that dtype. The buffers are
64-byte aligned, which lets JAX's CPU backend adopt them without another copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from gemma4_jax.config import OFFICIAL_VARIANTS, PRESETS, Gemma4Config, get_config
from gemma4_jax.errors import Gemma4Error

Path = tuple[str, ...]

KAGGLE_PREFIX = "kaggle:"
HF_PREFIX = "hf:"
# Files that travel with the weights (tokenizer, chat template, sampling defaults).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_KAGGLE_SPEC = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+/[\w.-]+(/\d+)?$")
_HF_SPEC = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
_HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
# Environment variables whose values never appear in a message of ours, even if a library puts them in one.
_SECRET_VARIABLES = ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")
_MULTIMODAL_EMBEDDER = ("mm_", "audio_")
_LAYER = re.compile(r"^layer_(\d+)$")
_STACKED = re.compile(r"^transformer/stacked_layers/attention_type_(\d+)(/.*)?$")


# ----- sources: local directory, kaggle:, hf: ------------------------------------------------------------


def redact(text: str) -> str:
    """`text` with the values of credential environment variables replaced by `***`."""
    for name in _SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def resolve(source: str) -> str:
    """The local directory of `source`: a directory as is; `kaggle:` / `hf:` specs downloaded (or cached)."""
    if source.startswith(KAGGLE_PREFIX):
        return _download_kaggle(source[len(KAGGLE_PREFIX) :])
    if source.startswith(HF_PREFIX):
        return _download_hf(source[len(HF_PREFIX) :])
    if os.path.isdir(source):
        return source
    if re.match(r"^[A-Za-z][\w+.-]*:", source) and not os.path.exists(source):
        raise Gemma4Error(
            f"unknown checkpoint source {source!r}: give a local directory, "
            "kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION] or hf:OWNER/NAME[@REVISION]"
        )
    raise Gemma4Error(f"checkpoint directory not found: {source}")


def _download_kaggle(spec: str) -> str:
    if not _KAGGLE_SPEC.match(spec):
        raise Gemma4Error(
            f"kaggle source {KAGGLE_PREFIX}{spec} is not of the form kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION] "
            "(e.g. kaggle:google/gemma-4/flax/gemma-4-e2b-it/1)"
        )
    try:
        import kagglehub
    except ImportError:
        raise Gemma4Error("kaggle: sources need the kagglehub package (pip install kagglehub)") from None
    try:
        # Credentials come from kagglehub's own lookup (KAGGLE_USERNAME/KAGGLE_KEY, ~/.kaggle/kaggle.json, ...).
        path = kagglehub.model_download(spec)
    except Exception as e:  # network, authentication, unknown model: all end the same way for the user
        raise Gemma4Error(redact(f"{KAGGLE_PREFIX}{spec}: download failed: {type(e).__name__}: {e}")) from None
    return str(path)


def _download_hf(spec: str) -> str:
    if not _HF_SPEC.match(spec):
        raise Gemma4Error(f"hf source {HF_PREFIX}{spec} is not of the form hf:OWNER/NAME[@REVISION]")
    repo_id, _, revision = spec.partition("@")
    try:
        import huggingface_hub
    except ImportError:
        raise Gemma4Error("hf: sources need the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        path = huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision or None, allow_patterns=_HF_PATTERNS
        )
    except Exception as e:  # network, authentication, unknown repo
        raise Gemma4Error(redact(f"{HF_PREFIX}{spec}: download failed: {type(e).__name__}: {e}")) from None
    return str(path)


def _checkpoint_kind(directory: str) -> str | None:
    if any(os.path.isfile(os.path.join(directory, m)) for m in _ORBAX_MARKERS[:2]):
        return "orbax"
    if any(name.endswith(".safetensors") for name in os.listdir(directory)):
        return "hf"
    return None


def find_checkpoint(directory: str) -> tuple[str, str]:
    """("orbax" | "hf", path) of the one checkpoint in `directory` or up to two levels below it.

    Kaggle downloads hold the orbax directory next to `tokenizer.model`; HF snapshots are the checkpoint.
    """
    level = [directory]
    for _ in range(3):
        found = [(kind, d) for d in level if (kind := _checkpoint_kind(d))]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(os.path.relpath(d, directory) for _, d in found)
            raise Gemma4Error(f"{directory} holds several checkpoints ({names}); point --checkpoint at one of them")
        level = [
            os.path.join(d, name)
            for d in level
            for name in sorted(os.listdir(d))
            if not name.startswith(".") and os.path.isdir(os.path.join(d, name))
        ]
    if os.path.isfile(os.path.join(directory, "config.json")):
        return "hf", directory  # an HF directory without weights: its loader says what is missing
    raise Gemma4Error(
        f"no checkpoint in {directory}: neither an orbax checkpoint (no _METADATA / manifest.ocdbt) "
        "nor an HF directory (missing config.json + *.safetensors)"
    )


def tokenizer_dir(checkpoint_path: str, root: str) -> str:
    """The directory with the tokenizer files: the checkpoint's own, else the nearest parent up to `root`."""
    root = os.path.abspath(root)
    d = os.path.abspath(checkpoint_path)
    while True:
        if any(os.path.isfile(os.path.join(d, name)) for name in TOKENIZER_FILES[:2]):
            return d
        if d == root or not d.startswith(root):
            return root
        d = os.path.dirname(d)


def tokenizer_files(checkpoint_path: str, root: str) -> list[str]:
    """Paths of the TOKENIZER_FILES found next to the checkpoint or in the directories above it up to `root`."""
    found: dict[str, str] = {}
    root = os.path.abspath(root)
    d = os.path.abspath(checkpoint_path)
    while True:
        for name in TOKENIZER_FILES:
            path = os.path.join(d, name)
            if name not in found and os.path.isfile(path):
                found[name] = path
        if d == root or not d.startswith(root):
            return list(found.values())
        d = os.path.dirname(d)


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


class OrbaxCheckpoint:
    """An orbax checkpoint directory, seen as NESTED text-decoder leaves read one at a time.

    `leaves`: NESTED path -> StoredLeaf for every text-decoder tensor; `other`: names of the tensors that are
    not part of the text decoder (vision/audio encoders and their projections), which loading leaves unread.
    """

    def __init__(self, path: str):
        import orbax.checkpoint as ocp

        self.path = os.path.abspath(path)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # orbax warns before failing; our one-line error says it all
        try:
            with open(os.path.join(self.path, "_METADATA")) as f:
                info = json.load(f)
            item = ocp.PyTreeCheckpointer().metadata(self.path).item_metadata
        except FileNotFoundError:
            raise Gemma4Error(f"{path}: not a readable orbax checkpoint (no _METADATA file)") from None
        except Exception as e:  # orbax/tensorstore raise many types for damaged metadata
            raise Gemma4Error(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
        finally:
            absl_logger.setLevel(level)
        tree = getattr(item, "tree", None)
        if not tree:
            raise Gemma4Error(f"{path}: not a readable orbax checkpoint (its tensor metadata is missing or damaged)")
        self._use_ocdbt = bool(info.get("use_ocdbt", True))
        self._use_zarr3 = bool(info.get("use_zarr3", False))
        self._context = None
        flat = dict(_flatten(tree))
        if {p[0] for p in flat} == {"collections", "opt_state", "params", "step"}:  # a Kauldron training state
            flat = {p[1:]: v for p, v in flat.items() if p[0] == "params"}
        self.layout = _layout({p[0] for p in flat})
        stacked_positions = [int(m.group(1)) for p in flat if (m := _STACKED.match(p[0]))]
        self._pattern_length = 1 + max(stacked_positions, default=0)
        raw: dict[Path, StoredLeaf] = {}
        self.other: list[str] = []
        for stored_path, meta in flat.items():
            for path, leaf in self._nested_leaves(stored_path, meta):
                if path and _is_text(path):
                    raw[path] = leaf
                else:
                    self.other.append("/".join(stored_path))
        self.leaves = _drop_dense_mlp_w(raw) if self.layout != "nested" else raw
        if not self.leaves:
            raise Gemma4Error(f"{path}: the orbax checkpoint has no Gemma text-decoder tensors (embedder, layer_N)")

    def _nested_leaves(self, stored_path: Path, meta) -> Iterator[tuple[Path, StoredLeaf]]:
        shape = tuple(getattr(meta, "shape", None) or ())
        dtype = np.dtype(getattr(meta, "dtype", None) or np.float32)
        name = getattr(meta, "name", None) or ".".join(stored_path)
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

    @property
    def shapes(self) -> dict[Path, tuple[int, ...]]:
        return {path: leaf.shape for path, leaf in self.leaves.items()}

    def nbytes(self, paths, dtype=None) -> int:
        return sum(
            math.prod(self.leaves[p].shape) * np.dtype(dtype or self.leaves[p].dtype).itemsize
            for p in paths
            if p in self.leaves
        )

    def read(self, path: Path, dtype=None) -> np.ndarray:
        """One leaf, converted to `dtype` (None: as stored) while it is read, in a 64-byte-aligned buffer."""
        import tensorstore as ts

        leaf = self.leaves[path]
        target = np.dtype(dtype or leaf.dtype)
        try:
            store = self._open(leaf.name)
            if tuple(store.shape[1:] if leaf.index is not None else store.shape) != leaf.shape:
                raise ValueError(f"stored shape {tuple(store.shape)} differs from its metadata {leaf.shape}")
            if leaf.index is not None:
                store = store[leaf.index]
            if store.dtype.numpy_dtype != target:
                store = ts.cast(store, ts.dtype(target.name))
            out = aligned_empty(leaf.shape, target)
            ts.array(out).write(store).result()
        except Exception as e:  # tensorstore reports missing/damaged data as ValueError/OSError/...
            raise Gemma4Error(
                f"{self.path}: cannot read tensor {'/'.join(path)} ({leaf.name}): {type(e).__name__}: {e}"
            ) from None
        return out

    def _open(self, name: str):
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from etils import epath

        if self._context is None:
            # One context for all tensors: OCDBT manifest and B-tree caches are shared between them.
            self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        info = ocp.type_handlers.ParamInfo(
            name=name,
            parent_dir=epath.Path(self.path),
            use_zarr3=self._use_zarr3,
            is_ocdbt_checkpoint=self._use_ocdbt,
            ts_context=self._context,
        )
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
        return ts.open(spec, context=self._context, open=True).result()

    def config(self, variant: str | None = None, config_file: str | None = None) -> Gemma4Config:
        """The config that matches the tensors: --config, --variant, our config.json, or recognised from shapes."""
        found = self.shapes
        own = os.path.join(self.path, "config.json")
        if config_file:
            cfg, what = Gemma4Config.load_json(config_file), f"--config {config_file}"
        elif variant:
            cfg, what = get_config(variant), f"--variant {variant}"
        elif os.path.isfile(own):
            cfg, what = Gemma4Config.load_json(own), own
        else:
            return recognise_variant(found, self.path)
        problem = shape_mismatch(cfg, found, what)
        if problem:
            raise Gemma4Error(f"{self.path}: {what} does not match the checkpoint: {problem}")
        return cfg

    def load(self, config: Gemma4Config, dtype, progress: Progress | None = None) -> dict:
        """The NESTED parameter tree as JAX arrays of `dtype`, one tensor at a time."""
        import jax

        from gemma4_jax.model import tree_set

        expected, _ = expected_shapes(config)
        target = np.dtype(dtype)
        params: dict = {}
        for path, shape in expected.items():
            if path in self.leaves:
                value = self.read(path, target)
            else:  # reader-layer K/V (unused by the model); shape_mismatch() allowed only those to be absent
                value = aligned_empty(shape, target)
                value[...] = 0
            # On the CPU backend the aligned buffer becomes the array's memory; elsewhere it is copied over.
            tree_set(params, path, jax.device_put(value, may_alias=True))
            del value
            if progress:
                progress.advance(math.prod(shape) * target.itemsize)
        return params


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


# ----- matching tensors to a config --------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def expected_shapes(config: Gemma4Config) -> tuple[dict[Path, tuple[int, ...]], frozenset[Path]]:
    """(NESTED path -> shape of every parameter of `config`, paths that may be absent: the reader layers' K/V)."""
    import jax

    from gemma4_jax.checkpoint import mapping
    from gemma4_jax.model import param_shapes

    leaves = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
    shapes = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}
    return shapes, frozenset(e.path for e in mapping(config) if e.optional)


def shape_mismatch(config: Gemma4Config, found: dict[Path, tuple[int, ...]], what: str) -> str | None:
    """The first difference between the checkpoint's text tensors and `config`'s, in words; None if they match."""
    expected, optional = expected_shapes(config)
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
    candidates = [c for c in PRESETS.values() if (c.vocab_size, c.embed_dim, c.num_layers) == (*embedding, layers)]
    nearest = ""
    for cfg in candidates:
        problem = shape_mismatch(cfg, found, cfg.name)
        if problem is None:
            return cfg
        nearest = f"; nearest is {cfg.name}, but {problem}"
    raise Gemma4Error(
        f"{where}: the tensor shapes ({described}) are not those of an official variant "
        f"({', '.join(OFFICIAL_VARIANTS)}){nearest}. Pass --config FILE (an HF-style config.json) for other sizes"
    )


def given_config(variant: str | None, config_file: str | None) -> Gemma4Config | None:
    if variant and config_file:
        raise Gemma4Error("give --variant or --config, not both")
    if config_file:
        return Gemma4Config.load_json(config_file)
    return get_config(variant) if variant else None


# ----- progress -----------------------------------------------------------------------------------------


class Progress:
    """`what: 42% (4.3 / 10.2 GB)` on stderr: one updating line on a terminal, else a line per 10%."""

    def __init__(self, what: str, total_bytes: int, stream=None, min_bytes: int = 10**8):
        self.what, self.total, self.done = what, max(total_bytes, 1), 0
        self.stream = stream or sys.stderr
        self.quiet = total_bytes < min_bytes  # small jobs end before a progress line would help
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_step = -1

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.quiet:
            return
        step = int(100 * self.done / self.total) // (1 if self.tty else 10)
        if step != self._last_step:
            self._last_step = step
            line = f"{self.what}: {100 * self.done / self.total:3.0f}% ({gb(self.done)} / {gb(self.total)})"
            self.stream.write(f"\r{line}" if self.tty else line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


# ----- the entry point ----------------------------------------------------------------------------------


def load_checkpoint(
    source: str,
    dtype=None,
    variant: str | None = None,
    config_file: str | None = None,
    progress: bool = False,
) -> tuple[Gemma4Config, dict, str]:
    """(config, params, local_dir) from a local orbax or HF directory, `kaggle:...` or `hf:...`.

    params: the NESTED tree of JAX arrays in `dtype` (default bfloat16), text decoder only (vision/audio encoder
    weights stay unread). local_dir: for an HF source its directory; for orbax the directory holding the
    tokenizer files (tokenizer.model / tokenizer.json) if the source has them, else the downloaded/given one.
    `variant` forces a preset and `config_file` gives an HF-style config.json; a tensor that does not fit them
    is named in the error.
    """
    import jax.numpy as jnp

    from gemma4_jax import checkpoint

    dtype = jnp.dtype(dtype or jnp.bfloat16)
    forced = given_config(variant, config_file)
    root = resolve(source)
    kind, path = find_checkpoint(root)
    # HF directories carry their tokenizer (and are what --ple mmap maps); Kaggle puts it next to the orbax dir.
    local_dir = os.path.abspath(path) if kind == "hf" else tokenizer_dir(path, root)
    if kind == "hf":
        cfg, params = checkpoint.load_hf_checkpoint(path, dtype=dtype, config=forced)
        return cfg, params, local_dir
    ckpt = OrbaxCheckpoint(path)
    cfg = ckpt.config(variant, config_file)
    expected, _ = expected_shapes(cfg)
    meter = Progress(f"loading {os.path.basename(path)}", ckpt.nbytes(expected, dtype)) if progress else None
    params = ckpt.load(cfg, dtype, meter)
    if meter:
        meter.close()
    return cfg, params, local_dir


def checkpoint_config(source: str, variant: str | None = None, config_file: str | None = None) -> Gemma4Config:
    """The config of a checkpoint without loading it: HF config.json, or recognised from orbax metadata."""
    forced = given_config(variant, config_file)
    kind, path = find_checkpoint(resolve(source))
    if kind == "orbax":
        return OrbaxCheckpoint(path).config(variant, config_file)
    return forced or Gemma4Config.load_json(os.path.join(path, "config.json"), name=os.path.basename(path))


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


def hf_leaves(
    path: str, config: Gemma4Config | None = None
) -> tuple[Gemma4Config, list[str], Callable[[], Iterator[tuple[Path, np.ndarray]]]]:
    """An HF directory as NESTED leaves in their stored dtypes: (config, non-text tensor names, iterate)."""
    from gemma4_jax import checkpoint

    cfg, read, other = checkpoint.open_hf_checkpoint(path, config)
    return cfg, other, lambda: checkpoint.hf_to_nested(cfg, read, None, source=path)
