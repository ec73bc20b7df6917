"""`gemma4-jax export gguf`: a GGUF file that llama.cpp runs (arch `gemma4`, spec §5.4).

    gemma4-jax export gguf --checkpoint DIR --quant q4_0 -o model.gguf
    gemma4-jax export gguf --variant tiny_keqv --tokenizer TOKDIR --quant f32 -o tiny.gguf   # random weights

GGUF tensors keep the Hugging Face `[out, in]` layout, so every tensor is one HF tensor under a new name (the
table in `gguf_name`), plus the generated `rope_freqs` of p-RoPE. From a checkpoint the tensors are read from
the safetensors files in blocks of rows, converted and written straight to the file: the exporter holds about
one block (~64 MiB of f32) at a time, never the model. The file is written under a temporary name next to
the destination and renamed when complete, so a killed export leaves no file at the destination.

Storage types (`--quant`), as llama.cpp's own tools choose them:
- Always f32: 1-D tensors (norms, `layer_output_scale`, router/expert scales, `rope_freqs`) and the MoE router
  `ffn_gate_inp.weight` (convert_hf_to_gguf.py forces both for every file type).
- f32 / f16 / bf16: every other tensor in that type.
- q8_0: every other tensor in Q8_0, like `convert_hf_to_gguf.py --outtype q8_0` (PLE table and token embedding
  included).
- q4_0: like `llama-quantize ... Q4_0` run on an f16 file: matrices in Q4_0, except `per_layer_model_proj`
  (llama-quantize leaves it unquantized: f16 here) and the two embedding tables `token_embd` (also the tied
  output head) and `per_layer_token_embd`, which llama-quantize stores as Q6_K; we have no Q6_K encoder and use
  Q8_0, the type llama-quantize itself falls back to for them.
- A matrix whose rows are not a multiple of the 32-element block is stored as f16 (both tools do this).
Q8_0/Q4_0 bytes come from `gemma4_jax.quant` (byte-identical to gguf-py's reference quantizers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

import numpy as np

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCH = "gemma4"
_BLOCK = 32  # elements per Q8_0 / Q4_0 block
_CHUNK_BYTES = 64 << 20  # f32 bytes converted at a time
# Added tokens that llama.cpp's converter marks USER_DEFINED so that they are rendered in the output and the chat
# parser can read them (the other special tokens are CONTROL).
_VISIBLE_SPECIALS = frozenset(
    {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_arguments(parser) -> None:
    from gemma4_jax.cli import add_model_args

    add_model_args(parser, "bfloat16")
    parser.add_argument(
        "--tokenizer",
        help="directory with tokenizer.json (+ tokenizer_config.json, chat_template.jinja); default: --checkpoint",
    )
    parser.add_argument(
        "--quant", default="f16", choices=QUANTS, help="storage type of the weight matrices (default f16)"
    )
    parser.add_argument("-o", "--output", required=True, help="the .gguf file to write")


# ----- names ------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
    "norm.weight": "output_norm.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
    # MoE layers: the dense MLP above is the shared expert; these add the routed experts.
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
}
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of an HF text-decoder tensor name (without the `model.` prefix)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise KeyError(f"no GGUF name for {hf_name}")


# ----- storage types ----------------------------------------------------------------------------------------


def storage_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type `name` is stored in for `--quant quant` (the rules in the module docstring)."""
    from gguf import GGMLQuantizationType as T

    if quant == "f32" or len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return T.F32
    if quant in ("f16", "bf16"):
        return T.F16 if quant == "f16" else T.BF16
    if shape[-1] % _BLOCK:
        return T.F16
    if quant == "q8_0":
        return T.Q8_0
    if name == "per_layer_model_proj.weight":
        return T.F16
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return T.Q8_0
    return T.Q4_0


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
    }[quant]


def _encoder(qtype) -> Callable[[np.ndarray], np.ndarray]:
    """float32 rows [..., n] -> the stored array for `qtype` (bytes for the block types)."""
    import ml_dtypes
    from gguf import GGMLQuantizationType as T

    if qtype == T.F32:
        return lambda x: x.astype(np.float32, copy=False)
    if qtype == T.F16:
        return lambda x: x.astype(np.float16)
    if qtype == T.BF16:
        return lambda x: x.astype(ml_dtypes.bfloat16)
    from gemma4_jax import quant

    return {T.Q8_0: quant.q8_0_encode, T.Q4_0: quant.q4_0_encode}[qtype]


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


@functools.lru_cache(maxsize=8)
def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every text tensor `config` has (reader-layer K/V excluded: llama.cpp has none).

    Cached: tracing the model's init for its shapes takes seconds. Callers must not modify the dict."""
    from gemma4_jax import checkpoint, model

    shapes = model.param_shapes(config)
    out = {}
    for entry in checkpoint.mapping(config):
        if entry.optional:
            continue
        leaf = model.tree_get(shapes, entry.path)
        # to_hf only transposes/reshapes: run it on a zero-stride array to get the HF shapes for free.
        fake = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), leaf.shape, (0,) * len(leaf.shape))
        for name, array in zip(entry.hf_names, entry.to_hf(fake), strict=True):
            out[name] = tuple(array.shape)
    return out


class _CheckpointRows:
    """Row blocks of the tensors of an HF checkpoint, read with plain file reads (nothing stays resident)."""

    def __init__(self, path: str):
        from gemma4_jax import checkpoint

        self.files = checkpoint.SafetensorsDir(path)
        self.prefix = self.files.text_prefix()

    def shape(self, hf_name: str) -> tuple[int, ...] | None:
        return self.files.shape(self.prefix + hf_name)

    def read_rows(self, hf_name: str, start: int, stop: int) -> np.ndarray:
        import ml_dtypes

        from gemma4_jax.errors import Gemma4Error

        dtype = self.files.dtype(self.prefix + hf_name)
        if dtype not in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16):
            raise Gemma4Error(f"tensor {hf_name} has dtype {dtype}, expected a float type")
        return self.files.read_rows(self.prefix + hf_name, start, stop)


class _ParamsRows:
    """Row blocks of the HF-layout tensors of an in-memory parameter tree (random weights)."""

    def __init__(self, config, params):
        from gemma4_jax import checkpoint

        self._views = {}
        for entry in checkpoint.mapping(config):
            if entry.optional:
                continue
            for index, name in enumerate(entry.hf_names):
                self._views[name] = (entry, index)
        self._params = params
        self._current: tuple[str, np.ndarray] | None = None  # the tensor being written, converted once

    def read_rows(self, hf_name: str, start: int, stop: int) -> np.ndarray:
        from gemma4_jax import model

        if self._current is None or self._current[0] != hf_name:
            self._current = None  # drop the previous tensor before converting the next
            entry, index = self._views[hf_name]
            leaf = model.tree_get(self._params, entry.path)
            if not model.is_dense(leaf):  # a quantized (or host-side) weight object
                leaf = leaf.materialize(np.float32)
            array = entry.to_hf(np.asarray(leaf))[index]
            self._current = (hf_name, array)
        return self._current[1][start:stop]


def plan_tensors(config, shapes, quant: str, row_reader, n_vocab: int) -> list[TensorPlan]:
    """Every GGUF tensor in file order. `shapes` from `hf_shapes(config)`; `row_reader(hf_name, start, stop)`
    gives HF-layout rows.

    `n_vocab` < config.vocab_size trims both embedding tables to the tokenizer's vocabulary (llama.cpp sizes
    them by the token list; the converter trims the token embedding the same way).
    """
    rotated = int(config.global_rope_proportion * config.global_head_dim // 2)
    # p-RoPE on global layers: llama.cpp rotates all global_head_dim/2 pairs of a NeoX RoPE and divides each
    # frequency by this factor; 1e30 makes the unrotated pairs' angle 0 (the converter writes the same).
    freqs = np.array([1.0] * rotated + [1e30] * (config.global_head_dim // 2 - rotated), np.float32)
    plans = [TensorPlan(ROPE_FREQS, freqs.shape, storage_type(ROPE_FREQS, freqs.shape, quant), lambda a, b: freqs[a:b])]
    for hf_name, shape in shapes.items():
        name = gguf_name(hf_name)
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            shape = (n_vocab, *shape[1:])
        read = lambda a, b, hf_name=hf_name: row_reader(hf_name, a, b)  # noqa: E731
        plans.append(TensorPlan(name, shape, storage_type(name, shape, quant), read))
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

    from gemma4_jax.errors import Gemma4Error

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
    from gemma4_jax.errors import Gemma4Error

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
    # The chat template emits <bos> itself, but llama.cpp forces add_bos for gemma4 (and the converter writes it).
    special.add_special_token = {k: v for k, v in special.add_special_token.items() if k != "bos"}
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)


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
        from gemma4_jax.errors import Gemma4Error

        plan = self.plan
        encode = _encoder(plan.qtype)
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
            data.tofile(f)
            written += data.nbytes
            self.on_bytes(data.nbytes)
        if written != self.nbytes:
            raise Gemma4Error(f"{plan.name}: wrote {written} bytes, expected {self.nbytes}")


class _Progress:
    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.start = self.last = time.perf_counter()

    def add(self, n: int, name: str) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= 2.0 or self.done == self.total:
            self.last = now
            print(
                f"  {100 * self.done / max(1, self.total):5.1f}%  {self.done / 2**30:.2f} / "
                f"{self.total / 2**30:.2f} GiB  {now - self.start:5.0f} s  {name}",
                file=sys.stderr,
                flush=True,
            )


def write_gguf(path: str, config, quant: str, plans: list[TensorPlan], vocab: Vocab, name: str) -> None:
    """Writes the whole file at `path` (the caller renames it into place)."""
    import gguf

    writer = gguf.GGUFWriter(path, ARCH)
    add_metadata(writer, config, quant, vocab, name)
    for plan in plans:
        # Logical shape with a float dtype: GGUFWriter stores it reversed (ggml order) with the raw type.
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    progress = _Progress(sum(p.nbytes for p in plans))
    try:
        for plan in plans:
            writer.write_tensor_data(_StreamedTensor(plan, lambda n, name=plan.name: progress.add(n, name)))
    finally:
        writer.close()


# ----- the command ------------------------------------------------------------------------------------------


def _check_output(path: str) -> str:
    from gemma4_jax.errors import Gemma4Error

    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise Gemma4Error(f"output {path} is a directory; give a file name such as model.gguf")
    if not os.path.isdir(os.path.dirname(path)):
        raise Gemma4Error(f"output directory does not exist: {os.path.dirname(path)}")
    return path


def _is_hf_directory(path: str) -> bool:
    from gemma4_jax import quant

    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and any(f.endswith(".safetensors") for f in os.listdir(path))
        and not quant.is_quantized_checkpoint(path)
    )


def _source(args):
    """(config, row reader, description, tokenizer directory or None).

    An HF directory is streamed from its safetensors files; every other source `cli.load_model` knows (orbax,
    kaggle:, hf:, quantized checkpoints, random weights) is loaded into memory first.
    """
    from gemma4_jax import cli
    from gemma4_jax.config import Gemma4Config

    if args.checkpoint and os.path.isdir(args.checkpoint) and _is_hf_directory(args.checkpoint):
        config = Gemma4Config.load_json(
            os.path.join(args.checkpoint, "config.json"), name=os.path.basename(os.path.normpath(args.checkpoint))
        )
        return config, _CheckpointRows(args.checkpoint), f"checkpoint {args.checkpoint}", args.checkpoint
    config, params, description = cli.load_model(args, "bfloat16")
    return config, _ParamsRows(config, params), description, getattr(args, "checkpoint_dir", None)


def _check_shapes(files: _CheckpointRows, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor the config needs is in the checkpoint with the expected shape (before anything is written)."""
    from gemma4_jax.errors import Gemma4Error

    problems = []
    for hf_name, shape in shapes.items():
        got = files.shape(hf_name)
        if got is None:
            problems.append(f"missing {hf_name}")
        elif got != shape:
            problems.append(f"{hf_name} has shape {list(got)}, config expects {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise Gemma4Error(f"{where}: {'; '.join(problems[:3])}{more}")


def run(args) -> int:
    from gemma4_jax import checkpoint
    from gemma4_jax.errors import Gemma4Error

    start = time.perf_counter()
    output = _check_output(args.output)
    if args.checkpoint and ":" not in args.checkpoint and not os.path.isdir(args.checkpoint):
        raise Gemma4Error(f"checkpoint directory not found: {args.checkpoint}")
    if not args.checkpoint and not args.tokenizer:
        raise Gemma4Error("random weights have no tokenizer: pass --tokenizer DIR (a directory with tokenizer.json)")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise Gemma4Error(f"tokenizer directory not found: {args.tokenizer}")
    if args.tokenizer:
        vocab = read_vocab(args.tokenizer)  # before loading any weights: fail fast
    config, rows, description, checkpoint_dir = _source(args)
    if not args.tokenizer:
        if not checkpoint_dir:
            raise Gemma4Error(f"{args.checkpoint}: no local tokenizer files; pass --tokenizer DIR")
        vocab = read_vocab(checkpoint_dir)
    check_llama_cpp_support(config)
    shapes = hf_shapes(config)
    if isinstance(rows, _CheckpointRows):
        _check_shapes(rows, shapes, args.checkpoint)
    n_vocab = len(vocab.tokens)
    if n_vocab > config.vocab_size:
        raise Gemma4Error(f"the tokenizer has {n_vocab} tokens but the model's embedding only {config.vocab_size} rows")
    plans = plan_tensors(config, shapes, args.quant, rows.read_rows, n_vocab)
    total = sum(p.nbytes for p in plans)
    print(
        f"exporting {description} ({config.name}, {config.num_layers} layers) to GGUF {args.quant}: "
        f"{len(plans)} tensors, {total / 2**30:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    name = os.path.splitext(os.path.basename(output))[0]

    def write(tmp: str) -> None:
        write_gguf(tmp, config, args.quant, plans, vocab, name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the temporary file is private (0600); the result is an ordinary file

    checkpoint.atomic_write(output, write)
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype.name.lower()] = counts.get(plan.qtype.name.lower(), 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(
        f"wrote {output}: gemma4 GGUF {args.quant}, {len(plans)} tensors ({kinds}), {n_vocab} tokens, "
        f"{os.path.getsize(output) / 2**30:.3f} GiB, {time.perf_counter() - start:.1f} s"
    )
    return 0
