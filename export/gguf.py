"""`gemma4-jax export gguf`: a GGUF file that llama.cpp runs (arch `gemma4`, spec §5.4).

    gemma4-jax export gguf --checkpoint DIR --quant q4_0 -o model.gguf
    gemma4-jax export gguf --variant tiny_keqv --tokenizer TOKDIR --quant f32 -o tiny.gguf   # random weights
    gemma4-jax export gguf --checkpoint DIR --quant q4_0 -o model.gguf --mmproj mmproj.gguf   # + the encoders

GGUF tensors keep the Hugging Face `[out, in]` layout, so every tensor is one HF tensor under its GGUF name (both
from the parameter spec), plus the generated `rope_freqs` of p-RoPE. Tensors are read from the source in blocks of
rows (an HF checkpoint: straight from its safetensors files), converted and written to the file: the exporter
holds about one block (~64 MiB of f32), or one tensor of other sources, never the model. The file appears at the
destination only when complete (`files.atomic_output`).

Storage types (`--quant`) follow llama.cpp's own tools (`gemma4_jax.quant.policy.gguf_type` says which and why);
a matrix whose rows are not a multiple of the 32-element block is stored as f16 (both tools do this). Q8_0/Q4_0
bytes come from `gemma4_jax.quant.codecs` (byte-identical to gguf-py's reference quantizers).

`--mmproj FILE` also writes the vision and audio encoders as the projector file llama.cpp's multimodal library
(tools/mtmd) reads beside the text model: arch `clip`, projector types `gemma4v` / `gemma4a`, tensor names and
forms from the parameter spec, types from `quant.policy.mmproj_type`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable

import numpy as np

from gemma4_jax import param_spec
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.files import Progress
from gemma4_jax.quant.policy import GGUF_QUANTS as QUANTS
from gemma4_jax.quant.policy import MMPROJ_QUANTS, gguf_type, mmproj_type

ARCH = "gemma4"
ROPE_FREQS = "rope_freqs.weight"
_CHUNK_BYTES = 64 << 20  # f32 bytes converted at a time
# Added tokens that llama.cpp's converter marks USER_DEFINED so that they are rendered in the output and the chat
# parser can read them (the other special tokens are CONTROL).
_VISIBLE_SPECIALS = frozenset(
    {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
    }[quant]


def encoder(qtype) -> Callable[[np.ndarray], np.ndarray]:
    """float32 rows [..., n] -> the stored array for `qtype` (bytes for the block types), as the exporter writes it."""
    import ml_dtypes
    from gguf import GGMLQuantizationType as T

    if qtype == T.F32:
        return lambda x: x.astype(np.float32, copy=False)
    if qtype == T.F16:
        return lambda x: x.astype(np.float16)
    if qtype == T.BF16:
        return lambda x: x.astype(ml_dtypes.bfloat16)
    from gemma4_jax.quant import codecs

    return {T.Q8_0: codecs.q8_0_encode, T.Q4_0: codecs.q4_0_encode}[qtype]


def stored_nbytes(qtype, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


# ----- where the tensors come from --------------------------------------------------------------------------


@dataclasses.dataclass
class TensorPlan:
    """One GGUF tensor: HF-layout shape, storage type, and how to read a block of its leading-axis rows."""

    name: str
    shape: tuple[int, ...]
    qtype: object
    read_rows: Callable[[int, int], np.ndarray]

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.qtype, self.shape)


def plan_tensors(source, quant: str, n_vocab: int) -> list[TensorPlan]:
    """Every GGUF tensor in file order, read from `source` (a `sources.WeightSource`) in blocks of rows.

    `n_vocab` < config.vocab_size trims both embedding tables to the tokenizer's vocabulary (llama.cpp sizes
    them by the token list; the converter trims the token embedding the same way).
    """
    config = source.config
    rotated = int(config.global_rope_proportion * config.global_head_dim // 2)
    # p-RoPE on global layers: llama.cpp rotates all global_head_dim/2 pairs of a NeoX RoPE and divides each
    # frequency by this factor; 1e30 makes the unrotated pairs' angle 0 (the converter writes the same).
    freqs = np.array([1.0] * rotated + [1e30] * (config.global_head_dim // 2 - rotated), np.float32)
    plans = [TensorPlan(ROPE_FREQS, freqs.shape, gguf_type(None, freqs.shape, quant), lambda a, b: freqs[a:b])]
    for leaf in param_spec.param_spec(config):
        if leaf.unused or leaf.part != "text":
            continue  # llama.cpp's KV-shared readers have no K/V tensors; the encoders go to an mmproj file
        for index, (name, shape) in enumerate(zip(leaf.gguf, leaf.hf_shapes, strict=True)):
            if leaf.axes[0] == "vocab":
                shape = (n_vocab, *shape[1:])
            read = lambda a, b, leaf=leaf, index=index: source.hf_rows(leaf, index, a, b)  # noqa: E731
            plans.append(TensorPlan(name, shape, gguf_type(leaf, shape, quant), read))
    return plans


def _gguf_form(leaf, rows: np.ndarray) -> np.ndarray:
    """Rows of an HF tensor of `leaf` as llama.cpp's mmproj stores them (see param_spec.GGUF_FORMS)."""
    if leaf.gguf_form == "patch_chw":  # [D, p·p·3] (pixel-major, RGB last) -> a conv kernel [D, 3, p, p]
        p = math.isqrt(rows.shape[1] // 3)
        return rows.reshape(rows.shape[0], p, p, 3).transpose(0, 3, 1, 2)
    if leaf.gguf_form == "softplus":  # log(1 + e^x), in float64 then rounded once (torch's f32 is within 1 ulp)
        return np.logaddexp(0.0, np.asarray(rows, np.float64)).astype(np.float32)
    if leaf.gguf_form == "squeeze":  # [C, 1, K] -> [C, K]
        return rows.reshape(rows.shape[0], rows.shape[2])
    return rows


def _gguf_shape(leaf, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf.gguf_form == "patch_chw":
        p = math.isqrt(hf_shape[1] // 3)
        return (hf_shape[0], 3, p, p)
    if leaf.gguf_form == "squeeze":
        return (hf_shape[0], hf_shape[2])
    return hf_shape or (1,)  # GGUF has no 0-d tensors: a clip bound is [1]


def plan_mmproj(source, quant: str, parts: tuple[str, ...]) -> list[TensorPlan]:
    """Every mmproj tensor of the encoders in `parts` ("vision", "audio"), in spec order, read in blocks of rows
    like the text tensors."""
    plans = []
    for leaf in param_spec.param_spec(source.config):
        if leaf.part not in parts:
            continue
        for index, (name, hf_shape) in enumerate(zip(leaf.gguf, leaf.hf_shapes, strict=True)):
            shape = _gguf_shape(leaf, hf_shape)
            if hf_shape:

                def read(a, b, leaf=leaf, index=index):
                    return _gguf_form(leaf, source.hf_rows(leaf, index, a, b))
            else:  # a clip bound: the leaf is one value (or one per stacked layer)

                def read(a, b, leaf=leaf, index=index):
                    return np.reshape(leaf.to_hf(np.asarray(source.read(leaf, np.float32)))[index], (1,))

            plans.append(TensorPlan(name, shape, mmproj_type(leaf, name, shape, quant), read))
    return plans


# ----- tokenizer --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    special: object  # gguf.SpecialVocab: merges, special token ids, chat template


def read_vocab(directory: str) -> Vocab:
    """Token list and types from `tokenizer.json`, merges / special ids / chat template via gguf.SpecialVocab."""
    import gguf

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise Gemma4Error(
            f"{directory}: no tokenizer.json (GGUF stores the vocabulary; pass --tokenizer DIR with the checkpoint's"
            " tokenizer files)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            tokenizer = json.load(f)
        model = tokenizer["model"]
        by_id: dict[int, str] = {int(i): piece for piece, i in model["vocab"].items()}
        added = {int(t["id"]): t for t in tokenizer.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Gemma4Error(f"{path}: not a readable tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise Gemma4Error(
            f"{path}: expected a BPE model with byte fallback (Gemma 4's tokenizer), got {model.get('type')}"
        )
    for i, token in added.items():
        by_id[i] = token["content"]
    n = max(by_id) + 1
    if len(by_id) != n:
        missing = next(i for i in range(n) if i not in by_id)
        raise Gemma4Error(f"{path}: token ids are not contiguous (no token with id {missing})")
    tokens, types = [], []
    for i in range(n):
        piece = by_id[i]
        if i in added:
            special = added[i].get("special", False)
            kind = gguf.TokenType.CONTROL if special and piece not in _VISIBLE_SPECIALS else gguf.TokenType.USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(piece):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece)
        types.append(int(kind))
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=n)
    if not special.merges:
        raise Gemma4Error(f"{path}: no BPE merges (llama.cpp's gemma4 tokenizer needs them)")
    return Vocab(tokens, types, special)


# ----- metadata ---------------------------------------------------------------------------------------------


def check_llama_cpp_support(config) -> None:
    """Raises Gemma4Error for configs llama.cpp's gemma4 graph cannot express.

    llama.cpp does not store which layer a KV-shared layer reads: it takes local readers' K/V from layer
    `first_shared - 2` and global readers' from `first_shared - 1` (src/llama-model.cpp). Every official
    variant fits that; a config whose last two owners are not (local, global) does not.
    """
    from gemma4_jax.config import GLOBAL, LOCAL

    if not config.num_kv_shared_layers:
        return
    first = config.first_kv_shared_layer
    llama_source = {LOCAL: first - 2, GLOBAL: first - 1}
    for i in range(first, config.num_layers):
        kind = config.layer_types[i]
        if first < 2 or config.kv_source_layers[i] != llama_source[kind]:
            raise Gemma4Error(
                f"config {config.name!r}: KV-shared layer {i} ({kind}) reads layer {config.kv_source_layers[i]}, but "
                f"llama.cpp's gemma4 models read layer {llama_source[kind]} (layers {first - 2} and {first - 1}, the "
                "last two before the shared ones, must be local then global)"
            )


def add_metadata(writer, config, quant: str, vocab: Vocab, name: str) -> None:
    """The `gemma4` keys llama.cpp reads (src/models/gemma4.cpp, llama-model.cpp) and the tokenizer."""
    import gguf

    from gemma4_jax.config import LOCAL

    n = config.num_layers
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(int(_file_type(quant)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(n)
    ffw = [config.layer_ffw_hidden(i) for i in range(n)]
    writer.add_feed_forward_length(ffw[0] if len(set(ffw)) == 1 else ffw)
    writer.add_head_count(config.num_heads)
    kv_heads = [config.layer_kv_heads(i) for i in range(n)]
    writer.add_head_count_kv(kv_heads[0] if len(set(kv_heads)) == 1 else kv_heads)
    writer.add_key_length(config.global_head_dim)
    writer.add_value_length(config.global_head_dim)
    writer.add_key_length_swa(config.head_dim)
    writer.add_value_length_swa(config.head_dim)
    # Global layers rotate with their full head dim and `rope_freqs` switching pairs off (p-RoPE).
    writer.add_rope_dimension_count(config.global_head_dim)
    writer.add_rope_dimension_count_swa(config.head_dim)
    writer.add_rope_freq_base(config.global_rope_base)
    writer.add_rope_freq_base_swa(config.local_rope_base)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([t == LOCAL for t in config.layer_types])
    writer.add_shared_kv_layers(config.num_kv_shared_layers)
    writer.add_embedding_length_per_layer_input(config.per_layer_input_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.final_logit_softcap:
        writer.add_final_logit_softcapping(config.final_logit_softcap)
    if config.num_experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_token)
        writer.add_expert_feed_forward_length(config.expert_hidden)

    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(vocab.tokens)
    # BPE ignores scores; llama.cpp's converter writes this placeholder for every token.
    writer.add_token_scores([-1000.0] * len(vocab.tokens))
    writer.add_token_types(vocab.token_types)
    special = vocab.special
    # A tokenizer.json without tokenizer_config.json names no special tokens; llama.cpp would then add BOS id -1
    # (it forces add_bos for gemma4). Gemma 4's own pieces say which they are.
    for kind, piece in (("bos", "<bos>"), ("eos", "<eos>"), ("pad", "<pad>"), ("unk", "<unk>")):
        if kind not in special.special_token_ids and piece in vocab.tokens:
            special.special_token_ids[kind] = vocab.tokens.index(piece)
    # The chat template emits <bos> itself, but llama.cpp forces add_bos for gemma4 (and the converter writes it).
    special.add_special_token = {k: v for k, v in special.add_special_token.items() if k != "bos"}
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


MMPROJ_ARCH = "clip"
PROJECTOR_TYPES = {"vision": "gemma4v", "audio": "gemma4a"}  # tools/mtmd/clip-impl.h


def add_mmproj_metadata(writer, config, quant: str, parts: tuple[str, ...], name: str) -> None:
    """The `clip.*` keys tools/mtmd/clip.cpp reads for the `gemma4v` / `gemma4a` projectors. Written as raw keys
    so that an older gguf-py without the Gemma 4 constants writes the same file."""
    import gguf

    writer.add_type("mmproj")
    writer.add_name(name)
    writer.add_file_type(int(_file_type(quant)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if "vision" in parts:
        v = config.vision
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_string("clip.vision.projector_type", PROJECTOR_TYPES["vision"])
        writer.add_uint32("clip.vision.projection_dim", config.embed_dim)
        writer.add_uint32("clip.vision.image_size", 224)  # required by the loader, unused by gemma4v (as converted)
        writer.add_uint32("clip.vision.patch_size", v.patch_size)
        writer.add_uint32("clip.vision.embedding_length", v.width)
        writer.add_uint32("clip.vision.feed_forward_length", v.ffw_hidden)
        writer.add_uint32("clip.vision.block_count", v.num_layers)
        writer.add_uint32("clip.vision.attention.head_count", v.num_heads)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", v.rms_norm_eps)
        writer.add_uint32("clip.vision.projector.scale_factor", v.pooling_kernel)
        # Pixels in [0, 1]: the encoder maps them to [-1, 1] itself (spec §4.1).
        writer.add_array("clip.vision.image_mean", [0.0, 0.0, 0.0])
        writer.add_array("clip.vision.image_std", [1.0, 1.0, 1.0])
        # The MLP's GELU is the tanh form (gelu_pytorch_tanh). Without this key mtmd runs x·sigmoid(1.702x)
        # ("gelu_quick"), which llama.cpp's own converter leaves it doing for Gemma 4.
        writer.add_bool("clip.use_gelu", True)
    if "audio" in parts:
        a = config.audio
        writer.add_bool("clip.has_audio_encoder", True)
        writer.add_string("clip.audio.projector_type", PROJECTOR_TYPES["audio"])
        writer.add_uint32("clip.audio.projection_dim", config.embed_dim)
        writer.add_uint32("clip.audio.embedding_length", a.hidden_size)
        writer.add_uint32("clip.audio.feed_forward_length", a.ffw_hidden)
        writer.add_uint32("clip.audio.block_count", a.num_layers)
        writer.add_uint32("clip.audio.attention.head_count", a.num_heads)
        writer.add_uint32("clip.audio.num_mel_bins", a.num_mel_bins)
        writer.add_float32("clip.audio.attention.layer_norm_epsilon", a.rms_norm_eps)


# ----- writing ----------------------------------------------------------------------------------------------


class _StreamedTensor:
    """What GGUFWriter.write_tensor_data needs (`nbytes`, `tofile`), produced block by block while writing."""

    def __init__(self, plan: TensorPlan, on_bytes: Callable[[int], None]):
        self.plan = plan
        self.nbytes = plan.nbytes
        self.on_bytes = on_bytes

    def byteswap(self, inplace=False):  # GGUFWriter only calls this for big-endian output
        raise NotImplementedError

    def tofile(self, f) -> None:

        plan = self.plan
        encode = encoder(plan.qtype)
        if not plan.shape:
            rows, per_row = 1, 1
        else:
            rows, per_row = plan.shape[0], math.prod(plan.shape[1:])
        step = max(1, _CHUNK_BYTES // (4 * per_row))
        written = 0
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = np.asarray(plan.read_rows(start, stop))
            if block.shape != (stop - start, *plan.shape[1:]):
                raise Gemma4Error(f"{plan.name}: got rows of shape {block.shape}, expected {plan.shape[1:]}")
            data = np.ascontiguousarray(encode(np.asarray(block, np.float32)))
            f.write(data.reshape(-1).view(np.uint8).data)  # not ndarray.tofile: its errors lose the errno
            written += data.nbytes
            self.on_bytes(data.nbytes)
        if written != self.nbytes:
            raise Gemma4Error(f"{plan.name}: wrote {written} bytes, expected {self.nbytes}")


def write_gguf(path: str, arch: str, add_metadata: Callable, plans: list[TensorPlan], what: str = "GGUF") -> None:
    """Writes the whole file at `path` (the caller renames it into place): `add_metadata(writer)`, then `plans`."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    add_metadata(writer)
    for plan in plans:
        # Logical shape with a float dtype: GGUFWriter stores it reversed (ggml order) with the raw type.
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    progress = Progress(f"writing {what}", sum(p.nbytes for p in plans))
    try:
        for plan in plans:
            writer.write_tensor_data(_StreamedTensor(plan, lambda n, name=plan.name: progress.advance(n, name)))
    finally:
        writer.close()
    progress.close()


# ----- the task ---------------------------------------------------------------------------------------------


def encoder_parts(config) -> tuple[str, ...]:
    return tuple(p for p in ("vision", "audio") if getattr(config, p) is not None)


def export_gguf(
    source,
    out: str,
    *,
    quant: str = "f16",
    tokenizer_dir: str | None = None,
    mmproj: str | None = None,
    mmproj_quant: str = "f16",
) -> str:
    """Writes `source` (a `sources.WeightSource`) as a GGUF file at `out` with the vocabulary of `tokenizer_dir`
    (default: the source's directory), and with `mmproj` its encoders as llama.cpp's projector file. Returns a
    one-line summary (one per file)."""
    from gemma4_jax import files

    start = time.perf_counter()
    if quant not in QUANTS:
        raise Gemma4Error(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    out = files.check_output(out)
    if mmproj is not None:
        if mmproj_quant not in MMPROJ_QUANTS:
            raise Gemma4Error(
                f"--mmproj-quant {mmproj_quant!r}: the encoders are stored as one of {', '.join(MMPROJ_QUANTS)} "
                "(mtmd reads no 4-bit encoder weights)"
            )
        if not encoder_parts(source.config):
            raise Gemma4Error(
                f"--mmproj: {source.description} ({source.config.name}) has no vision or audio encoder"
                + (" (--text-only left them out)" if source.text_only else "")
            )
        mmproj = files.check_output(mmproj)
        if os.path.abspath(mmproj) == os.path.abspath(out):
            raise Gemma4Error(f"--mmproj {mmproj} is the model's own output path")
    tokenizer_dir = tokenizer_dir or source.directory
    if tokenizer_dir is None:
        raise Gemma4Error(f"{source.description} has no tokenizer: pass --tokenizer DIR (with tokenizer.json)")
    if not os.path.isdir(tokenizer_dir):
        raise Gemma4Error(f"tokenizer directory not found: {tokenizer_dir}")
    vocab = read_vocab(tokenizer_dir)
    config = source.config
    check_llama_cpp_support(config)
    n_vocab = len(vocab.tokens)
    if n_vocab > config.vocab_size:
        raise Gemma4Error(f"the tokenizer has {n_vocab} tokens but the model's embedding only {config.vocab_size} rows")
    plans = plan_tensors(source, quant, n_vocab)
    total = sum(p.nbytes for p in plans)
    files.log(
        f"exporting {source.description} ({config.name}, {config.num_layers} layers) to GGUF {quant}: "
        f"{len(plans)} tensors, {files.human_bytes(total)}"
    )
    name = os.path.splitext(os.path.basename(out))[0]
    with files.atomic_output(out) as tmp:
        write_gguf(tmp, ARCH, lambda writer: add_metadata(writer, config, quant, vocab, name), plans)
    summary = (
        f"wrote {out}: gemma4 GGUF {quant}, {len(plans)} tensors ({_kinds(plans)}), {n_vocab} tokens, "
        f"{files.human_bytes(os.path.getsize(out))}, {time.perf_counter() - start:.1f} s"
    )
    if mmproj is not None:
        summary += "\n" + export_mmproj(source, mmproj, quant=mmproj_quant)
    return summary


def _kinds(plans: list[TensorPlan]) -> str:
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype.name.lower()] = counts.get(plan.qtype.name.lower(), 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def export_mmproj(source, out: str, *, quant: str = "f16") -> str:
    """Writes the encoders of `source` as the projector GGUF llama.cpp's mtmd reads. Returns a one-line summary."""
    from gemma4_jax import files

    start = time.perf_counter()
    parts = encoder_parts(source.config)
    if not parts:
        raise Gemma4Error(f"{source.description} ({source.config.name}) has no vision or audio encoder")
    out = files.check_output(out)
    plans = plan_mmproj(source, quant, parts)
    files.log(
        f"exporting the {' and '.join(parts)} encoder{'s' if len(parts) > 1 else ''} to a GGUF mmproj {quant}: "
        f"{len(plans)} tensors, {files.human_bytes(sum(p.nbytes for p in plans))}"
    )
    name = os.path.splitext(os.path.basename(out))[0]
    with files.atomic_output(out) as tmp:
        metadata = lambda writer: add_mmproj_metadata(writer, source.config, quant, parts, name)  # noqa: E731
        write_gguf(tmp, MMPROJ_ARCH, metadata, plans, "GGUF mmproj")
    return (
        f"wrote {out}: mmproj ({', '.join(PROJECTOR_TYPES[p] for p in parts)}) {quant}, {len(plans)} tensors "
        f"({_kinds(plans)}), {files.human_bytes(os.path.getsize(out))}, {time.perf_counter() - start:.1f} s"
    )
