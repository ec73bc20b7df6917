"""The library API: `load` a checkpoint into a `Model`, and use it.

    import gemma4_jax as g4
    model = g4.load("hf:google/gemma-4-E2B-it")            # or an orbax/HF/quantized directory, or kaggle:...
    print(model.generate("The capital of France is", max_new_tokens=16).text)
    model.generate([{"role": "user", "content": "Hi"}], sampling=g4.SamplingConfig(1.0, 64, 0.95))

`load` checks, before reading anything, that the weights fit in the memory available and says which options do
when they do not. Every command of the CLI is a thin parser over this module and the task functions
(`convert.convert`, `quant.checkpoint.quantize`, `export.gguf.export_gguf`, `export.litert.export_litert`,
`train.finetune`, `train.merge`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import files, multimodal, param_spec, ple, sources
from gemma4_jax import image as image_lib
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import Params, tree_set
from gemma4_jax.sampler import DEFAULT_STOP_TOKENS, Generation, Sampler, SamplingConfig, check_token_ids
from gemma4_jax.tokenizer import Tokenizer

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32"}
# Beyond the weights, room kept free for the KV cache, activations and the runtime.
HEADROOM = 0.10


def parse_dtype(dtype) -> jnp.dtype | None:
    """A dtype from its name ("bfloat16", "bf16", "float32", "f32") or a dtype; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise Gemma4Error(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return jnp.dtype(dtype)


# ----- memory ------------------------------------------------------------------------------------------------


CACHE_OFF = "off"  # $GEMMA4_JAX_CACHE=off: the same as --no-compile-cache, for a whole environment (the tests)


def compilation_cache_dir() -> str:
    """Where compiled programs are kept between runs: $GEMMA4_JAX_CACHE, else the user's cache directory
    ($XDG_CACHE_HOME or ~/.cache) / gemma4-jax / xla."""
    if os.environ.get("GEMMA4_JAX_CACHE"):
        return os.environ["GEMMA4_JAX_CACHE"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gemma4-jax", "xla")


COMPILATION_CACHE_BYTES = 4 << 30  # least recently used programs go past this


def use_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (default `compilation_cache_dir()`), so a second
    run of the same command loads its programs instead of compiling them (E2B's step: ~40 s). Returns the
    directory, or None (with a one-line note) when it cannot be created or written, or None when
    $GEMMA4_JAX_CACHE (or `directory`) is `off`, which also turns off a cache that JAX's own environment variable
    ($JAX_COMPILATION_CACHE_DIR) names.

    The cache is bounded (COMPILATION_CACHE_BYTES, least recently used out), which makes JAX lock the directory
    around each read and write: unbounded, it writes entries in place, and a process reading one that another is
    still writing gets a truncated program."""
    directory = directory or compilation_cache_dir()
    if directory == CACHE_OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        print(f"note: no compilation cache ({e}); every run compiles", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def available_memory() -> int:
    """Bytes that a load may use: free host RAM (the CPU backend's device memory is host RAM), or on an
    accelerator what its allocator has left."""
    import psutil

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(psutil.virtual_memory().available)


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What loading `source` in `dtype` with the PLE table at `ple` needs: resident bytes, plus the largest
    tensor once more while it is read and converted."""

    dtype: str
    ple: str
    weight_bytes: int
    transient_bytes: int

    @property
    def peak(self) -> int:
        return math.ceil((self.weight_bytes + self.transient_bytes) * (1 + HEADROOM))


def plan_load(source: sources.WeightSource, dtype, ple_mode: str) -> LoadPlan:
    from gemma4_jax.hf_format import np_dtype

    if isinstance(source, _quantized_source_type()):
        total = source.packed_nbytes()
        return LoadPlan(str(jnp.dtype(dtype or source.compute_dtype)), ple_mode, total, 0)
    resident = transient = 0
    for leaf in source.leaves():
        target = np_dtype(param_spec.leaf_dtype(leaf, dtype))
        nbytes = math.prod(leaf.shape) * target.itemsize
        if leaf.path == ple.TABLE_PATH and ple_mode == "mmap":
            nbytes = 0  # file-backed pages, evictable
        resident += nbytes
        if source.dtype(leaf) != target:  # read in the stored dtype, then converted
            transient = max(transient, math.prod(leaf.shape) * source.dtype(leaf).itemsize)
    return LoadPlan(str(jnp.dtype(dtype)), ple_mode, resident, transient)


def _quantized_source_type():
    from gemma4_jax.quant.checkpoint import QuantizedSource

    return QuantizedSource


def check_fits(source: sources.WeightSource, plan: LoadPlan, available: int | None = None) -> None:
    """Raises one Gemma4Error line when `plan` does not fit, naming the planned bytes and the options that do."""
    available = available_memory() if available is None else available
    if plan.peak <= available:
        return
    alternatives = []
    if not isinstance(source, _quantized_source_type()):
        for dtype, mode in (("bfloat16", plan.ple), ("bfloat16", "mmap"), ("float32", "mmap")):
            if (dtype, mode) == (plan.dtype, plan.ple) or (mode == "mmap" and not _can_mmap(source)):
                continue
            other = plan_load(source, dtype, mode)
            if other.peak <= available:
                flags = " ".join(f for f in (f"--dtype {dtype}", f"--ple {mode}" if mode != "device" else "") if f)
                alternatives.append(f"{flags} ({files.human_bytes(other.peak)})")
        alternatives.append("a quantized checkpoint (gemma4-jax quantize --format int8|int4)")
    raise Gemma4Error(
        f"loading {source.config.name} in {plan.dtype} needs about {files.human_bytes(plan.peak)} "
        f"(weights {files.human_bytes(plan.weight_bytes)}, +{files.human_bytes(plan.transient_bytes)} while "
        f"converting the largest tensor, +{HEADROOM:.0%}), but {files.human_bytes(available)} is available; "
        f"options that fit: {'; '.join(dict.fromkeys(alternatives))}"
    )


def _can_mmap(source: sources.WeightSource) -> bool:
    from gemma4_jax.hf_format import HFSource

    return isinstance(source, HFSource) and bool(source.config.per_layer_input_dim)


# ----- the model ---------------------------------------------------------------------------------------------


class TextStream:
    """Turns generated token ids into text as they arrive, holding back incomplete UTF-8 byte sequences.

    Each token decodes only a short window (the tokens since the last emitted text), so streaming a long answer
    costs the same per token as a short one."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded and emitted already

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):  # a byte-fallback character still missing bytes
            self.write(text[len(done) :])
            self.prefix, self.read = self.read, len(self.ids)


@dataclasses.dataclass
class Completion:
    text: str | None  # None when the model has no tokenizer
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    generation: Generation  # timings


@dataclasses.dataclass
class Model:
    """A loaded model: `config`, `params` (the official tree; quantized leaves stay packed, the PLE table may be a
    host-side `ple.HostPLE`), the checkpoint's `tokenizer` (None for random weights without one), `source` (a
    description) and `directory` (the local checkpoint directory, for its tokenizer files)."""

    config: Gemma4Config
    params: Params
    tokenizer: Tokenizer | None = None
    source: str = ""
    directory: str | None = None
    mesh: jax.sharding.Mesh | None = None  # the device mesh the parameters are sharded on (`load(mesh=...)`)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise Gemma4Error(
                f"text needs a tokenizer, and {self.source} has none: give a checkpoint with one, or --tokenizer PATH"
            )
        return self.tokenizer

    def prepare(
        self,
        prompt,
        *,
        images: Sequence = (),
        audio: Sequence = (),
        image_tokens: int = image_lib.DEFAULT_BUDGET,
        chat: bool = False,
        enable_thinking: bool = False,
    ) -> tuple[list[int], multimodal.SoftTokens | None]:
        """A prompt as the decoder takes it: (token ids, soft tokens or None).

        `prompt` is text (one <bos> first), chat messages (rendered with the chat template) or token ids. Images
        (paths, PIL images, uint8 arrays, or `multimodal.Image`s) are resized to `image_tokens` soft tokens; audio
        (paths, or `multimodal.Audio`s) is cut at 30 s. Messages may carry them as content parts instead
        (`{"type": "image", "image": path}`, `{"type": "audio", "audio": path}`). With `chat`, text and media
        become one user turn (media first); plain text without placeholders gets one per medium after <bos>."""
        if isinstance(prompt, str) or (prompt and isinstance(next(iter(prompt)), dict)):
            tokenizer = self.require_tokenizer()
        messages = None
        if isinstance(prompt, str) and chat:
            parts = [{"type": "image"}] * len(images) + [{"type": "audio"}] * len(audio)
            messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}] if parts else prompt}]
        elif not isinstance(prompt, str) and prompt and isinstance(next(iter(prompt)), dict):
            messages = list(prompt)
            found = _media_parts(messages)
            if found and (images or audio):
                raise Gemma4Error("give media as content parts of the messages or as images=/audio=, not both")
            images = [p.get("image", p.get("path")) for p in found if p["type"] == "image"] or images
            audio = [p.get("audio", p.get("path")) for p in found if p["type"] == "audio"] or audio
        media = [m if isinstance(m, multimodal.Image) else multimodal.load_image(m, image_tokens) for m in images]
        media += [m if isinstance(m, multimodal.Audio) else multimodal.load_audio(m) for m in audio]
        if messages is not None:
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        elif isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_bos=True)
            placeholders = {self.config.image_token_id, self.config.audio_token_id}
            if media and not any(t in placeholders for t in ids):
                kinds = [self.config.image_token_id if isinstance(m, multimodal.Image) else self.config.audio_token_id
                         for m in media]  # fmt: skip
                ids = [ids[0], *kinds, *ids[1:]]
        else:
            ids = [int(t) for t in prompt]
            check_token_ids(self.config, ids)
        placeholders = {self.config.image_token_id, self.config.audio_token_id} if self.config.multimodal else set()
        if not media and not placeholders.intersection(ids):
            return ids, None
        ids = multimodal.expand(ids, media, self.config)  # counts placeholders against media
        return ids, multimodal.embed(self.params, self.config, ids, media)

    def encode(self, prompt, *, chat: bool = False, enable_thinking: bool = False) -> list[int]:
        """Token ids of a text-only prompt (see `prepare`)."""
        return self.prepare(prompt, chat=chat, enable_thinking=enable_thinking)[0]

    def sampler(self, sampling: SamplingConfig | None = None, stop_tokens=DEFAULT_STOP_TOKENS) -> Sampler:
        """A sampler over this model (greedy by default)."""
        return Sampler(self.config, self.params, sampling or SamplingConfig(), stop_tokens, mesh=self.mesh)

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        *,
        images: Sequence = (),
        audio: Sequence = (),
        image_tokens: int = image_lib.DEFAULT_BUDGET,
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        chat: bool = False,
        enable_thinking: bool = False,
        stop_tokens: Sequence[int] = DEFAULT_STOP_TOKENS,
        seed: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Continues a prompt (text, chat messages or token ids; `chat` wraps text in a user turn; images and audio
        as `prepare` takes them), greedily unless `sampling` says otherwise. `on_text` receives the answer as it
        streams."""
        ids, soft = self.prepare(
            prompt, images=images, audio=audio, image_tokens=image_tokens, chat=chat, enable_thinking=enable_thinking
        )
        sampler = self.sampler(sampling, stop_tokens)
        sampler.validate([ids], max_new_tokens)
        stream = TextStream(self.tokenizer, on_text) if on_text is not None and self.tokenizer else None
        result = sampler.generate([ids], max_new_tokens, seed=seed, on_token=stream, soft=[soft])
        tokens = result.tokens[0]
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return Completion(text, tokens, result.finish_reasons[0], result)

    def logits(self, tokens: Sequence[int], soft: multimodal.SoftTokens | None = None) -> np.ndarray:
        """Full-forward float32 logits [T, V] of one sequence (soft-capped); `soft` from `prepare`."""
        ids = [int(t) for t in tokens]
        check_token_ids(self.config, ids)
        if len(ids) > self.config.max_context:
            raise Gemma4Error(f"{len(ids)} tokens exceed the {self.config.max_context}-token context")
        extra = {}
        if soft is not None:
            embeddings, mask, blocks = multimodal.batch([soft], len(ids), _compute_dtype(self.params))
            extra = {"soft_tokens": embeddings, "soft_mask": mask, "blocks": blocks}
        with _mesh_context(self.mesh):
            out, _ = _jitted_apply()(self.params, np.asarray([ids], np.int32), config=self.config, **extra)
        values = np.asarray(out[0], np.float32)
        if not np.isfinite(values).all():
            raise Gemma4Error("the forward pass produced non-finite logits (are the weights damaged?)")
        return values


def _media_parts(messages) -> list[dict]:
    return [
        part
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict)
        and part.get("type") in ("image", "audio")
        and (part.get(part["type"]) or part.get("path"))
    ]


def _mesh_context(mesh):
    """The model's mesh as the surrounding one (activation layouts, `sharding.constrain`), or nothing."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _compute_dtype(params):
    return params["embedder"]["input_embedding"].dtype


def _jitted_apply():
    from gemma4_jax.model import apply

    return jax.jit(apply, static_argnames=("config",))


# ----- loading -----------------------------------------------------------------------------------------------


def read_params(
    source: sources.WeightSource,
    dtype,
    ple_mode: str = "device",
    progress: bool = True,
    check_finite: bool = True,
    layout: str = "checkpoint",
    mesh: jax.sharding.Mesh | None = None,
) -> Params:
    """Every leaf of `source` as a JAX array of `dtype` (quantized checkpoints: packed weights), one at a time; the
    PLE table stays in host RAM or memory-mapped with `ple_mode` host/mmap. Non-finite weights are refused, naming
    the tensor. `layout` "decode": the text decoder's matrices (dense or packed) as `matvec.DecodeWeight`s (XLA:CPU
    decode at memory bandwidth), made leaf by leaf while reading. With a `mesh`, each leaf goes straight onto its shards
    (`sharding.RULES`): each process reads the leaf (an orbax checkpoint: only the slices of its own devices) and
    transfers only its devices' shards, so no device ever holds a whole sharded tensor."""
    from gemma4_jax import matvec
    from gemma4_jax.hf_format import np_dtype
    from gemma4_jax.quant.checkpoint import QuantizedSource

    total = plan_load(source, dtype, ple_mode).weight_bytes
    meter = files.Progress(f"loading {source.config.name}", total, min_total=10**8 if progress else math.inf)
    params: Params = {}
    for leaf in source.leaves():
        if leaf.path == ple.TABLE_PATH and ple_mode != "device":
            value = ple.host_table(source, ple_mode)
            nbytes = 0
        elif isinstance(source, QuantizedSource):
            value = source.load_weight(leaf, dtype)
            if layout == "decode" and matvec.uses_decode_layout(leaf) and not isinstance(value, jax.Array):
                value = matvec.to_decode_weight(value, leaf)  # packed codes, cut into the decode layout's chunks
            nbytes = 0
        elif mesh is not None:
            value = _read_sharded(source, leaf, np_dtype(param_spec.leaf_dtype(leaf, dtype)), mesh, check_finite)
            nbytes = math.prod(leaf.shape) * value.dtype.itemsize
        else:
            # Read straight into the load dtype (a random source draws in it, as init_params does), in an aligned
            # buffer that the CPU backend adopts as the array's memory without a copy.
            leaf_dtype = np_dtype(param_spec.leaf_dtype(leaf, dtype))
            array = files.as_aligned(source.read(leaf, leaf_dtype), leaf_dtype)
            if check_finite:  # clip bounds may be +-inf (no clipping) but never NaN
                check_finite_array(array, leaf.name, source.description, allow_inf=leaf.init in ("inf", "-inf"))
            if layout == "decode" and matvec.uses_decode_layout(leaf):
                value = matvec.to_decode_weight(array, leaf)
            else:
                value = jax.device_put(array, may_alias=True)
            nbytes = value.nbytes
            del array
        tree_set(params, leaf.path, value)
        meter.advance(nbytes)
    meter.close()
    return params


def _read_sharded(source: sources.WeightSource, leaf: param_spec.Leaf, dtype, mesh, check_finite: bool):
    from gemma4_jax import sharding

    target = jax.sharding.NamedSharding(mesh, sharding.leaf_spec(leaf, mesh))
    allow_inf = leaf.init in ("inf", "-inf")
    whole = None
    blocks: dict = {}

    def block(index):
        nonlocal whole
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:  # devices holding the same block (replicated axes) share one read
            if source.reads_slices:
                value = source.read_slice(leaf, dtype, index)
            else:
                if whole is None:
                    whole = source.read(leaf, dtype)
                value = whole[index]
            if check_finite:
                check_finite_array(value, leaf.name, source.description, allow_inf=allow_inf)
            blocks[key] = np.asarray(value, order="C")  # (np.ascontiguousarray makes a 0-d leaf 1-d)
        return blocks[key]

    return jax.make_array_from_callback(leaf.shape, target, block)


def check_finite_array(array: np.ndarray, name: str, where: str, allow_inf: bool = False) -> None:
    """Raises when the tensor holds a NaN or (unless `allow_inf`) an Inf: checked in blocks of rows."""
    test = np.isnan if allow_inf else (lambda block: ~np.isfinite(block))
    rows = max(1, (1 << 24) // max(1, math.prod(array.shape[1:])))
    for start in range(0, max(1, array.shape[0] if array.ndim else 1), rows):
        if test(array[start : start + rows] if array.ndim else array).any():
            raise Gemma4Error(f"{where}: tensor {name} has non-finite values (NaN or Inf); the checkpoint is damaged")


def load(
    source: str | sources.WeightSource | None = None,
    *,
    dtype=None,
    ple: str = "device",
    variant: str | None = None,
    config: str | Gemma4Config | None = None,
    init_seed: int = 0,
    tokenizer: str | None = None,
    default_dtype: str = "bfloat16",
    progress: bool = True,
    text_only: bool = False,
    layout: str = "auto",
    mesh=None,
) -> Model:
    """A model from `source`: a local orbax / HF / quantized directory, `kaggle:...`, `hf:...`, or None for random
    weights of `variant` (a preset) or `config` (an HF-style config.json path or a Gemma4Config; default: the tiny
    demo). `dtype` is the parameter/compute dtype (default `default_dtype`; float32 falls back to bfloat16 with a note
    when it does not fit but bfloat16 does). `ple` puts the PLE table on the "device", in "host" RAM or "mmap"s it
    from an HF checkpoint. `tokenizer` overrides the checkpoint's tokenizer (a directory or file). `text_only` leaves
    the vision and audio encoders out. `layout` "auto" stores the text decoder's matrices for fast decoding where
    that pays (`matvec`: on CPU, 16/32-bit weights), "checkpoint" keeps the official layout (training, exports).
    `mesh` shards the parameters over devices (`gemma4_jax.sharding`): a `jax.sharding.Mesh` with its axes, sizes
    such as {"fsdp": 4, "tensor": 2}, or the `--mesh` text ("fsdp=4,tensor=2", a preset, "auto"); each tensor goes
    straight onto its shards while it is read.

    Options that do not apply are refused: `ple`/`variant`/`config` for quantized checkpoints, `ple` other than
    "device" for models without PLE."""
    if ple not in ple_modes():
        raise Gemma4Error(f"--ple must be one of {', '.join(ple_modes())}, got {ple!r}")
    config_file = config if isinstance(config, str) else None
    if isinstance(source, sources.WeightSource):
        if variant or config:
            raise Gemma4Error("variant / config apply when opening a checkpoint, not to an opened source")
        src = source.drop_towers() if text_only else source
    elif isinstance(config, Gemma4Config):
        if source is not None:
            raise Gemma4Error("a Gemma4Config applies to random weights; for a checkpoint give a config.json path")
        src: sources.WeightSource = sources.RandomSource(config.text_only() if text_only else config, init_seed)
    else:
        src = sources.open_source(
            source, variant=variant, config_file=config_file, init_seed=init_seed, text_only=text_only
        )
    if isinstance(src, _quantized_source_type()) and ple != "device":
        raise Gemma4Error("--ple host/mmap applies to float checkpoints (a quantized one keeps its PLE table packed)")
    if ple != "device" and not src.config.per_layer_input_dim:
        raise Gemma4Error(f"--ple {ple}: {src.config.name} has no Per-Layer Embeddings table")
    if ple == "mmap" and not _can_mmap(src):
        raise Gemma4Error(
            "--ple mmap memory-maps the table from an HF checkpoint's safetensors file: give --checkpoint with one "
            "(`gemma4-jax convert --to hf` writes one from an orbax checkpoint)"
        )
    asked = parse_dtype(dtype)
    chosen = asked or parse_dtype(default_dtype)
    plan = plan_load(src, chosen, ple)
    available = available_memory()
    if asked is None and chosen == jnp.float32 and plan.peak > available:
        smaller = plan_load(src, jnp.bfloat16, ple)
        if smaller.peak <= available:
            print(
                f"gemma4-jax: float32 needs {files.human_bytes(plan.peak)} but {files.human_bytes(available)} is "
                f"available: loading in bfloat16 (--dtype float32 to insist)",
                file=sys.stderr,
            )
            chosen, plan = jnp.dtype(jnp.bfloat16), smaller
    if mesh is not None:
        mesh = mesh_for(src.config, mesh)
        if isinstance(src, _quantized_source_type()):
            raise Gemma4Error(
                "--mesh: a quantized checkpoint loads on one device; shard the float checkpoint it came from"
            )
    if mesh is None or (jax.default_backend() == "cpu" and jax.process_count() == 1):
        check_fits(src, plan, available)  # on accelerators the shards live in device memory, not host RAM
    if layout not in ("auto", "checkpoint", "decode"):
        raise Gemma4Error(f"layout must be auto, checkpoint or decode, got {layout!r}")
    if mesh is not None:
        layout = "checkpoint"  # the decode layout is a single-device CPU form
    if layout == "auto":
        from gemma4_jax import matvec

        layout = "decode" if matvec.wanted(chosen) else "checkpoint"
    params = read_params(src, chosen, ple, progress, layout=layout, mesh=mesh)
    tok = load_tokenizer_of(tokenizer or src.directory, required=tokenizer is not None)
    return Model(src.config, params, tok, src.description, src.directory, mesh)


def mesh_for(config: Gemma4Config, mesh) -> jax.sharding.Mesh | None:
    """A `jax.sharding.Mesh` from what `load(mesh=...)` accepts, checked against `config` (one device: None)."""
    from gemma4_jax import sharding

    if isinstance(mesh, str):
        mesh = sharding.parse_mesh(mesh, config, jax.device_count())
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = sharding.make_mesh(mesh)
    if tuple(mesh.axis_names) != sharding.MESH_AXES:
        raise Gemma4Error(f"a mesh needs the axes {', '.join(sharding.MESH_AXES)}, got {', '.join(mesh.axis_names)}")
    sharding.check_mesh_fits(config, mesh)
    return mesh if mesh.size > 1 else None


def ple_modes() -> tuple[str, ...]:
    return ple.PLE_MODES


def load_tokenizer_of(path: str | None, required: bool) -> Tokenizer | None:
    """The tokenizer at `path` (a directory or file); None if there is none and it is not `required`."""
    from gemma4_jax.tokenizer import load_tokenizer

    if path is None:
        return None
    if not os.path.exists(path):
        if required:
            raise Gemma4Error(f"tokenizer path not found: {path}")
        return None
    try:
        return load_tokenizer(path)
    except Gemma4Error:
        if required:
            raise
        return None


def from_params(
    config: Gemma4Config, params: Params, tokenizer: Tokenizer | None = None, source="parameters", mesh=None
):
    """A Model around parameters already in memory; with a `mesh` (as `load` takes it) they are resharded onto it."""
    from gemma4_jax import sharding

    if mesh is not None and (mesh := mesh_for(config, mesh)) is not None:
        specs = sharding.param_specs(config, mesh)
        params = sharding.place(params, mesh, {k: specs[k] for k in params})
    return Model(config, params, tokenizer, source, mesh=mesh)
