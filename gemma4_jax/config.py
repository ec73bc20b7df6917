"""Gemma 4 text-decoder configuration: one frozen dataclass, presets per variant, HF config.json interchange.

Numbers are from the architecture spec (`shared/design/gemma4-architecture.md` §1). The config is pure
data; everything the model needs per layer (window, head dim, KV heads, FFN width, KV-sharing source) is
derived from it by the small methods below, so the model code never re-derives architecture facts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4_jax.errors import Gemma4Error

LOCAL = "local"  # sliding-window attention (HF "sliding_attention")
GLOBAL = "global"  # full attention (HF "full_attention")
_HF_LAYER_TYPE = {LOCAL: "sliding_attention", GLOBAL: "full_attention"}
_FROM_HF_LAYER_TYPE = {v: k for k, v in _HF_LAYER_TYPE.items()}


def repeat_pattern(pattern: Sequence[str], num_layers: int) -> tuple[str, ...]:
    """Repeats an attention pattern (e.g. 4 local + 1 global) and truncates it to `num_layers`."""
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


# ----- the towers -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Architecture of one Gemma 4 vision encoder (spec §4.1).

    Attention is multi-head (as many K/V heads as query heads) with head dim `width // num_heads`, as in the
    official module (`key_size = d_model // num_heads`).
    """

    name: str = dataclasses.field(compare=False)  # which preset it came from; not part of the architecture
    width: int  # d_v
    num_layers: int
    num_heads: int
    ffw_hidden: int
    patch_size: int = 16
    position_table_size: int = 10_240  # rows of each of the x and y position tables
    pooling_kernel: int = 3  # soft token = average of a kernel x kernel block of patches
    clipped_linears: bool = False  # E2B/E4B: every linear clamps its input and output
    standardize: bool = False  # 31B/26B-A4B: (x - bias) * scale after pooling
    rope_base: float = 100.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        problems = []
        if self.width % self.num_heads:
            problems.append("width must be a multiple of num_heads")
        elif self.head_dim % 4:
            problems.append("head_dim must be a multiple of 4 (2-D RoPE rotates two half-split halves)")
        if self.pooling_kernel != 3:
            problems.append("pooling_kernel must be 3 (spec §6 #13)")
        if min(self.num_layers, self.ffw_hidden, self.patch_size, self.position_table_size) < 1:
            problems.append("num_layers, ffw_hidden, patch_size and position_table_size must be >= 1")
        if problems:
            raise Gemma4Error(f"invalid vision config {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_values(self) -> int:
        return self.patch_size * self.patch_size * 3

    @property
    def exit_scale(self) -> float:
        """The pooled soft tokens are multiplied by sqrt(width) (27.7128 / 33.9411)."""
        return math.sqrt(self.width)

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)

    # ----- HF `Gemma4VisionConfig` interchange ---------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of transformers' `Gemma4VisionConfig` (the `vision_config` of a Gemma 4 config.json)."""
        return {
            "model_type": "gemma4_vision",
            "hidden_size": self.width,
            "intermediate_size": self.ffw_hidden,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_base},
            "pooling_kernel_size": self.pooling_kernel,
            "patch_size": self.patch_size,
            "position_embedding_size": self.position_table_size,
            "use_clipped_linears": self.clipped_linears,
            "standardize": self.standardize,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], name: str = "hf") -> VisionConfig:
        """Reads a `Gemma4VisionConfig` dict (or a whole Gemma 4 config.json with a `vision_config`)."""
        if "vision_config" in d:
            if not isinstance(d["vision_config"], Mapping):
                raise Gemma4Error("config.json has no vision_config (a text-only model)")
            d = d["vision_config"]
        if d.get("model_type", "gemma4_vision") != "gemma4_vision":
            raise Gemma4Error(f"vision_config describes a {d['model_type']!r} model, not a Gemma 4 vision encoder")
        try:
            width, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            unsupported = {
                "hidden_activation": ("gelu_pytorch_tanh", d.get("hidden_activation", "gelu_pytorch_tanh")),
                "attention_bias": (False, bool(d.get("attention_bias") or False)),
                "num_key_value_heads": (heads, int(d.get("num_key_value_heads", heads))),
                "head_dim": (width // heads, int(d.get("head_dim") or width // heads)),
                "rope_type": ("axial", (d.get("rope_parameters") or {}).get("rope_type", "axial")),
            }
            for key, (want, got) in unsupported.items():
                if got != want:
                    raise Gemma4Error(f"vision_config: {key}={got!r} is not supported (Gemma 4 uses {want!r})")
            return cls(
                name=name,
                width=width,
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                ffw_hidden=int(d["intermediate_size"]),
                patch_size=int(d.get("patch_size", 16)),
                position_table_size=int(d.get("position_embedding_size", 10_240)),
                pooling_kernel=int(d.get("pooling_kernel_size") or 3),
                clipped_linears=bool(d.get("use_clipped_linears", False)),
                standardize=bool(d.get("standardize", False)),
                rope_base=float((d.get("rope_parameters") or {}).get("rope_theta", 100.0)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            )
        except KeyError as e:
            raise Gemma4Error(f"vision_config is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise Gemma4Error(f"vision_config has an invalid value: {e}") from None


# ----- presets (spec §4.1) ---------------------------------------------------------------------------------

E2B_VISION = VisionConfig(name="e2b", width=768, num_layers=16, num_heads=12, ffw_hidden=3072, clipped_linears=True)
E4B_VISION = E2B_VISION.replace(name="e4b")
G31B_VISION = VisionConfig(name="31b", width=1152, num_layers=27, num_heads=16, ffw_hidden=4304, standardize=True)
G26B_A4B_VISION = G31B_VISION.replace(name="26b_a4b")
# Toy encoders with the features of each family; head dims 16 and 24 keep 4 and 6 RoPE frequencies per axis.
TINY_VISION = VisionConfig(name="tiny", width=32, num_layers=2, num_heads=2, ffw_hidden=64, clipped_linears=True)
TINY_VISION_STD = VisionConfig(name="tiny_std", width=48, num_layers=3, num_heads=2, ffw_hidden=80, standardize=True)

VISION_PRESETS: dict[str, VisionConfig] = {
    c.name: c for c in (E2B_VISION, E4B_VISION, G31B_VISION, G26B_A4B_VISION, TINY_VISION, TINY_VISION_STD)
}


def get_vision_config(name: str) -> VisionConfig:
    key = name.lower().replace("-", "_")
    if key not in VISION_PRESETS:
        raise Gemma4Error(f"unknown vision variant {name!r}; choose one of: {', '.join(VISION_PRESETS)}")
    return VISION_PRESETS[key]


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Architecture of the audio tower. Field defaults are transformers' `Gemma4AudioConfig` defaults (= E2B/E4B).

    `num_mel_bins` is the front end's 128; the sub-sampling reduces it 4x (to 32). The projection into the text
    width D (`embedder/audio_input_projection`) is sized by the enclosing `Gemma4Config`.
    """

    name: str = dataclasses.field(compare=False)
    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    subsampling_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5  # weight of each half-step FFN
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logit: float = -1e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_dim: int = 1536
    num_mel_bins: int = 128

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append("hidden_size must be a multiple of num_heads")
        if self.hidden_size % 2:
            problems.append("hidden_size must be even (sin|cos relative-position signal)")
        if len(self.subsampling_channels) != 2 or min(self.subsampling_channels) < 1:
            problems.append("subsampling_channels must be two positive channel counts")
        if self.attention_chunk_size < 1 or self.attention_context_left < 1 or self.attention_context_right < 0:
            problems.append("attention chunk >= 1, context_left >= 1, context_right >= 0")
        if min(self.num_layers, self.conv_kernel_size, self.output_dim, self.num_mel_bins) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise Gemma4Error(f"invalid audio config {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "subsampling_channels", tuple(self.subsampling_channels))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffw_hidden(self) -> int:
        return 4 * self.hidden_size

    @property
    def subsampled_mel_bins(self) -> int:
        """Frequency rows left after the two stride-2 convolutions (128 -> 64 -> 32)."""
        f = self.num_mel_bins
        for _ in range(2):
            f = (f - 1) // 2 + 1
        return f

    @property
    def max_past(self) -> int:
        return self.attention_context_left - 1

    @property
    def max_future(self) -> int:
        return self.attention_context_right

    @property
    def context_size(self) -> int:
        """Keys gathered per block of queries (HF's `context_size`): chunk + max_past + max_future = 24."""
        return self.attention_chunk_size + self.max_past + self.max_future

    @property
    def num_relative_positions(self) -> int:
        """Sinusoids of the relative-position term: HF uses `context_size // 2 + 1` (= 13, distances 12..0)."""
        return self.context_size // 2 + 1

    def replace(self, **changes) -> AudioConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of transformers' `Gemma4AudioConfig` (HF `config.json` -> `audio_config`)."""
        c0, c1 = self.subsampling_channels
        if (c0 // 4) * c1 != self.subsampled_mel_bins * c1:
            # HF sizes `input_proj_linear` as (channels[0] // 4) * channels[1], i.e. assumes 128 channels <-> 128 bins.
            raise Gemma4Error(
                f"audio config {self.name!r} cannot be expressed for transformers: it needs "
                f"subsampling_channels[0] // 4 == {self.subsampled_mel_bins} (the sub-sampled mel bins)"
            )
        return {
            "model_type": "gemma4_audio",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "hidden_act": "silu",
            "subsampling_conv_channels": list(self.subsampling_channels),
            "conv_kernel_size": self.conv_kernel_size,
            "residual_weight": self.residual_weight,
            "attention_chunk_size": self.attention_chunk_size,
            "attention_context_left": self.attention_context_left,
            "attention_context_right": self.attention_context_right,
            "attention_logit_cap": self.attention_logit_cap,
            "attention_invalid_logits_value": self.attention_invalid_logit,
            "use_clipped_linears": self.use_clipped_linears,
            "rms_norm_eps": self.rms_norm_eps,
            "gradient_clipping": self.gradient_clipping,
            "output_proj_dims": self.output_dim,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], name: str = "hf") -> AudioConfig:
        """From an HF `audio_config` dict (absent keys take HF's defaults, as `config.json` omits them)."""
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise Gemma4Error(f"audio config {name!r}: hidden_act {act!r} is not supported (Gemma 4 uses silu)")
        default = cls(name)
        return cls(
            name=name,
            hidden_size=d.get("hidden_size", default.hidden_size),
            num_layers=d.get("num_hidden_layers", default.num_layers),
            num_heads=d.get("num_attention_heads", default.num_heads),
            subsampling_channels=tuple(d.get("subsampling_conv_channels", default.subsampling_channels)),
            conv_kernel_size=d.get("conv_kernel_size", default.conv_kernel_size),
            residual_weight=d.get("residual_weight", default.residual_weight),
            attention_chunk_size=d.get("attention_chunk_size", default.attention_chunk_size),
            attention_context_left=d.get("attention_context_left", default.attention_context_left),
            attention_context_right=d.get("attention_context_right", default.attention_context_right),
            attention_logit_cap=d.get("attention_logit_cap", default.attention_logit_cap),
            attention_invalid_logit=d.get("attention_invalid_logits_value", default.attention_invalid_logit),
            use_clipped_linears=d.get("use_clipped_linears", default.use_clipped_linears),
            rms_norm_eps=d.get("rms_norm_eps", default.rms_norm_eps),
            gradient_clipping=d.get("gradient_clipping", default.gradient_clipping),
            output_dim=d.get("output_proj_dims", default.output_dim),
        )


AUDIO_CONFIGS: dict[str, AudioConfig] = {
    # spec §4.2: the same 304.8 M-parameter encoder; only the projection into the text width differs
    "e2b": AudioConfig("e2b"),
    "e4b": AudioConfig("e4b"),
    # Tests: the full-size attention geometry (chunk 12, 12 keys) on a narrow, 2-layer tower. The first
    # sub-sampling width stays 128 because transformers sizes `input_proj_linear` from it.
    "tiny": AudioConfig(
        "tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        subsampling_channels=(128, 8),
        output_dim=48,
    ),
}


def get_audio_config(name: str) -> AudioConfig:
    try:
        return AUDIO_CONFIGS[name]
    except KeyError:
        raise Gemma4Error(f"unknown audio config {name!r}; known: {', '.join(AUDIO_CONFIGS)}") from None


# ----- the model ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    """Architecture of one Gemma 4 text decoder.

    Attributes mirror the spec's notation: `embed_dim` D, `num_layers` L, `num_heads` N, `num_kv_heads` K,
    `head_dim` H (local layers), `global_head_dim` (global layers), `ffw_hidden` F, `per_layer_input_dim` P
    (0 = no Per-Layer Embeddings), `num_experts` E (0 = dense model).
    """

    name: str
    vocab_size: int
    embed_dim: int
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    ffw_hidden: int
    sliding_window: int
    head_dim: int = 256
    global_head_dim: int = 512
    # KV heads of global layers on K=V models (31B: 4, 26B-A4B: 2); None = same as `num_kv_heads`.
    num_global_kv_heads: int | None = None
    k_eq_v_global: bool = False
    num_kv_shared_layers: int = 0
    double_wide_shared_ffw: bool = False
    per_layer_input_dim: int = 0
    num_experts: int = 0
    num_experts_per_token: int = 0
    expert_hidden: int = 0
    local_rope_base: float = 10_000.0
    global_rope_base: float = 1_000_000.0
    global_rope_proportion: float = 0.25
    final_logit_softcap: float | None = 30.0
    max_context: int = 131_072
    rms_norm_eps: float = 1e-6
    # Image soft tokens attend bidirectionally on local layers (31B, 26B-A4B). Used by the multimodal path;
    # kept here so config.json round-trips.
    vision_bidirectional: bool = False
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0
    # The encoders (None: a text-only model) and the tokens that frame their soft tokens in a prompt (spec §4.3).
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    audio_token_id: int = 258_881
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883

    def __post_init__(self):
        problems = []
        sizes = ("vocab_size", "embed_dim", "num_heads", "num_kv_heads", "ffw_hidden", "head_dim", "global_head_dim")
        for name in (*sizes, "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("per_layer_input_dim", "num_experts", "num_experts_per_token", "expert_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if problems:
            raise Gemma4Error(f"invalid config {self.name!r}: " + "; ".join(problems))
        if not self.layer_types or any(t not in (LOCAL, GLOBAL) for t in self.layer_types):
            problems.append(f"layer_types must be a non-empty sequence of {LOCAL!r}/{GLOBAL!r}")
        elif self.layer_types[-1] != GLOBAL:
            problems.append("the last layer must be global (all Gemma 4 variants end on full attention)")
        if self.num_heads % self.num_kv_heads or self.num_heads % self.global_kv_heads:
            problems.append("num_heads must be a multiple of the KV head counts")
        if self.head_dim % 2 or self.global_head_dim % 2:
            problems.append("head dims must be even (half-split RoPE)")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            problems.append("num_kv_shared_layers must be in [0, num_layers)")
        if self.num_experts and not (0 < self.num_experts_per_token <= self.num_experts and self.expert_hidden):
            problems.append("MoE needs 0 < num_experts_per_token <= num_experts and expert_hidden > 0")
        if self.sliding_window < 1:
            problems.append("sliding_window must be >= 1")
        if problems:
            raise Gemma4Error(f"invalid config {self.name!r}: " + "; ".join(problems))
        if self.num_kv_shared_layers:
            self.kv_source_layers  # noqa: B018  (validates that every reader has a source)

    # ----- derived, per layer -------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def global_kv_heads(self) -> int:
        return self.num_global_kv_heads if self.k_eq_v_global and self.num_global_kv_heads else self.num_kv_heads

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    @property
    def kv_source_layers(self) -> tuple[int, ...]:
        """For each layer, the layer whose K/V it attends to (itself unless it is a KV-shared reader).

        A reader takes K/V from the last non-shared layer of its own attention type (spec §1.4).
        """
        first_shared = self.first_kv_shared_layer
        sources = []
        for i, kind in enumerate(self.layer_types):
            if i < first_shared:
                sources.append(i)
                continue
            owners = [j for j in range(first_shared) if self.layer_types[j] == kind]
            if not owners:
                raise Gemma4Error(f"invalid config {self.name!r}: KV-shared {kind} layer {i} has no {kind} source")
            sources.append(owners[-1])
        return tuple(sources)

    def is_kv_reader(self, layer: int) -> bool:
        return layer >= self.first_kv_shared_layer

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.layer_types[layer] == GLOBAL else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.global_kv_heads if self.layer_types[layer] == GLOBAL else self.num_kv_heads

    def layer_k_eq_v(self, layer: int) -> bool:
        return self.k_eq_v_global and self.layer_types[layer] == GLOBAL

    def layer_ffw_hidden(self, layer: int) -> int:
        wide = self.double_wide_shared_ffw and self.is_kv_reader(layer)
        return self.ffw_hidden * (2 if wide else 1)

    def layer_window(self, layer: int) -> int | None:
        """Sliding window (keys p_q-W < p_k <= p_q) of a local layer; None for global layers."""
        return self.sliding_window if self.layer_types[layer] == LOCAL else None

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.embed_dim)

    @property
    def layer_string(self) -> str:
        return "".join("L" if t == LOCAL else "G" for t in self.layer_types)

    def replace(self, **changes) -> Gemma4Config:
        return dataclasses.replace(self, **changes)

    def text_only(self) -> Gemma4Config:
        """The same model without its encoders."""
        return dataclasses.replace(self, vision=None, audio=None)

    @property
    def multimodal(self) -> bool:
        return self.vision is not None or self.audio is not None

    # ----- HF config.json interchange -----------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json`: `Gemma4ForCausalLM`'s for a text-only model, else `Gemma4ForConditionalGeneration`'s
        (the text fields under `text_config`, the encoders' under `vision_config` / `audio_config`)."""
        text = self._text_hf_dict()
        if not self.multimodal:
            return text
        text = {k: v for k, v in text.items() if k != "architectures"} | {"model_type": "gemma4_text"}
        return {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text,
            "vision_config": self.vision.to_hf_dict() if self.vision else None,
            "audio_config": self.audio.to_hf_dict() if self.audio else None,
            "image_token_id": self.image_token_id,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "audio_token_id": self.audio_token_id,
            "boa_token_id": self.boa_token_id,
            "eoa_token_index": self.eoa_token_id,
            "tie_word_embeddings": True,
        }

    def _text_hf_dict(self) -> dict[str, Any]:
        """The `Gemma4TextConfig` fields (as in an HF `config.json` for `Gemma4ForCausalLM`)."""
        d: dict[str, Any] = {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.ffw_hidden,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_kv_heads,
            "attention_k_eq_v": self.k_eq_v_global,
            "sliding_window": self.sliding_window,
            "layer_types": [_HF_LAYER_TYPE[t] for t in self.layer_types],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_base},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": self.global_rope_proportion,
                    "rope_theta": self.global_rope_base,
                },
            },
            "final_logit_softcapping": self.final_logit_softcap,
            "hidden_size_per_layer_input": self.per_layer_input_dim,
            "vocab_size_per_layer_input": self.vocab_size,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.double_wide_shared_ffw,
            "enable_moe_block": bool(self.num_experts),
            "num_experts": self.num_experts or None,
            "top_k_experts": self.num_experts_per_token or None,
            "moe_intermediate_size": self.expert_hidden or None,
            "max_position_embeddings": self.max_context,
            "rms_norm_eps": self.rms_norm_eps,
            "use_bidirectional_attention": "vision" if self.vision_bidirectional else None,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "attention_bias": False,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
        }
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], name: str = "hf") -> Gemma4Config:
        """Reads an HF Gemma 4 `config.json` (text-only, or the `text_config` of a multimodal one)."""
        if not isinstance(d, Mapping):
            raise Gemma4Error(f"config.json must be a JSON object, got a {type(d).__name__}")
        towers: dict[str, Any] = {}
        if "text_config" in d and isinstance(d["text_config"], Mapping):
            if isinstance(d.get("vision_config"), Mapping):
                towers["vision"] = VisionConfig.from_hf_dict(d["vision_config"], name=name)
            if isinstance(d.get("audio_config"), Mapping):
                towers["audio"] = AudioConfig.from_hf_dict(d["audio_config"], name=name)
            ids = (("image_token_id", "image_token_id"), ("boi_token_id", "boi_token_id"))
            ids += (("eoi_token_id", "eoi_token_id"), ("audio_token_id", "audio_token_id"))
            ids += (("boa_token_id", "boa_token_id"), ("eoa_token_id", "eoa_token_index"))
            towers |= {ours: int(d[theirs]) for ours, theirs in ids if isinstance(d.get(theirs), int)}
            d = d["text_config"]
        try:
            return cls._from_hf_text_dict(d, name).replace(**towers)
        except KeyError as e:
            raise Gemma4Error(f"config.json is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise Gemma4Error(f"config.json has an invalid value: {e}") from None

    @classmethod
    def _from_hf_text_dict(cls, d: Mapping[str, Any], name: str) -> Gemma4Config:
        model_type = d.get("model_type", "gemma4_text")
        if model_type not in ("gemma4_text", "gemma4"):
            raise Gemma4Error(f"config.json describes a {model_type!r} model, not Gemma 4")
        unsupported = {
            "hidden_activation": ("gelu_pytorch_tanh", d.get("hidden_activation", "gelu_pytorch_tanh")),
            "attention_bias": (False, d.get("attention_bias", False)),
            "tie_word_embeddings": (True, d.get("tie_word_embeddings", True)),
        }
        for key, (want, got) in unsupported.items():
            if got != want:
                raise Gemma4Error(f"config.json: {key}={got!r} is not supported (Gemma 4 uses {want!r})")
        num_layers = int(d["num_hidden_layers"])
        raw_types = d.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)
        ]
        try:
            layer_types = tuple(_FROM_HF_LAYER_TYPE[t] for t in raw_types)
        except KeyError as e:
            raise Gemma4Error(f"config.json: unknown layer type {e.args[0]!r}") from None
        if len(layer_types) != num_layers:
            raise Gemma4Error(f"config.json: {len(layer_types)} layer_types for {num_layers} layers")
        head_dim = int(d.get("head_dim") or 256)
        global_head_dim = d.get("global_head_dim")
        num_global_kv_heads = d.get("num_global_key_value_heads")
        # transformers >= 5.2x serialises the global overrides as `per_layer_config` instead.
        for layer_cfg in (d.get("per_layer_config") or {}).values():
            global_head_dim = global_head_dim or layer_cfg.get("head_dim")
            num_global_kv_heads = num_global_kv_heads or layer_cfg.get("num_key_value_heads")
        rope = d.get("rope_parameters") or {}
        local_rope = rope.get("sliding_attention") or {}
        global_rope = rope.get("full_attention") or {}
        if (
            local_rope.get("rope_type", "default") != "default"
            or global_rope.get("rope_type", "proportional") != "proportional"
        ):
            raise Gemma4Error(f"config.json: unsupported rope_parameters {rope!r}")
        for part in (local_rope, global_rope):
            if float(part.get("factor", 1.0)) != 1.0:
                raise Gemma4Error("config.json: RoPE scaling factors other than 1.0 are not supported")
        per_layer_input_dim = int(d.get("hidden_size_per_layer_input") or 0)
        vocab_size = int(d["vocab_size"])
        if per_layer_input_dim and int(d.get("vocab_size_per_layer_input", vocab_size)) != vocab_size:
            raise Gemma4Error("config.json: vocab_size_per_layer_input != vocab_size is not supported")
        moe = bool(d.get("enable_moe_block"))
        eos = d.get("eos_token_id", 1)
        return cls(
            name=name,
            vocab_size=vocab_size,
            embed_dim=int(d["hidden_size"]),
            layer_types=layer_types,
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d["num_key_value_heads"]),
            ffw_hidden=int(d["intermediate_size"]),
            sliding_window=int(d["sliding_window"]),
            head_dim=head_dim,
            global_head_dim=int(global_head_dim or 512),
            num_global_kv_heads=int(num_global_kv_heads) if num_global_kv_heads else None,
            k_eq_v_global=bool(d.get("attention_k_eq_v", False)),
            num_kv_shared_layers=int(d.get("num_kv_shared_layers") or 0),
            double_wide_shared_ffw=bool(d.get("use_double_wide_mlp", False)),
            per_layer_input_dim=per_layer_input_dim,
            num_experts=int(d["num_experts"]) if moe else 0,
            num_experts_per_token=int(d["top_k_experts"]) if moe else 0,
            expert_hidden=int(d["moe_intermediate_size"]) if moe else 0,
            local_rope_base=float(local_rope.get("rope_theta", 10_000.0)),
            global_rope_base=float(global_rope.get("rope_theta", 1_000_000.0)),
            global_rope_proportion=float(global_rope.get("partial_rotary_factor", 0.25)),
            final_logit_softcap=d.get("final_logit_softcapping"),
            max_context=int(d.get("max_position_embeddings", 131_072)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            vision_bidirectional=d.get("use_bidirectional_attention") == "vision",
            bos_id=int(d.get("bos_token_id", 2)),
            eos_id=int(eos[0] if isinstance(eos, list) else eos),
            pad_id=int(d.get("pad_token_id", 0) or 0),
        )

    def save_json(self, path: str | os.PathLike) -> None:
        from gemma4_jax.files import write_json

        write_json(os.fspath(path), self.to_hf_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike, name: str | None = None) -> Gemma4Config:
        from gemma4_jax.files import read_text

        path = os.fspath(path)
        if not os.path.exists(path):
            raise Gemma4Error(f"config file not found: {path}")
        try:
            d = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise Gemma4Error(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=name or os.path.basename(os.path.dirname(os.path.abspath(path))))


# ----- presets (spec §1.1) ---------------------------------------------------------------------------------

_LLLLG = (LOCAL,) * 4 + (GLOBAL,)
_LLLLLG = (LOCAL,) * 5 + (GLOBAL,)

E2B = Gemma4Config(
    name="e2b",
    vocab_size=262_144,
    embed_dim=1536,
    layer_types=repeat_pattern(_LLLLG, 35),
    num_heads=8,
    num_kv_heads=1,
    ffw_hidden=6144,
    double_wide_shared_ffw=True,
    sliding_window=512,
    num_kv_shared_layers=20,
    per_layer_input_dim=256,
    max_context=131_072,
    vision=E2B_VISION,
    audio=AUDIO_CONFIGS["e2b"],
)

E4B = Gemma4Config(
    name="e4b",
    vocab_size=262_144,
    embed_dim=2560,
    layer_types=repeat_pattern(_LLLLLG, 42),
    num_heads=8,
    num_kv_heads=2,
    ffw_hidden=10_240,
    sliding_window=512,
    num_kv_shared_layers=18,
    per_layer_input_dim=256,
    max_context=131_072,
    vision=E4B_VISION,
    audio=AUDIO_CONFIGS["e4b"],
)

G31B = Gemma4Config(
    name="31b",
    vocab_size=262_144,
    embed_dim=5376,
    layer_types=repeat_pattern(_LLLLLG, 60),
    num_heads=32,
    num_kv_heads=16,
    num_global_kv_heads=4,
    k_eq_v_global=True,
    ffw_hidden=21_504,
    sliding_window=1024,
    max_context=262_144,
    vision_bidirectional=True,
    vision=G31B_VISION,
)

G26B_A4B = Gemma4Config(
    name="26b_a4b",
    vocab_size=262_144,
    embed_dim=2816,
    layer_types=repeat_pattern(_LLLLLG, 30),
    num_heads=16,
    num_kv_heads=8,
    num_global_kv_heads=2,
    k_eq_v_global=True,
    ffw_hidden=2112,
    num_experts=128,
    num_experts_per_token=8,
    expert_hidden=704,
    sliding_window=1024,
    max_context=262_144,
    vision_bidirectional=True,
    vision=G26B_A4B_VISION,
)

# Toy presets: every feature of the full-size variant switched on, at sizes that run in milliseconds.
# The sliding window (4) is shorter than any test sequence, so ring-buffer wrap-around is exercised.
TINY_E2B = Gemma4Config(
    name="tiny",
    vocab_size=512,
    embed_dim=64,
    layer_types=repeat_pattern((LOCAL, LOCAL, GLOBAL), 9),
    num_heads=4,
    num_kv_heads=1,
    head_dim=16,
    global_head_dim=32,
    ffw_hidden=96,
    double_wide_shared_ffw=True,
    sliding_window=4,
    num_kv_shared_layers=4,
    # P=16 keeps sqrt(P) exact, so a float64 parity run is not limited by a rounded PLE scale.
    per_layer_input_dim=16,
    max_context=512,
)

TINY_KEQV = Gemma4Config(
    name="tiny_keqv",
    vocab_size=512,
    embed_dim=64,
    layer_types=repeat_pattern((LOCAL, LOCAL, GLOBAL), 6),
    num_heads=4,
    num_kv_heads=2,
    num_global_kv_heads=1,
    k_eq_v_global=True,
    head_dim=16,
    global_head_dim=32,
    ffw_hidden=96,
    sliding_window=4,
    max_context=512,
)

TINY_MOE = TINY_KEQV.replace(
    name="tiny_moe",
    ffw_hidden=48,
    num_experts=8,
    num_experts_per_token=2,
    expert_hidden=24,
)

# Multimodal toys. The tiny vocabulary has the image/audio tokens in low slots (tests/tokenizer_fixture.py).
_TINY_MM_TOKENS = dict(
    boi_token_id=60, boa_token_id=61, image_token_id=62, audio_token_id=63, eoi_token_id=64, eoa_token_id=65
)
# E2B-style: PLE, KV sharing, a clipped vision encoder and the audio tower; images attend causally.
TINY_MM = TINY_E2B.replace(name="tiny_mm", vision=TINY_VISION, audio=AUDIO_CONFIGS["tiny"], **_TINY_MM_TOKENS)
# 31B-style: K=V global layers, a standardizing vision encoder, images bidirectional on local layers, no audio.
TINY_MM_BIDI = TINY_KEQV.replace(
    name="tiny_mm_bidi", vision=TINY_VISION_STD, vision_bidirectional=True, **_TINY_MM_TOKENS
)

PRESETS: dict[str, Gemma4Config] = {
    c.name: c for c in (E2B, E4B, G31B, G26B_A4B, TINY_E2B, TINY_KEQV, TINY_MOE, TINY_MM, TINY_MM_BIDI)
}
OFFICIAL_VARIANTS = ("e2b", "e4b", "31b", "26b_a4b")


def get_config(name: str) -> Gemma4Config:
    key = name.lower().replace("-", "_")
    if key not in PRESETS:
        raise Gemma4Error(f"unknown variant {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]


def cut_to_layers(cfg: Gemma4Config, layers: int) -> Gemma4Config:
    """`cfg` at full width cut to `layers` (a multiple of its layer pattern: 5 for E2B, 6 otherwise), keeping its
    share of KV-owning layers; widths, vocabulary and PLE table unchanged. For benchmarks and compile-time checks of
    a real width without every layer."""
    if not layers or layers == cfg.num_layers:
        return cfg
    period = 5 if cfg.name in ("e2b",) else 6
    if layers % period:
        raise Gemma4Error(f"layers must be a multiple of {period} for {cfg.name}, got {layers}")
    types = repeat_pattern(cfg.layer_types[:period], layers)
    owners = cfg.num_layers - cfg.num_kv_shared_layers
    # Keep the share of KV-owning layers, ending on a whole pattern (llama.cpp reads the last local + global owner).
    first_shared = period * max(1, round(layers * owners / cfg.num_layers / period)) if owners else 0
    shared = layers - first_shared if cfg.num_kv_shared_layers else 0
    return cfg.replace(name=f"{cfg.name}_{layers}l", layer_types=types, num_kv_shared_layers=shared)
