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

    # ----- HF config.json interchange -----------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
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
        if "text_config" in d and isinstance(d["text_config"], Mapping):
            d = d["text_config"]
        try:
            return cls._from_hf_text_dict(d, name)
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

PRESETS: dict[str, Gemma4Config] = {c.name: c for c in (E2B, E4B, G31B, G26B_A4B, TINY_E2B, TINY_KEQV, TINY_MOE)}
OFFICIAL_VARIANTS = ("e2b", "e4b", "31b", "26b_a4b")


def get_config(name: str) -> Gemma4Config:
    key = name.lower().replace("-", "_")
    if key not in PRESETS:
        raise Gemma4Error(f"unknown variant {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[key]
