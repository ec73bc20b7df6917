"""Which tensor gets which storage, for each target — side by side, decided on the parameter spec's classes.

The three targets differ on purpose, each following what its runtime (or its reference tool) does:
- JAX (`JaxPolicy`): our own quantized checkpoints. Under 4-bit formats every lookup table and PLE projection keeps
  8 bits: 4 bits there roughly doubles the error (toolchain notes; Google's mobile file keeps per-layer parts at 8
  bits), the token embedding is also the tied LM head whose error lands on every logit, and the PLE table is only
  gathered (it costs memory, not decode bandwidth). The router stays float: it decides which experts run; so do
  the vision and audio encoders (small, and run once per image or clip).
- GGUF (`gguf_type`): what llama.cpp's own tools write, so our files equal theirs: `convert_hf_to_gguf.py` keeps
  1-D tensors and the router in f32; `llama-quantize ... Q4_0` leaves the PLE context projection in f16 and puts
  the two embedding tables in Q6_K (we have no Q6_K encoder and use Q8_0, llama-quantize's own fallback for them),
  while the per-layer PLE gate/projection go to Q4_0 like every other matrix. The encoders go to a separate
  projector file (`mmproj_type`) at f32/f16/bf16/q8_0, typed as llama.cpp's converter types its mmproj files.
- LiteRT (`litert_bits`): what ai-edge-quantizer's dynamic recipe does to FULLY_CONNECTED weights (every matrix,
  the router and the tied LM head included, per-channel at the asked bits), with the per-layer-input projections
  kept at `ple_bits` (Google's E2B bundle keeps them at 8) and the lookup tables as int8 rows (GATHER reads int8).
  The vision/audio towers' matrices are int8 per channel in any quantized export (`litert_tower_bits`).
"""

from __future__ import annotations

import dataclasses
import fnmatch

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.param_spec import (
    EMBEDDING,
    MATRIX,
    PLE_GATE,
    PLE_PROJECTION,
    PLE_TABLE,
    ROUTER,
    SCALE,
    TOWER,
    Leaf,
)
from gemma4_jax.quant.codecs import FLOAT, FORMATS, GGML_BLOCK, QuantSpec
from gemma4_jax.quant.weight import stored_rows

_EIGHT_BIT = {"int4": QuantSpec("int8"), "q4_0": QuantSpec("q8_0", GGML_BLOCK)}


def default_block(fmt: str) -> int | None:
    return {"int4": 32, "q8_0": GGML_BLOCK, "q4_0": GGML_BLOCK}.get(fmt)


def parse_spec(text: str) -> QuantSpec:
    """ "float", "sfp8", "int8", "int8/64", "int4/channel", "q4_0", ... -> QuantSpec."""
    fmt, _, block = text.partition("/")
    if fmt != FLOAT and fmt not in FORMATS:
        raise Gemma4Error(f"unknown quantization format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not block:
        return QuantSpec(fmt, default_block(fmt))
    if fmt not in ("int8", "int4"):
        raise Gemma4Error(f"{fmt} has no block size option (got {text!r})")
    if block == "channel":
        return QuantSpec(fmt, None)
    if not block.isdigit() or int(block) < 2 or int(block) % 2:
        raise Gemma4Error(f"block size must be an even number or 'channel', got {block!r}")
    return QuantSpec(fmt, int(block))


@dataclasses.dataclass(frozen=True)
class JaxPolicy:
    """Chooses a QuantSpec per leaf for our quantized checkpoints and in-memory quantization (see the module doc).

    `block` sets int8/int4's block (None: the format's default: int4 32, int8 per channel). `overrides` are
    (fnmatch pattern on the path "layer_3/mlp/linear", spec), first match wins, before all defaults. A spec that
    does not fit a tensor (the contracted size not a multiple of the block, an odd size for int4) falls back to
    int8 per channel.
    """

    format: str
    block: int | None = None
    overrides: tuple[tuple[str, QuantSpec], ...] = ()

    def __post_init__(self):
        if self.format not in FORMATS:
            raise Gemma4Error(f"unknown quantization format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if self.block is not None and self.format not in ("int8", "int4"):
            raise Gemma4Error(f"a block size applies to int8/int4, not {self.format}")

    @classmethod
    def parse(cls, format: str, block: str | None = None, overrides=()) -> JaxPolicy:
        """From the command-line forms: block "64" / "channel", overrides "PATTERN=SPEC"."""
        parsed_block = None
        if block is not None:
            if format not in ("int8", "int4"):
                raise Gemma4Error(f"--block applies to int8/int4, not {format}")
            parsed_block = parse_spec(f"{format}/{block}").block
        pairs = []
        for text in overrides:
            pattern, sep, spec = text.partition("=")
            if not sep or not pattern or not spec:
                raise Gemma4Error(f"an override is PATTERN=SPEC (e.g. 'layer_*/mlp/linear=int8'), got {text!r}")
            pairs.append((pattern, parse_spec(spec)))
        return cls(format, parsed_block, tuple(pairs))

    def base_spec(self) -> QuantSpec:
        if self.format in ("int8", "int4") and self.block is not None:
            return QuantSpec(self.format, self.block)
        return QuantSpec(self.format, default_block(self.format))

    def choose(self, leaf: Leaf) -> QuantSpec:
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(leaf.name, pattern):
                return self._fit(spec, leaf)
        if not leaf.quantizable or leaf.quant in (SCALE, ROUTER, TOWER):
            return QuantSpec(FLOAT)
        spec = self.base_spec()
        if self.format in _EIGHT_BIT and leaf.quant in (EMBEDDING, PLE_TABLE, PLE_PROJECTION, PLE_GATE):
            spec = _EIGHT_BIT[self.format]
        return self._fit(spec, leaf)

    @staticmethod
    def _fit(spec: QuantSpec, leaf: Leaf) -> QuantSpec:
        if spec.format == FLOAT:
            return spec
        if not leaf.quantizable:
            raise Gemma4Error(f"{leaf.name} {leaf.shape}: no contraction axis to quantize along, it stays float")
        _, c = stored_rows(leaf)
        block = spec.block or c
        if c % block or (spec.format in ("int4", "q4_0") and block % 2):
            return QuantSpec("int8")
        return spec


# ----- GGUF --------------------------------------------------------------------------------------------------

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


def gguf_type(leaf: Leaf | None, shape: tuple[int, ...], quant: str):
    """The GGML type a GGUF tensor of `leaf` (None: generated, like rope_freqs) and HF shape is stored in."""
    from gguf import GGMLQuantizationType as T

    if quant == "f32" or leaf is None or leaf.quant in (SCALE, ROUTER) or len(shape) <= 1:
        return T.F32
    if quant in ("f16", "bf16"):
        return T.F16 if quant == "f16" else T.BF16
    if shape[-1] % GGML_BLOCK:  # both tools keep a matrix whose rows do not split into blocks in f16
        return T.F16
    if quant == "q8_0":
        return T.Q8_0
    if leaf.quant == PLE_PROJECTION:
        return T.F16
    if leaf.quant in (EMBEDDING, PLE_TABLE):
        return T.Q8_0
    return T.Q4_0


MMPROJ_QUANTS = ("f32", "f16", "bf16", "q8_0")


def mmproj_type(leaf: Leaf, name: str, shape: tuple[int, ...], quant: str):
    """The GGML type of an encoder tensor `name` (its mmproj name) with `shape` in an mmproj file of `quant`.

    As llama.cpp's converter writes Gemma 4 projectors (`convert_hf_to_gguf.py`, class Gemma4VisionAudioModel):
    vectors, norms, biases and clip bounds in f32; the position table in f32; the audio front end (the
    sub-sampling convolutions and, by the converter's name match on `subsample_conv_projection`, its input
    projection) and the depthwise convolutions in f32; the patch embedding in f16 at f16 and f32 otherwise (mtmd's
    im2col takes f16/f32 kernels); every other matrix at `quant`, in f16 where its rows do not split into q8_0
    blocks."""
    from gguf import GGMLQuantizationType as T

    if quant not in MMPROJ_QUANTS:
        raise Gemma4Error(
            f"the vision/audio encoders cannot be stored as {quant!r} in a GGUF mmproj; use one of "
            f"{', '.join(MMPROJ_QUANTS)}"
        )
    audio_conv = leaf.part == "audio" and (leaf.path[1] == "feature" or leaf.gguf_form == "squeeze")
    if quant == "f32" or len(shape) <= 1 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return T.F32
    if name.endswith("position_embd.weight") or audio_conv:
        return T.F32
    if leaf.gguf_form == "patch_chw":
        return T.F16 if quant == "f16" else T.F32
    if quant == "q8_0" and shape[-1] % GGML_BLOCK == 0:
        return T.Q8_0
    return T.BF16 if quant == "bf16" else T.F16


# ----- LiteRT ------------------------------------------------------------------------------------------------

TABLE_BITS = 8  # lookup tables: GATHER reads int8 rows, dequantized in the graph
TOWER_QUANTS = ("float", "int8")  # the vision/audio towers' matrices (LiteRT-LM's tower sections)


def litert_bits(leaf: Leaf, bits: int, ple_bits: int) -> int | None:
    """Bits of a leaf's FULLY_CONNECTED weight in a `--quant int8/int4` LiteRT export (None: it stays float).
    The lookup tables are quantized as tables (TABLE_BITS) — the tied embedding as LM head takes `bits`."""
    if leaf.quant == SCALE:
        return None
    if leaf.quant in (PLE_PROJECTION, PLE_GATE):
        return max(bits, ple_bits)
    if leaf.quant in (MATRIX, ROUTER, EMBEDDING):
        return bits
    return TABLE_BITS


def litert_tower_bits(quant: str, tower_quant: str | None = None) -> int | None:
    """Bits of the vision/audio towers' FULLY_CONNECTED weights in a LiteRT export (None: float). By default int8
    per channel in every quantized export, int4 ones included: litert-torch's Gemma 4 exporter gives the encoders
    and adapters a dynamic int8 recipe, and the towers are small next to the decoder and run once per medium.
    Float in a float export. The end-of-media rows and the non-matmul tensors stay float either way."""
    if tower_quant is None:
        tower_quant = "float" if quant == "none" else "int8"
    if tower_quant not in TOWER_QUANTS:
        raise Gemma4Error(
            f"the LiteRT vision/audio towers can be stored as {' or '.join(TOWER_QUANTS)}, not {tower_quant!r}"
        )
    return 8 if tower_quant == "int8" else None
