"""The parameter spec: one entry per leaf of the official parameter tree, and every per-tensor fact derived from it.

A `Leaf` states once what the project needs to know about one tensor:
- `path`: where it sits in the official Flax tree (spec §5.1), e.g. ("layer_3", "attn", "q_einsum", "w");
- `axes`: a logical name per axis (embed, heads, head_dim, mlp, ...). The names give the sizes, and they are what
  a device mesh maps to its own axes;
- `contracts`: the axes a matmul with it sums over (its "in" features); a lookup table names its feature axis;
- `split`: an axis whose indices are separate Hugging Face tensors and separate LoRA adapters (K and V, gate and up);
- `batch`: axes every format keeps apart (the MoE expert stack);
- `hf` / `gguf`: its Hugging Face and llama.cpp tensor names (one per index of `split`); an encoder's GGUF names
  are those of llama.cpp's multimodal projector file (mmproj), and `gguf_form` says how its tensor there differs
  from the HF one (GGUF_FORMS);
- `quant`: its quantization class, which the per-target policies (`gemma4_jax.quant.policy`) decide on;
- `lora`: whether a LoRA adapter may target it;
- `unused`: in the official tree but never read (the K/V weights of KV-shared reader layers, spec §6 #17);
- `part`: text decoder, vision or audio encoder; `stack`: the axis of layers stacked in one leaf (the vision encoder),
  one HF tensor per layer; `hf_axes`: the HF axis order where it is not Linear's [out, in] (convolutions, the
  position table); `replicate`: one official value that HF stores in several tensors (a clip bound of K and V);
  `init`: how random weights are drawn ("auto": 1 for scales, else normal with std 1/sqrt(fan in)).

Derived here, so nothing else restates them: shapes, the HF transforms in both directions, the stored layout of a
quantized weight (contracted axes last: the HF / ggml [out, in] layout), LoRA axis roles and module names, the
init fan-in, and [out, in] matrix views. Adding a tensor is one `Leaf` in the table below.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np

from gemma4_jax.config import Gemma4Config

Path = tuple[str, ...]

# Quantization classes (what the policies of each target decide on; see gemma4_jax.quant.policy).
SCALE = "scale"  # norm scales, layer scalars, router/expert scales: tiny, always float
ROUTER = "router"  # the MoE router matrix: tiny, decides expert choice
MATRIX = "matrix"  # attention, MLP and expert matrices
PLE_PROJECTION = "ple_projection"  # the PLE context projection D -> L·P
PLE_GATE = "ple_gate"  # the per-layer PLE gate D -> P and projection P -> D
EMBEDDING = "embedding"  # the token embedding: a lookup table and the tied LM head
PLE_TABLE = "ple_table"  # the PLE token table: a lookup table only
TOWER = "tower"  # the vision and audio encoders' weights and their projections into the text width
QUANT_CLASSES = (SCALE, ROUTER, MATRIX, PLE_PROJECTION, PLE_GATE, EMBEDDING, PLE_TABLE, TOWER)
PARTS = ("text", "vision", "audio")
# How an mmproj tensor differs from its HF tensor (llama.cpp's tools/mtmd reads them so): "" the same (a 0-d clip
# bound as [1]: GGUF has no scalars); "patch_chw" the patch embedding's [D, p·p·3] (pixel-major, channels last) as a
# convolution kernel [D, 3, p, p]; "softplus" the stored softplus of the audio attention's per-dim scale (its
# graph applies no softplus); "squeeze" the depthwise kernel [C, 1, K] as [C, K].
GGUF_FORMS = ("", "patch_chw", "softplus", "squeeze")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of the official parameter tree (see the module docstring)."""

    path: Path
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    contracts: tuple[str, ...] = ()
    split: str | None = None
    batch: tuple[str, ...] = ()
    hf: tuple[str, ...] = ()
    gguf: tuple[str, ...] = ()
    quant: str = SCALE
    lora: bool = False
    unused: bool = False
    part: str = "text"
    stack: str | None = None
    hf_axes: tuple[str, ...] = ()
    replicate: bool = False
    init: str = "auto"
    gguf_form: str = ""

    def __post_init__(self):
        assert len(self.axes) == len(self.shape) == len(set(self.axes)), self
        assert set(self.contracts) | set(self.batch) | {self.split, self.stack} - {None} <= set(self.axes), self
        assert self.quant in QUANT_CLASSES and self.part in PARTS, self
        assert self.stack is None or self.axes[0] == self.stack, self
        per_layer = len(self.hf) // (self.size(self.stack) if self.stack else 1)
        if self.split is not None:  # the split axis leads the stored layout, so it must lead the uncontracted axes
            assert self.stored_axes[0] == (self.stack or self.split), self
            assert per_layer == self.size(self.split), self
        elif not self.replicate:
            assert per_layer == 1, self
        assert not self.hf_axes or sorted(self.hf_axes) == sorted(a for a in self.axes if a != self.stack), self
        assert not self.gguf or len(self.gguf) == len(self.hf), self
        assert self.gguf_form in GGUF_FORMS, self

    @property
    def name(self) -> str:
        return "/".join(self.path)

    def size(self, axis: str) -> int:
        return self.shape[self.axes.index(axis)]

    # ----- roles ----------------------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        """Per axis: "i" contracted (input), "o" output, "g" split group (K/V, gate/up), "e" batch (experts)."""
        return tuple(
            "i" if a in self.contracts else "g" if a == self.split else "e" if a in self.batch else "o"
            for a in self.axes
        )

    @property
    def fan_in(self) -> int:
        return math.prod(self.size(a) for a in self.contracts) if self.contracts else 1

    @property
    def init_std(self) -> float | None:
        """Standard deviation of a random weight, 1/sqrt(fan in) (or as `init` says); None for constants."""
        if self.init.startswith("normal:"):
            return float(self.init.split(":", 1)[1])
        if self.init != "auto" or self.quant == SCALE:
            return None
        return 1.0 / math.sqrt(self.fan_in)

    @property
    def init_value(self) -> float:
        """The constant of a leaf with no random init: 1 for scales, or "zeros" / "inf" / "-inf"."""
        return {"auto": 1.0, "zeros": 0.0, "inf": math.inf, "-inf": -math.inf}[self.init]

    # ----- the stored layout: contracted axes last (HF / ggml [out, in]) ----------------------------------

    @property
    def perm(self) -> tuple[int, ...]:
        """Axis order of the stored layout: the uncontracted axes in order, then the contracted ones."""
        kept = [k for k, a in enumerate(self.axes) if a not in self.contracts]
        return (*kept, *(self.axes.index(a) for a in self.axes if a in self.contracts))

    @property
    def stored_axes(self) -> tuple[str, ...]:
        return tuple(self.axes[p] for p in self.perm)

    @property
    def ncontract(self) -> int:
        return len(self.contracts)

    @property
    def quantizable(self) -> bool:
        """Whether a quantized (codes + scales along the contracted axes) form exists."""
        return self.quant != SCALE and bool(self.contracts) and len(self.shape) >= 2

    # ----- Hugging Face form ------------------------------------------------------------------------------

    def _layer(self) -> Leaf:
        """One layer of a stacked leaf, as an unstacked leaf (the HF form is per layer)."""
        per_layer = len(self.hf) // self.size(self.stack)
        return dataclasses.replace(
            self, axes=self.axes[1:], shape=self.shape[1:], stack=None, hf=self.hf[:per_layer], gguf=(),
            contracts=tuple(a for a in self.contracts if a != self.stack),
        )  # fmt: skip

    def _hf_shape(self) -> tuple[int, ...]:
        """Shape of each HF tensor: in `hf_axes` order if given; a vector as is; a lookup table [vocab, features];
        else torch's Linear [out, in], with batch axes (experts) kept in front."""
        if self.hf_axes:
            return tuple(self.size(a) for a in self.hf_axes)
        stored = [a for a in self.stored_axes if a != self.split]
        if not self.contracts:
            return tuple(self.size(a) for a in stored)
        if self.axes[0] == "vocab":
            return (self.size("vocab"), math.prod(self.size(a) for a in stored[1:]))
        lead = [a for a in stored if a in self.batch]
        out = [a for a in stored if a not in self.batch and a not in self.contracts]
        return (
            *(self.size(a) for a in lead),
            math.prod(self.size(a) for a in out),
            math.prod(self.size(a) for a in self.contracts),
        )

    @property
    def hf_shapes(self) -> tuple[tuple[int, ...], ...]:
        if self.stack:
            return self._layer().hf_shapes * self.size(self.stack)
        return (self._hf_shape(),) * len(self.hf)

    def to_hf(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
        """The official-layout array as its HF tensor(s) (views where numpy can)."""
        if self.stack:
            layer = self._layer()
            return tuple(t for i in range(self.size(self.stack)) for t in layer.to_hf(w[i]))
        if self.replicate:
            return (w,) * len(self.hf)
        if self.hf_axes:
            return (np.transpose(w, [self.axes.index(a) for a in self.hf_axes]),)
        stored = np.transpose(w, self.perm)
        parts = list(stored) if self.split is not None else [stored]
        return tuple(p.reshape(self._hf_shape()) for p in parts)

    def from_hf(self, *arrays: np.ndarray) -> np.ndarray:
        """The inverse of `to_hf`. Raises ValueError naming the tensor whose shape (or replicated value) does not
        fit."""
        for name, a, want in zip(self.hf, arrays, self.hf_shapes, strict=True):
            if tuple(np.shape(a)) != want:
                raise ValueError(f"{name} has shape {tuple(np.shape(a))}, expected {want}")
        if self.stack:
            layer, k = self._layer(), len(self.hf) // self.size(self.stack)
            names = self.hf
            try:
                return np.stack([layer.from_hf(*arrays[i * k : (i + 1) * k]) for i in range(self.size(self.stack))])
            except ValueError as e:
                raise ValueError(f"{e} (layer tensors {names[0]} ...)") from None
        if self.replicate:
            if any(not np.array_equal(arrays[0], a) for a in arrays[1:]):
                raise ValueError(f"{', '.join(self.hf)} differ; the official tree holds one value for all of them")
            return np.asarray(arrays[0])
        if self.hf_axes:
            return np.transpose(np.asarray(arrays[0]), [self.hf_axes.index(a) for a in self.axes])
        part_shape = tuple(self.shape[p] for p in self.perm if self.axes[p] != self.split)
        parts = [np.asarray(a).reshape(part_shape) for a in arrays]
        stored = np.stack(parts) if self.split is not None else parts[0]
        return np.transpose(stored, np.argsort(self.perm))

    # ----- [out, in] matrix views (LiteRT's FULLY_CONNECTED weights) --------------------------------------

    def matrix(self, w: np.ndarray, contract_batch: bool = False) -> np.ndarray:
        """w as a 2-D [out, in] matrix: the stored layout with the uncontracted axes flattened into rows and the
        contracted ones into columns. `contract_batch` also moves the batch axes (experts) into the columns,
        batch-major (the dense-expert down projection sums over experts too)."""
        contracted = (*self.batch, *self.contracts) if contract_batch else self.contracts
        kept = [k for k, a in enumerate(self.axes) if a not in contracted]
        perm = (*kept, *(self.axes.index(a) for a in contracted))
        rows = math.prod(self.shape[k] for k in kept)
        return np.transpose(w, perm).reshape(rows, -1)

    # ----- LoRA -----------------------------------------------------------------------------------------

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """The HF (and PEFT) module name of each split index, e.g. layers.3.self_attn.k_proj."""
        return tuple(n.removesuffix(".weight") for n in self.hf)


# ----- the table ---------------------------------------------------------------------------------------------


def _axes(text: str) -> tuple[str, ...]:
    return tuple(text.split())


class _Builder:
    """Makes Leaf entries under a path / HF / GGUF prefix, with sizes looked up by axis name. A stacked leaf's HF
    names hold `{i}` and are expanded here, layer by layer."""

    def __init__(self, sizes: dict[str, int], path: Path = (), hf: str = "", gguf: str = "", part: str = "text"):
        self.sizes, self.path, self.hf, self.gguf, self.part = sizes, path, hf, gguf, part

    def __call__(
        self, path, axes: str, hf, gguf=(), *, contracts: str = "", split=None, batch: str = "", hf_axes: str = "",
        stack=None, **kw,
    ):  # fmt: skip
        hf = (hf,) if isinstance(hf, str) else tuple(hf)
        gguf = (gguf,) if isinstance(gguf, str) else tuple(gguf)
        names = _axes(axes)
        hf = tuple(self.hf + n for n in hf)
        gguf = tuple(self.gguf + n for n in gguf)
        if stack:
            hf = tuple(n.format(i=i) for i in range(self.sizes[stack]) for n in hf)
            gguf = tuple(n.format(i=i) for i in range(self.sizes[stack]) for n in gguf)
        return Leaf(
            path=(*self.path, *(path.split("/") if isinstance(path, str) else path)),
            axes=names,
            shape=tuple(self.sizes[a] for a in names),
            contracts=_axes(contracts),
            split=split,
            batch=_axes(batch),
            hf=hf,
            gguf=gguf,
            part=self.part,
            stack=stack,
            hf_axes=_axes(hf_axes),
            **kw,
        )


def _sizes(cfg: Gemma4Config, layer: int | None = None) -> dict[str, int]:
    sizes = {
        "vocab": cfg.vocab_size,
        "embed": cfg.embed_dim,
        "heads": cfg.num_heads,
        "ple_layers": cfg.num_layers,
        "ple_dim": cfg.per_layer_input_dim,
        "experts": cfg.num_experts,
        "expert_mlp": cfg.expert_hidden,
        "mlp": cfg.ffw_hidden,
        "kv": 2,
        "gate_up": 2,
        "scalar": 1,
    }
    if layer is not None:
        sizes |= {
            "head_dim": cfg.layer_head_dim(layer),
            "kv_heads": cfg.layer_kv_heads(layer),
            "mlp": cfg.layer_ffw_hidden(layer),
        }
    return sizes


def _embedder(cfg: Gemma4Config) -> list[Leaf]:
    leaf = _Builder(_sizes(cfg), ("embedder",))
    out = [
        leaf("input_embedding", "vocab embed", "embed_tokens.weight", "token_embd.weight", contracts="embed",
             quant=EMBEDDING),
    ]  # fmt: skip
    if cfg.per_layer_input_dim:
        out += [
            leaf("per_layer_embeddings", "vocab ple_layers ple_dim", "embed_tokens_per_layer.weight",
                 "per_layer_token_embd.weight", contracts="ple_dim", quant=PLE_TABLE),
            leaf("per_layer_model_projection/w", "embed ple_layers ple_dim", "per_layer_model_projection.weight",
                 "per_layer_model_proj.weight", contracts="embed", quant=PLE_PROJECTION),
            leaf("per_layer_projection_norm/scale", "ple_dim", "per_layer_projection_norm.weight",
                 "per_layer_proj_norm.weight"),
        ]  # fmt: skip
    return out


def _layer(cfg: Gemma4Config, i: int) -> list[Leaf]:
    leaf = _Builder(_sizes(cfg, i), (f"layer_{i}",), f"layers.{i}.", f"blk.{i}.")
    # KV-shared readers carry K/V weights in the official tree that no layer reads: not in GGUF, not adaptable.
    reader = cfg.is_kv_reader(i)
    kv = dict(unused=reader, lora=not reader)
    out = [
        leaf("pre_attention_norm/scale", "embed", "input_layernorm.weight", "attn_norm.weight"),
        leaf("attn/q_einsum/w", "heads embed head_dim", "self_attn.q_proj.weight", "attn_q.weight",
             contracts="embed", quant=MATRIX, lora=True),
        leaf("attn/query_norm/scale", "head_dim", "self_attn.q_norm.weight", "attn_q_norm.weight"),
    ]  # fmt: skip
    if cfg.layer_k_eq_v(i):  # one projection read as K and as V (spec §1.5)
        out.append(
            leaf("attn/k_einsum/w", "kv_heads embed head_dim", "self_attn.k_proj.weight",
                 () if reader else "attn_k.weight", contracts="embed", quant=MATRIX, **kv)
        )  # fmt: skip
    else:
        out.append(
            leaf("attn/kv_einsum/w", "kv kv_heads embed head_dim",
                 ("self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                 () if reader else ("attn_k.weight", "attn_v.weight"), contracts="embed", split="kv", quant=MATRIX,
                 **kv)
        )  # fmt: skip
    out += [
        leaf("attn/key_norm/scale", "head_dim", "self_attn.k_norm.weight", () if reader else "attn_k_norm.weight",
             unused=reader),
        leaf("attn/attn_vec_einsum/w", "heads head_dim embed", "self_attn.o_proj.weight", "attn_output.weight",
             contracts="heads head_dim", quant=MATRIX, lora=True),
        leaf("post_attention_norm/scale", "embed", "post_attention_layernorm.weight", "post_attention_norm.weight"),
    ]  # fmt: skip

    def geglu(scope: str) -> list[Leaf]:
        return [
            leaf(f"{scope}/gating_einsum", "gate_up mlp embed", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                 ("ffn_gate.weight", "ffn_up.weight"), contracts="embed", split="gate_up", quant=MATRIX, lora=True),
            leaf(f"{scope}/linear", "mlp embed", "mlp.down_proj.weight", "ffn_down.weight", contracts="mlp",
                 quant=MATRIX, lora=True),
        ]  # fmt: skip

    if cfg.num_experts:
        # Official names are crossed (spec §1.6): `mlp` is the MoE, `mlp2` the dense MLP (HF `mlp`).
        out += geglu("mlp2")
        out += [
            leaf("pre_ffw2_norm/scale", "embed", "pre_feedforward_layernorm.weight", "ffn_norm.weight"),
            leaf("post_ffw2_norm/scale", "embed", "post_feedforward_layernorm_1.weight", "post_ffw_norm_1.weight"),
            leaf("pre_ffw_norm/scale", "embed", "pre_feedforward_layernorm_2.weight", "pre_ffw_norm_2.weight"),
            leaf("mlp/router_logits/w", "embed experts", "router.proj.weight", "ffn_gate_inp.weight",
                 contracts="embed", quant=ROUTER),
            leaf("mlp/router_scale", "embed", "router.scale", "ffn_gate_inp.scale"),
            leaf("mlp/per_expert_scale", "experts", "router.per_expert_scale", "ffn_down_exps.scale"),
            leaf("mlp/gating_einsum/w", "experts gate_up expert_mlp embed", "experts.gate_up_proj",
                 "ffn_gate_up_exps.weight", contracts="embed", batch="experts", quant=MATRIX, lora=True),
            leaf("mlp/linear/w", "experts expert_mlp embed", "experts.down_proj", "ffn_down_exps.weight",
                 contracts="expert_mlp", batch="experts", quant=MATRIX, lora=True),
            leaf("post_ffw1_norm/scale", "embed", "post_feedforward_layernorm_2.weight", "post_ffw_norm_2.weight"),
        ]  # fmt: skip
    else:
        out.append(leaf("pre_ffw_norm/scale", "embed", "pre_feedforward_layernorm.weight", "ffn_norm.weight"))
        out += geglu("mlp")
    out.append(leaf("post_ffw_norm/scale", "embed", "post_feedforward_layernorm.weight", "post_ffw_norm.weight"))
    if cfg.per_layer_input_dim:
        out += [
            leaf("per_layer_input_gate/w", "embed ple_dim", "per_layer_input_gate.weight", "inp_gate.weight",
                 contracts="embed", quant=PLE_GATE, lora=True),
            leaf("per_layer_projection/w", "ple_dim embed", "per_layer_projection.weight", "proj.weight",
                 contracts="ple_dim", quant=PLE_GATE, lora=True),
            leaf("post_per_layer_input_norm/scale", "embed", "post_per_layer_input_norm.weight", "post_norm.weight"),
        ]  # fmt: skip
    out.append(leaf("skip_scale", "scalar", "layer_scalar", "layer_output_scale.weight"))
    return out


# The clipped linears of the vision encoder: the official einsum scope and the HF projection(s) it stands for (one
# official clip bound per einsum; HF has one per projection, so K and V, gate and up hold copies).
# The clipped linears of a vision layer: official scope, HF modules, their mmproj names.
_VISION_CLIPPED = (
    ("attn/q_einsum", ("self_attn.q_proj",), ("attn_q",)),
    ("attn/kv_einsum", ("self_attn.k_proj", "self_attn.v_proj"), ("attn_k", "attn_v")),
    ("attn/attn_vec_einsum", ("self_attn.o_proj",), ("attn_out",)),
    ("mlp/gating_einsum", ("mlp.gate_proj", "mlp.up_proj"), ("ffn_gate", "ffn_up")),
    ("mlp/linear", ("mlp.down_proj",), ("ffn_down",)),
)
_CLIP_BOUNDS = (("clip_input_min", "input_min"), ("clip_input_max", "input_max"))
_CLIP_BOUNDS += (("clip_output_min", "output_min"), ("clip_output_max", "output_max"))


def _clip_init(bound: str) -> str:
    return "-inf" if bound.endswith("_min") else "inf"  # the official initial values: no clipping


def _vision(cfg: Gemma4Config) -> list[Leaf]:
    """The vision encoder (spec §4.1, §5.1): layers stacked on axis 0, HF `model.vision_tower.` + `embed_vision`,
    mmproj `v.` + `mm.`."""
    v = cfg.vision
    sizes = {
        "patch": v.patch_values, "vision_embed": v.width, "positions": v.position_table_size, "xy": 2,
        "layers": v.num_layers, "vision_heads": v.num_heads, "vision_head_dim": v.head_dim, "kv": 2, "gate_up": 2,
        "vision_mlp": v.ffw_hidden, "embed": cfg.embed_dim,
    }  # fmt: skip
    leaf = _Builder(sizes, ("vision_encoder",), "vision_tower.", "v.", part="vision")
    block, hf_layer, gguf_layer = "transformer/stacked_layers/block/", "encoder.layers.{i}.", "blk.{i}."

    def stacked(path, axes, hf, gguf, **kw):
        hf, gguf = ((n,) if isinstance(n, str) else n for n in (hf, gguf))
        hf, gguf = tuple(hf_layer + n for n in hf), tuple(gguf_layer + n for n in gguf)
        return leaf(block + path, "layers " + axes, hf, gguf, stack="layers", **kw)

    out = [
        leaf("entry/input_projection/w", "patch vision_embed", "patch_embedder.input_proj.weight",
             "patch_embd.weight", contracts="patch", quant=TOWER, gguf_form="patch_chw"),
        leaf("entry/pos_emb", "positions xy vision_embed", "patch_embedder.position_embedding_table",
             "position_embd.weight", hf_axes="xy positions vision_embed", quant=TOWER, init="normal:0.02"),
        stacked("pre_attention_norm/scale", "vision_embed", "input_layernorm.weight", "ln1.weight"),
        stacked("attn/q_einsum/w", "vision_heads vision_embed vision_head_dim", "self_attn.q_proj.linear.weight",
                "attn_q.weight", contracts="vision_embed", quant=TOWER),
        stacked("attn/kv_einsum/w", "kv vision_heads vision_embed vision_head_dim",
                ("self_attn.k_proj.linear.weight", "self_attn.v_proj.linear.weight"),
                ("attn_k.weight", "attn_v.weight"), contracts="vision_embed", split="kv", quant=TOWER),
        stacked("attn/query_norm/scale", "vision_head_dim", "self_attn.q_norm.weight", "attn_q_norm.weight"),
        stacked("attn/key_norm/scale", "vision_head_dim", "self_attn.k_norm.weight", "attn_k_norm.weight"),
        stacked("attn/attn_vec_einsum/w", "vision_heads vision_head_dim vision_embed", "self_attn.o_proj.linear.weight",
                "attn_out.weight", contracts="vision_heads vision_head_dim", quant=TOWER),
        stacked("post_attention_norm/scale", "vision_embed", "post_attention_layernorm.weight",
                "attn_post_norm.weight"),
        stacked("pre_ffw_norm/scale", "vision_embed", "pre_feedforward_layernorm.weight", "ln2.weight"),
        stacked("mlp/gating_einsum/w", "gate_up vision_mlp vision_embed",
                ("mlp.gate_proj.linear.weight", "mlp.up_proj.linear.weight"), ("ffn_gate.weight", "ffn_up.weight"),
                contracts="vision_embed", split="gate_up", quant=TOWER),
        stacked("mlp/linear/w", "vision_mlp vision_embed", "mlp.down_proj.linear.weight", "ffn_down.weight",
                contracts="vision_mlp", quant=TOWER),
        stacked("post_ffw_norm/scale", "vision_embed", "post_feedforward_layernorm.weight", "ffn_post_norm.weight"),
    ]  # fmt: skip
    if v.clipped_linears:
        for scope, projections, gguf_projections in _VISION_CLIPPED:
            for bound, hf_bound in _CLIP_BOUNDS:
                names = tuple(f"{projection}.{hf_bound}" for projection in projections)
                gguf = tuple(f"{projection}.{hf_bound}" for projection in gguf_projections)
                out.append(stacked(f"{scope}/{bound}", "", names, gguf, replicate=len(names) > 1,
                                   init=_clip_init(bound)))  # fmt: skip
    if v.standardize:
        out += [
            leaf("standardize/bias", "vision_embed", "std_bias", "std_bias", init="zeros"),
            leaf("standardize/scale", "vision_embed", "std_scale", "std_scale"),
        ]
    projection = _Builder(sizes, ("embedder",), "embed_vision.", "mm.", part="vision")
    out.append(projection("mm_input_projection/w", "vision_embed embed", "embedding_projection.weight",
                          "input_projection.weight", contracts="vision_embed", quant=TOWER))  # fmt: skip
    return out


# The clipped linears of a conformer layer: official scope, HF module, mmproj name.
_AUDIO_CLIPPED = (
    ("fflayer_start/ffn_layer1", "feed_forward1.ffw_layer_1", "ffn_up"),
    ("fflayer_start/ffn_layer2", "feed_forward1.ffw_layer_2", "ffn_down"),
    ("trans_atten/self_atten/query", "self_attn.q_proj", "attn_q"),
    ("trans_atten/self_atten/key", "self_attn.k_proj", "attn_k"),
    ("trans_atten/self_atten/value", "self_attn.v_proj", "attn_v"),
    ("trans_atten/post", "self_attn.post", "attn_out"),
    ("lconv/linear_start", "lconv1d.linear_start", "conv_pw1"),
    ("lconv/linear_end", "lconv1d.linear_end", "conv_pw2"),
    ("fflayer_end/ffn_layer1", "feed_forward2.ffw_layer_1", "ffn_up_1"),
    ("fflayer_end/ffn_layer2", "feed_forward2.ffw_layer_2", "ffn_down_1"),
)
AUDIO_LAYER = "conformer/stacked_layers_{i}"  # one key of the official tree: the Flax module name contains "/"


def _audio(cfg: Gemma4Config) -> list[Leaf]:
    """The audio encoder (spec §4.2, §5.1): conformer layers one by one, HF `model.audio_tower.` + `embed_audio`,
    mmproj `a.` + `mm.a.`."""
    a = cfg.audio
    c0, c1 = a.subsampling_channels
    sizes = {
        "kh": 3, "kw": 3, "one": 1, "channels0": c0, "channels1": c1, "mel": a.subsampled_mel_bins,
        "audio_embed": a.hidden_size, "audio_q": a.hidden_size, "audio_k": a.hidden_size, "audio_v": a.hidden_size,
        "audio_end": a.hidden_size, "audio_glu": 2 * a.hidden_size, "audio_mlp": a.ffw_hidden,
        "audio_heads": a.num_heads, "audio_head_dim": a.head_dim, "conv_kernel": a.conv_kernel_size,
        "audio_out": a.output_dim, "embed": cfg.embed_dim,
    }  # fmt: skip
    leaf = _Builder(sizes, ("audio_encoder",), "audio_tower.", "a.", part="audio")
    sub = "subsample_conv_projection."
    out = [
        leaf("feature/subsampling_0/kernel", "kh kw one channels0", sub + "layer0.conv.weight", "conv1d.0.weight",
             contracts="kh kw one", hf_axes="channels0 one kh kw", quant=TOWER),
        leaf("feature/norm_0/scale", "channels0", sub + "layer0.norm.weight", "conv1d.0.norm.weight"),
        leaf("feature/subsampling_1/kernel", "kh kw channels0 channels1", sub + "layer1.conv.weight",
             "conv1d.1.weight", contracts="kh kw channels0", hf_axes="channels1 channels0 kh kw", quant=TOWER),
        leaf("feature/norm_1/scale", "channels1", sub + "layer1.norm.weight", "conv1d.1.norm.weight"),
        leaf("feature/input_proj/kernel", "mel channels1 audio_embed", sub + "input_proj_linear.weight",
             "input_projection.weight", contracts="mel channels1", quant=TOWER),
    ]  # fmt: skip
    for i in range(a.num_layers):
        layer = _Builder(sizes, ("audio_encoder", AUDIO_LAYER.format(i=i)), f"audio_tower.layers.{i}.", f"a.blk.{i}.",
                         part="audio")  # fmt: skip
        for scope, hf_ffn, g in (("fflayer_start", "feed_forward1.", ""), ("fflayer_end", "feed_forward2.", "_1")):
            out += [
                layer(f"{scope}/pre_layer_norm/scale", "audio_embed", hf_ffn + "pre_layer_norm.weight",
                      f"ffn_norm{g}.weight"),
                layer(f"{scope}/ffn_layer1/kernel", "audio_embed audio_mlp", hf_ffn + "ffw_layer_1.linear.weight",
                      f"ffn_up{g}.weight", contracts="audio_embed", quant=TOWER),
                layer(f"{scope}/ffn_layer2/kernel", "audio_mlp audio_embed", hf_ffn + "ffw_layer_2.linear.weight",
                      f"ffn_down{g}.weight", contracts="audio_mlp", quant=TOWER),
                layer(f"{scope}/post_layer_norm/scale", "audio_embed", hf_ffn + "post_layer_norm.weight",
                      f"ffn_post_norm{g}.weight"),
            ]  # fmt: skip
            if scope == "fflayer_start":  # the layer's order: FFN, attention, light conv, FFN, final norm
                out += _conformer_middle(layer)
        out.append(layer("final_ln/scale", "audio_embed", "norm_out.weight", "ln2.weight"))
        if a.use_clipped_linears:
            for scope, module, gguf in _AUDIO_CLIPPED:
                for bound, hf_bound in _CLIP_BOUNDS:
                    out.append(layer(f"{scope}/{bound}", "", f"{module}.{hf_bound}", f"{gguf}.{hf_bound}",
                                     init=_clip_init(bound)))  # fmt: skip
    out += [
        leaf("output_projection/kernel", "audio_embed audio_out", "output_proj.weight", "pre_encode.out.weight",
             contracts="audio_embed", quant=TOWER),
        leaf("output_projection/bias", "audio_out", "output_proj.bias", "pre_encode.out.bias", init="zeros"),
        _Builder(sizes, ("embedder",), "embed_audio.", "mm.a.", part="audio")(
            "audio_input_projection/w", "audio_out embed", "embedding_projection.weight", "input_projection.weight",
            contracts="audio_out", quant=TOWER),
    ]  # fmt: skip
    return out


def _conformer_middle(layer: _Builder) -> list[Leaf]:
    """A conformer layer's attention (with its relative-position projection) and light convolution. (llama.cpp's
    names for the two light-conv norms look swapped; they are its names.)"""
    return [
        layer("trans_atten/pre_norm/scale", "audio_embed", "norm_pre_attn.weight", "attn_pre_norm.weight"),
        *(
            layer(f"trans_atten/self_atten/{name}/kernel", f"audio_embed audio_{name[0]}",
                  f"self_attn.{name[0]}_proj.linear.weight", f"attn_{name[0]}.weight", contracts="audio_embed",
                  quant=TOWER)
            for name in ("query", "key", "value")
        ),
        layer("trans_atten/self_atten/per_dim_scale", "audio_head_dim", "self_attn.per_dim_scale",
              "per_dim_scale.weight", init="zeros", gguf_form="softplus"),
        layer("trans_atten/self_atten/relative_position_embedding/pos_proj/kernel",
              "audio_embed audio_heads audio_head_dim", "self_attn.relative_k_proj.weight", "attn_k_rel.weight",
              contracts="audio_embed", quant=TOWER),
        layer("trans_atten/post/kernel", "audio_heads audio_head_dim audio_embed", "self_attn.post.linear.weight",
              "attn_out.weight", contracts="audio_heads audio_head_dim", quant=TOWER),
        layer("trans_atten/post_norm/scale", "audio_embed", "norm_post_attn.weight", "attn_post_norm.weight"),
        layer("lconv/ln/scale", "audio_embed", "lconv1d.pre_layer_norm.weight", "conv_norm.weight"),
        layer("lconv/linear_start/kernel", "audio_embed audio_glu", "lconv1d.linear_start.linear.weight",
              "conv_pw1.weight", contracts="audio_embed", quant=TOWER),
        layer("lconv/depthwise_conv1d/kernel", "conv_kernel one audio_embed", "lconv1d.depthwise_conv1d.weight",
              "conv_dw.weight", contracts="conv_kernel", hf_axes="audio_embed one conv_kernel", quant=TOWER,
              gguf_form="squeeze"),
        layer("lconv/conv_norm/scale", "audio_embed", "lconv1d.conv_norm.weight", "norm_conv.weight"),
        layer("lconv/linear_end/kernel", "audio_embed audio_end", "lconv1d.linear_end.linear.weight",
              "conv_pw2.weight", contracts="audio_embed", quant=TOWER),
    ]  # fmt: skip


@functools.lru_cache(maxsize=32)
def param_spec(config: Gemma4Config) -> tuple[Leaf, ...]:
    """Every leaf of the official parameter tree of `config`, in a fixed order: the text decoder (embedder, layers,
    final norm), then the vision and audio encoders if the config has them."""
    leaves = list(_embedder(config))
    for i in range(config.num_layers):
        leaves += _layer(config, i)
    leaves.append(_Builder(_sizes(config))("final_norm/scale", "embed", "norm.weight", "output_norm.weight"))
    if config.vision is not None:
        leaves += _vision(config)
    if config.audio is not None:
        leaves += _audio(config)
    return tuple(leaves)


@functools.lru_cache(maxsize=32)
def by_path(config: Gemma4Config) -> dict[Path, Leaf]:
    return {leaf.path: leaf for leaf in param_spec(config)}


def leaf_of(config: Gemma4Config, path: Path | str) -> Leaf:
    """The entry of `path` (a tuple or a "/"-joined string)."""
    key = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    return by_path(config)[key]


def leaf_dtype(leaf: Leaf, dtype):
    """The dtype a leaf is kept in when the model computes in `dtype`: the encoders in at least float32 (the
    official checkpoints keep them in float32; they are small, and their outputs feed every image/audio token)."""
    import jax.numpy as jnp

    return jnp.promote_types(dtype, jnp.float32) if leaf.part != "text" else jnp.dtype(dtype)


def shapes(config: Gemma4Config) -> dict[Path, tuple[int, ...]]:
    return {leaf.path: leaf.shape for leaf in param_spec(config)}


def tree_of(config: Gemma4Config, value: Callable[[Leaf], object]) -> dict:
    """A nested dict in the official tree layout with `value(leaf)` at every leaf."""
    tree: dict = {}
    for leaf in param_spec(config):
        node = tree
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = value(leaf)
    return tree


def hf_tensors(config: Gemma4Config) -> Iterator[tuple[Leaf, str, tuple[int, ...]]]:
    """(leaf, HF name, HF shape) of every HF tensor, in spec order (unused reader K/V included)."""
    for leaf in param_spec(config):
        for name, shape in zip(leaf.hf, leaf.hf_shapes, strict=True):
            yield leaf, name, shape
