"""Where weights come from: `open_source` turns a checkpoint spec into a `WeightSource`, read leaf by leaf.

A spec is a local directory (an official Flax/orbax checkpoint as Kaggle ships it, a Hugging Face directory, or a
quantized checkpoint written by `gemma4-jax quantize`), `kaggle:OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]` or
`hf:OWNER/NAME[@REVISION]` (downloaded, or found in the library's cache), or None for random weights of a preset.

Every consumer reads through the same interface, one leaf of the official tree at a time, so a full-size model is
loaded, converted, quantized, merged or exported while holding about one tensor besides its output:
`source.read(leaf, dtype)` gives the official layout, `source.hf_rows(...)` blocks of rows of its HF tensors.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator

import numpy as np

from gemma4_jax import files, param_spec
from gemma4_jax.config import Gemma4Config, get_config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.param_spec import Leaf

KAGGLE_PREFIX = "kaggle:"
HF_PREFIX = "hf:"
DEMO_VARIANT = "tiny"  # random weights when neither a checkpoint nor a variant is given
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
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")


# ----- the interface -----------------------------------------------------------------------------------------


class WeightSource:
    """A checkpoint seen as the leaves of the official tree (`param_spec.param_spec(config)`), read on demand.

    `description` names it in messages; `directory` is the local directory with its tokenizer files (or None);
    `other` lists the checkpoint's tensors that are not read (the encoders of a text-only load, or tensors of a
    layout the project does not map).
    """

    def __init__(self, config: Gemma4Config, description: str, directory: str | None = None, other=()):
        self.config, self.description, self.directory, self.other = config, description, directory, list(other)
        self.text_only = False  # the encoders were left out on request (`drop_towers`)
        self._current: tuple[Leaf, tuple[np.ndarray, ...]] | None = None

    def leaves(self) -> tuple[Leaf, ...]:
        return param_spec.param_spec(self.config)

    def drop_towers(self) -> WeightSource:
        """The text decoder alone: the encoders' leaves are no longer read (they join `other`)."""
        self.other += [leaf.name for leaf in self.leaves() if leaf.part != "text"]
        self.config = self.config.text_only()
        self.text_only = True
        return self

    def has(self, leaf: Leaf) -> bool:
        """False for leaves the checkpoint does not store (the unused K/V of KV-shared readers)."""
        return True

    def dtype(self, leaf: Leaf) -> np.dtype:
        """The dtype the leaf is stored in."""
        raise NotImplementedError

    def read(self, leaf: Leaf, dtype=None) -> np.ndarray:
        """The leaf in the official layout, in `dtype` (None: as stored); absent unused leaves are zeros."""
        raise NotImplementedError

    # True where `read_slice` reads just the slice (sharded loading then reads only a process's own shards).
    reads_slices = False

    def read_slice(self, leaf: Leaf, dtype, index: tuple[slice, ...]) -> np.ndarray:
        """`read(leaf, dtype)[index]`, for sources that can read part of a tensor (`reads_slices`)."""
        return self.read(leaf, dtype)[index]

    def hf_rows(self, leaf: Leaf, index: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the leaf's HF tensor `index` (of `leaf.hf`). This default converts the whole leaf
        once and slices it; sources that store HF tensors read just the rows."""
        if self._current is None or self._current[0] != leaf:
            self._current = None  # drop the previous tensor before converting the next
            self._current = (leaf, leaf.to_hf(self.read(leaf)))
        return self._current[1][index][start:stop]

    def nbytes(self, dtype=None, leaves=None) -> int:
        """Bytes of the (stored, or `dtype`) leaves, all by default."""
        total = 0
        for leaf in leaves if leaves is not None else self.leaves():
            itemsize = np.dtype(dtype or self.dtype(leaf)).itemsize
            total += math.prod(leaf.shape) * itemsize
        return total

    def tokenizer_files(self) -> list[str]:
        return tokenizer_files(self.directory, self.directory) if self.directory else []


class TreeSource(WeightSource):
    """A parameter tree in memory (JAX or numpy leaves, or weight objects such as quantized weights)."""

    def __init__(self, config: Gemma4Config, params: dict, description: str = "parameters", directory=None):
        super().__init__(config, description, directory)
        self.params = params

    def _value(self, leaf: Leaf):
        from gemma4_jax.model import tree_get

        return tree_get(self.params, leaf.path)

    def has(self, leaf: Leaf) -> bool:
        try:
            self._value(leaf)
        except KeyError:
            return False
        return True

    def dtype(self, leaf: Leaf) -> np.dtype:
        from gemma4_jax.hf_format import np_dtype

        return np_dtype(self._value(leaf).dtype)

    def read(self, leaf: Leaf, dtype=None) -> np.ndarray:
        import jax

        from gemma4_jax.hf_format import np_dtype
        from gemma4_jax.model import dense

        value = self._value(leaf)
        target = np_dtype(dtype or value.dtype)
        if not isinstance(value, np.ndarray | jax.Array):  # a weight object (quantized, host-side PLE table)
            return np.asarray(jax.device_get(dense(value, np.float32))).astype(target, copy=False)
        return np.asarray(jax.device_get(value)).astype(target, copy=False)


class RandomSource(WeightSource):
    """Random weights of a config, drawn leaf by leaf exactly as `model.init_params(config, seed, dtype)` draws them
    (each leaf from its own seed): a full-size model is quantized or exported without ever existing whole."""

    def __init__(self, config: Gemma4Config, seed: int = 0, dtype="bfloat16"):
        from gemma4_jax.hf_format import np_dtype

        if seed < 0:
            raise Gemma4Error(f"the seed of random weights must be >= 0, got {seed}")
        super().__init__(config, f"random weights (variant {config.name}, seed {seed})")
        self.seed, self._dtype = seed, np_dtype(dtype)

    def dtype(self, leaf: Leaf) -> np.dtype:
        return self._dtype

    def read(self, leaf: Leaf, dtype=None) -> np.ndarray:
        from gemma4_jax.hf_format import np_dtype
        from gemma4_jax.model import random_leaf

        # Drawn in float32 and rounded once to the asked dtype, as init_params(config, seed, dtype) does.
        return random_leaf(self.seed, leaf, self._dtype if dtype is None else np_dtype(dtype))


# ----- resolving a spec --------------------------------------------------------------------------------------


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
    if os.path.exists(source):
        raise Gemma4Error(f"{source} is a file; --checkpoint takes a checkpoint directory")
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
        raise Gemma4Error("hf: sources need huggingface_hub: pip install 'gemma4-jax[hub]'") from None
    try:
        path = huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision or None, allow_patterns=_HF_PATTERNS
        )
    except Exception as e:  # network, authentication, unknown repo
        raise Gemma4Error(redact(f"{HF_PREFIX}{spec}: download failed: {type(e).__name__}: {e}")) from None
    return str(path)


def _checkpoint_kind(directory: str) -> str | None:
    from gemma4_jax.quant.checkpoint import is_quantized_checkpoint

    if is_quantized_checkpoint(directory):
        return "quantized"
    if any(os.path.isfile(os.path.join(directory, m)) for m in _ORBAX_MARKERS):
        return "orbax"
    if any(name.endswith(".safetensors") for name in os.listdir(directory)):
        return "hf"
    return None


def find_checkpoint(directory: str) -> tuple[str, str]:
    """("orbax" | "hf" | "quantized", path) of the one checkpoint in `directory` or up to two levels below it.

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


def copy_tokenizer_files(source: WeightSource, directory: str) -> list[str]:
    """Copies the source's tokenizer files into `directory` (an output being written); returns their names."""
    import shutil

    names = []
    for path in source.tokenizer_files():
        try:
            shutil.copyfile(path, os.path.join(directory, os.path.basename(path)))
        except OSError as e:
            raise files.os_error(directory, e) from None
        names.append(os.path.basename(path))
    return names


def given_config(variant: str | None, config_file: str | None) -> Gemma4Config | None:
    if variant and config_file:
        raise Gemma4Error("give --variant or --config, not both")
    if config_file:
        return Gemma4Config.load_json(config_file)
    return get_config(variant) if variant else None


def open_source(
    spec: str | None,
    *,
    variant: str | None = None,
    config_file: str | None = None,
    init_seed: int = 0,
    random_dtype="bfloat16",
    text_only: bool = False,
) -> WeightSource:
    """The checkpoint `spec` (see the module doc), or random weights of `variant` / `config_file` / the demo preset
    when `spec` is None. For a checkpoint, `variant` / `config_file` force its config (a tensor that does not fit
    is named in the error); quantized checkpoints carry their own and refuse them. `text_only` leaves the vision
    and audio encoders unread."""
    source = _open_source(spec, variant, config_file, init_seed, random_dtype, text_only)
    return source.drop_towers() if text_only else source


def _open_source(spec, variant, config_file, init_seed, random_dtype, text_only) -> WeightSource:
    if spec is None:
        config = given_config(variant, config_file) or get_config(DEMO_VARIANT)
        return RandomSource(config, init_seed, random_dtype)
    root = resolve(spec)
    kind, path = find_checkpoint(root)
    if kind == "quantized":
        if variant or config_file:
            raise Gemma4Error(f"{path} is a quantized checkpoint with its own config; drop --variant / --config")
        from gemma4_jax.quant.checkpoint import QuantizedSource

        return QuantizedSource(path)
    if kind == "hf":
        from gemma4_jax.hf_format import HFSource

        return HFSource(path, given_config(variant, config_file), text_only)
    from gemma4_jax.orbax_format import OrbaxSource

    # Kaggle puts the tokenizer next to the orbax directory.
    return OrbaxSource(path, variant, config_file, tokenizer_dir(path, root), text_only)


def iterate(source: WeightSource, dtype=None, progress: files.Progress | None = None) -> Iterator[tuple[Leaf, object]]:
    """(leaf, array) for every leaf in spec order, read in `dtype`, advancing `progress` by the bytes read."""
    for leaf in source.leaves():
        value = source.read(leaf, dtype)
        yield leaf, value
        if progress:
            progress.advance(value.nbytes)
