"""The parameter spec: one entry per leaf of the official parameter tree, and every per-tensor fact derived from it.

A `Leaf` states once what the project needs to know about one tensor:
- `path`: where it sits in the official Flax tree (spec §5.1), e.g. ("layer_3", "attn", "q_einsum", "w");
- `axes`: a logical name per axis (embed, heads, head_dim, mlp, ...). The names give the sizes, and they are what
  a device mesh maps to its own axes;
- `contracts`: the axes a matmul with it sums over (its "in" features); a lookup table names its feature axis;
- `split`: an axis whose indices are separate Hugging Face tensors and separate LoRA adapters (K and V, gate and up);
- `batch`: axes every format keeps apart (the MoE expert stack);
- `hf` / `gguf`: its Hugging Face and llama.cpp tensor names (one per index of `split`);
- `quant`: its quantization class, which the per-target policies (`gemma4_jax.quant.policy`) decide on;
- `lora`: whether a LoRA adapter may target it;
- `unused`: in the official tree but never read (the K/V weights of KV-shared reader layers, spec §6 #17).

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
QUANT_CLASSES = (SCALE, ROUTER, MATRIX, PLE_PROJECTION, PLE_GATE, EMBEDDING, PLE_TABLE)


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

    def __post_init__(self):
        assert len(self.axes) == len(self.shape) == len(set(self.axes)), self
        assert set(self.contracts) | set(self.batch) | {self.split} - {None} <= set(self.axes), self
        assert self.quant in QUANT_CLASSES, self
        if self.split is not None:  # the split axis leads the stored layout, so it must lead the uncontracted axes
            assert self.stored_axes[0] == self.split and len(self.hf) == self.size(self.split), self
        else:
            assert len(self.hf) == 1, self
        assert not self.gguf or len(self.gguf) == len(self.hf), self

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
        """Standard deviation of a random weight, 1/sqrt(fan in); None for scales (initialised to 1)."""
        return None if self.quant == SCALE else 1.0 / math.sqrt(self.fan_in)

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

    def _hf_shape(self) -> tuple[int, ...]:
        """Shape of each HF tensor: a vector as is; a lookup table [vocab, features]; else torch's Linear
        [out, in], with batch axes (experts) kept in front."""
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
        return (self._hf_shape(),) * len(self.hf)

    def to_hf(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
        """The official-layout array as its HF tensor(s) (views where numpy can)."""
        stored = np.transpose(w, self.perm)
        parts = list(stored) if self.split is not None else [stored]
        return tuple(p.reshape(self._hf_shape()) for p in parts)

    def from_hf(self, *arrays: np.ndarray) -> np.ndarray:
        """The inverse of `to_hf`. Raises ValueError naming the tensor whose shape does not fit."""
        want = self._hf_shape()
        for name, a in zip(self.hf, arrays, strict=True):
            if tuple(a.shape) != want:
                raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {want}")
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
    """Makes Leaf entries under a path / HF / GGUF prefix, with sizes looked up by axis name."""

    def __init__(self, sizes: dict[str, int], path: Path = (), hf: str = "", gguf: str = ""):
        self.sizes, self.path, self.hf, self.gguf = sizes, path, hf, gguf

    def __call__(self, path: str, axes: str, hf, gguf=(), *, contracts: str = "", split=None, batch: str = "", **kw):
        hf = (hf,) if isinstance(hf, str) else tuple(hf)
        gguf = (gguf,) if isinstance(gguf, str) else tuple(gguf)
        names = _axes(axes)
        return Leaf(
            path=(*self.path, *path.split("/")),
            axes=names,
            shape=tuple(self.sizes[a] for a in names),
            contracts=_axes(contracts),
            split=split,
            batch=_axes(batch),
            hf=tuple(self.hf + n for n in hf),
            gguf=tuple(self.gguf + n for n in gguf),
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
                 "ffn_gate_up_exps.weight", contracts="embed", batch="experts", quant=MATRIX),
            leaf("mlp/linear/w", "experts expert_mlp embed", "experts.down_proj", "ffn_down_exps.weight",
                 contracts="expert_mlp", batch="experts", quant=MATRIX),
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


@functools.lru_cache(maxsize=32)
def param_spec(config: Gemma4Config) -> tuple[Leaf, ...]:
    """Every leaf of the official parameter tree of `config`, in a fixed order (embedder, layers, final norm)."""
    leaves = list(_embedder(config))
    for i in range(config.num_layers):
        leaves += _layer(config, i)
    leaves.append(_Builder(_sizes(config))("final_norm/scale", "embed", "norm.weight", "output_norm.weight"))
    return tuple(leaves)


@functools.lru_cache(maxsize=32)
def by_path(config: Gemma4Config) -> dict[Path, Leaf]:
    return {leaf.path: leaf for leaf in param_spec(config)}


def leaf_of(config: Gemma4Config, path: Path | str) -> Leaf:
    """The entry of `path` (a tuple or a "/"-joined string)."""
    key = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    return by_path(config)[key]


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
