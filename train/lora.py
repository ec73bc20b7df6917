"""LoRA adapters as weight objects of the model (gemma4_jax/model.py, "weights").

A `LoraWeight` wraps a frozen base weight (a dense array or a quantized weight object: QLoRA) and two small
f32 factors. Its contraction is `einsum(x, W) + scale * ((x A) B)`, so `W + AB` is never formed in the forward
pass; only `merge` builds it, once.

Every adapted weight has an official layout (spec §5.1) whose axes each play one role:
  "g"  a group axis: separate adapters per index (K and V in `kv_einsum` [2, K, D, H], gate and up in
       `gating_einsum` [2, F, D]), as Hugging Face has separate modules for them,
  "i"  an input axis (contracted with the activations),
  "o"  an output axis,
  "e"  the MoE expert axis: a separate adapter per expert, applied through the same ragged dispatch as the
       experts themselves (`LoraWeight.ragged_einsum`).
A has shape [g/e..., i..., r] and B [g/e..., r, o...] (each in the order of the weight's axes); the Hugging Face
LoRA factors of module `m` (`lora_A` [r, in], `lora_B` [out, r]) are A.reshape(-1, r).T and B.reshape(r, -1).T
of that module's group, because the official layouts flatten in the same order as HF's Linear weights. The
expert stacks are PEFT `target_parameters` (see `_peft_expert_factors` for their layout).

Adapters live in their own tree, shaped like the parameter tree down to each adapted leaf, which holds
{"a": A, "b": B}: only this tree is differentiated and has optimizer state.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import model, param_spec
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import tree_get, tree_set

# PEFT's names for the Gemma 4 text modules (`target_modules` in its adapter_config.json).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
PLE_MODULES = ("per_layer_input_gate", "per_layer_projection")
# The 26B-A4B expert stacks: PEFT adapts them as parameters (`target_parameters`), not modules, so a bare
# module name (`down_proj`) never selects them; these names (or a full pattern such as `layers.1.experts.*`) do.
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
DEFAULT_TARGETS = ATTENTION_MODULES + MLP_MODULES


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r, as PEFT does without rsLoRA), dropout on the adapter
    input, and target patterns.

    A pattern is either a module name (`q_proj`, `gate_proj`, `per_layer_projection`, ...) that matches it in
    every layer, a dotted name that ends module names (`self_attn.q_proj`, `experts.down_proj`), or an fnmatch
    pattern over full module names such as `layers.1[0-9].self_attn.*`.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise Gemma4Error(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise Gemma4Error(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise Gemma4Error("no LoRA targets given")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}


# ----- the weight object ----------------------------------------------------------------------------------


def _factor_shapes(shape: tuple[int, ...], roles: tuple[str, ...], rank: int):
    g = [n for n, r in zip(shape, roles, strict=True) if r in "ge"]
    i = [n for n, r in zip(shape, roles, strict=True) if r == "i"]
    o = [n for n, r in zip(shape, roles, strict=True) if r == "o"]
    return (*g, *i, rank), (*g, rank, *o)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """`base` + scale · A B, applied without forming the sum. `roles` give each axis of `base` its role."""

    base: Any  # array or weight object, frozen
    a: jax.Array  # [g..., i..., r]
    b: jax.Array  # [g..., r, o...]
    dropout_key: jax.Array | None = None  # set per step while training with dropout
    roles: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    def _letters(self, weight_spec: str) -> tuple[str, str, str]:
        """The weight's letters by role: (group and expert, input, output)."""
        by_role = {"g": "", "i": "", "o": ""}
        for letter, role in zip(weight_spec, self.roles, strict=True):
            by_role["g" if role == "e" else role] += letter
        return by_role["g"], by_role["i"], by_role["o"]

    def einsum(self, eqn: str, x: jax.Array) -> jax.Array:
        y = model.einsum(eqn, x, self.base)
        x_spec, w_spec, out_spec = model.einsum_specs(eqn)
        g, i, o = self._letters(w_spec)
        r = next(c for c in string.ascii_letters if c not in eqn)
        x_rest = "".join(c for c in x_spec if c not in i)  # batch letters (and "...")
        if self.dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.dropout_key, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1 - self.dropout, x.dtype), 0).astype(x.dtype)
        # Adapter math in the activations' dtype (bf16 training computes in bf16, the f32 factors get f32
        # gradients through the cast).
        t = jnp.einsum(f"{x_spec},{g}{i}{r}->{x_rest}{g}{r}", x, self.a.astype(x.dtype))
        update = jnp.einsum(f"{x_rest}{g}{r},{g}{r}{o}->{out_spec}", t, self.b.astype(x.dtype))
        return y + (update * jnp.asarray(self.scale, update.dtype)).astype(y.dtype)

    def ragged_einsum(self, eqn: str, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """The expert stacks' contraction (`model.ragged_einsum`, rows sorted by expert): each row goes through
        its expert's base weight and its expert's adapter, x A_e then B_e, so no [E, ...]-sized update is formed."""
        y = model.ragged_einsum(eqn, x, self.base, group_sizes)
        x_spec, w_spec, out_spec = model.einsum_specs(eqn)
        e, i, o = self._letters(w_spec)
        r = next(c for c in string.ascii_letters if c not in eqn)
        rows = x_spec[0]
        t = model.ragged_einsum(f"{x_spec},{e}{i}{r}->{rows}{r}", x, self.a.astype(x.dtype), group_sizes)
        update = model.ragged_einsum(f"{rows}{r},{e}{r}{o}->{out_spec}", t, self.b.astype(x.dtype), group_sizes)
        return y + (update * jnp.asarray(self.scale, update.dtype)).astype(y.dtype)

    def delta(self, dtype=jnp.float32) -> jax.Array:
        """scale · A B in the base weight's layout, computed in at least f32 (f64 under x64)."""
        acc = jnp.promote_types(jnp.promote_types(self.a.dtype, dtype), jnp.float32)
        letters = string.ascii_letters[: len(self.roles)]
        g, i, o = self._letters(letters)
        r = string.ascii_letters[len(self.roles)]
        prod = jnp.einsum(f"{g}{i}{r},{g}{r}{o}->{letters}", self.a.astype(acc), self.b.astype(acc))
        return (prod * self.scale).astype(dtype)

    def materialize(self, dtype) -> jax.Array:
        acc = jnp.promote_types(jnp.promote_types(self.a.dtype, dtype), jnp.float32)
        return (model.dense(self.base, acc) + self.delta(acc)).astype(dtype)

    def reshape(self, *shape) -> LoraWeight:
        """Merges leading axes (FeedForward views `gating_einsum` [2, F, D] as one [2F, D] matrix).

        Group axes merged into an output axis fold into the rank: A' = [A_0 | A_1] and B' = diag(B_0, B_1), a
        rank-2r adapter of the merged matrix that equals the two separate ones. Both are built from A and B
        inside the step (adapter-sized), so gradients reach the original factors.
        """
        shape = tuple(int(n) for n in shape)
        old = self.shape
        if shape == old:
            return self
        merged = len(old) - len(shape) + 1
        if merged < 2 or old[merged:] != shape[1:] or math.prod(old[:merged]) != shape[0]:
            raise NotImplementedError(f"LoraWeight.reshape merges leading axes only: {old} -> {shape}")
        lead = set(self.roles[:merged])
        base = self.base.reshape(*shape)
        if lead == {"g"}:
            a = self.a.reshape(shape[0], *self.a.shape[merged:])
            b = self.b.reshape(shape[0], *self.b.shape[merged:])
            return dataclasses.replace(self, base=base, a=a, b=b, roles=("g", *self.roles[merged:]))
        folded = self._fold_groups()
        if set(folded.roles[:merged]) != {"o"} and set(folded.roles[:merged]) != {"i"}:
            raise NotImplementedError(f"cannot merge axes with roles {self.roles[:merged]}")
        role = folded.roles[0]
        if role == "o":
            b = folded.b.reshape(folded.b.shape[0], shape[0], *folded.b.shape[1 + merged :])
            a = folded.a
        else:
            a = folded.a.reshape(shape[0], *folded.a.shape[merged:])
            b = folded.b
        return dataclasses.replace(folded, base=base, a=a, b=b, roles=(role, *folded.roles[merged:]))

    def _fold_groups(self) -> LoraWeight:
        """The same update as one adapter of rank G·r whose group axes became output axes (block-diagonal B)."""
        n_groups = self.roles.count("g")
        if n_groups == 0:
            return self
        if set(self.roles[:n_groups]) != {"g"}:
            raise NotImplementedError("group axes must lead")
        groups = self.shape[:n_groups]
        count = math.prod(groups)
        rank = self.a.shape[-1]
        a = self.a.reshape(count, -1, rank)  # [G, I, r]
        in_shape = self.a.shape[n_groups:-1]
        a = jnp.moveaxis(a, 0, 1).reshape(*in_shape, count * rank)  # [i..., G*r]
        b = self.b.reshape(count, rank, -1)  # [G, r, O]
        out_shape = self.b.shape[n_groups + 1 :]
        b = jnp.einsum("gro,gh->grho", b, jnp.eye(count, dtype=b.dtype)).reshape(count * rank, *groups, *out_shape)
        roles = tuple("o" if r == "g" else r for r in self.roles)
        return dataclasses.replace(self, a=a, b=b, roles=roles)


# ----- targets -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted leaf of the parameter tree and the Hugging Face module(s) it corresponds to."""

    path: tuple[str, ...]  # into the parameter tree
    roles: tuple[str, ...]
    modules: tuple[str, ...]  # HF module name per group index (one name if the leaf has no group axis)
    layer: int

    @property
    def experts(self) -> bool:
        """An MoE expert stack: one HF parameter [E, out, in] (a PEFT `target_parameters` entry), an adapter per
        expert."""
        return "e" in self.roles


def candidate_targets(config: Gemma4Config) -> list[Target]:
    """Every leaf LoRA can adapt (`lora=True` in the parameter spec, spec §6.1): attention, dense-MLP and MoE expert
    matrices and the per-layer PLE gate/projection. KV-shared readers' K/V projections are never used, so they are
    not candidates; embeddings, norms, scalars and the MoE router stay frozen."""
    return [
        Target(leaf.path, leaf.roles, leaf.lora_modules, int(leaf.path[0].removeprefix("layer_")))
        for leaf in param_spec.param_spec(config)
        if leaf.lora and not leaf.unused
    ]


def _matches(pattern: str, target: Target, module: str) -> bool:
    pattern = pattern.removeprefix("model.")
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    if "." not in pattern:  # a module name, as PEFT's target_modules: never an expert parameter
        return not target.experts and module.rsplit(".", 1)[-1] == pattern
    return module == pattern or module.endswith("." + pattern)


def select_targets(config: Gemma4Config, lora: LoraConfig) -> list[Target]:
    """The leaves `lora.targets` select. K/V (and gate/up) share one official leaf, so they go together."""
    chosen, used = [], set()
    for target in candidate_targets(config):
        hits = []
        for module in target.modules:
            matching = [p for p in lora.targets if _matches(p, target, module)]
            used.update(matching)
            hits.append(bool(matching))
        if all(hits):
            chosen.append(target)
        elif any(hits):
            names = " and ".join(m.rsplit(".", 1)[-1] for m in target.modules)
            raise Gemma4Error(
                f"LoRA targets: {names} of layer {target.layer} share one weight ({'/'.join(target.path)}); "
                "target both or neither"
            )
    known = {_short_name(t, m) for t in candidate_targets(config) for m in t.modules}
    unused = [p for p in lora.targets if p not in used]
    if unused:
        raise Gemma4Error(
            f"LoRA target(s) {', '.join(unused)} match no module of {config.name}; modules: {', '.join(sorted(known))}"
        )
    if lora.dropout and any(t.experts for t in chosen):
        raise Gemma4Error("LoRA dropout is not supported on the MoE experts (nor by PEFT); set dropout to 0")
    return chosen


def _short_name(target: Target, module: str) -> str:
    """`q_proj`, or `experts.down_proj` for an expert stack (the name that selects it in every layer)."""
    return ".".join(module.split(".")[-2:]) if target.experts else module.rsplit(".", 1)[-1]


# ----- adapter trees ------------------------------------------------------------------------------------------


def adapter_shapes(config: Gemma4Config, lora: LoraConfig) -> dict:
    """{path...: {"a": shape, "b": shape}} of the selected targets."""
    tree: dict = {}
    for target in select_targets(config, lora):
        a, b = _factor_shapes(_base_shape(config, target), target.roles, lora.rank)
        tree_set(tree, target.path, {"a": a, "b": b})
    return tree


def init_adapters(config: Gemma4Config, lora: LoraConfig, seed: int = 0) -> dict:
    """A uniform in ±1/sqrt(fan in) (fan in = the contracted size), B = 0: training starts at the base model."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    shapes = adapter_shapes(config, lora)
    for target in select_targets(config, lora):
        a_shape, b_shape = tree_get(shapes, target.path).values()
        fan_in = math.prod(n for n, r in zip(_base_shape(config, target), target.roles, strict=True) if r == "i")
        bound = 1 / math.sqrt(fan_in)
        a = rng.uniform(-bound, bound, a_shape).astype(np.float32)
        tree_set(tree, target.path, {"a": jnp.asarray(a), "b": jnp.zeros(b_shape, jnp.float32)})
    return tree


def _base_shape(config, target) -> tuple[int, ...]:
    return param_spec.leaf_of(config, target.path).shape


def targets_of(config: Gemma4Config, adapters: dict) -> list[Target]:
    """The targets an adapter tree holds (in model order)."""
    out = []
    for target in candidate_targets(config):
        try:
            tree_get(adapters, target.path)
        except (KeyError, TypeError):
            continue
        out.append(target)
    return out


def attach(params: dict, adapters: dict, config: Gemma4Config, lora: LoraConfig, dropout_key=None) -> dict:
    """The parameter tree with each adapted leaf replaced by a `LoraWeight` (nothing is copied)."""
    out = _shallow_copy(params)
    for n, target in enumerate(targets_of(config, adapters)):
        factors = tree_get(adapters, target.path)
        key = None if dropout_key is None or lora.dropout == 0 else jax.random.fold_in(dropout_key, n)
        weight = LoraWeight(
            tree_get(params, target.path), factors["a"], factors["b"], key, target.roles, lora.scale, lora.dropout
        )
        tree_set(out, target.path, weight)
    return out


def _shallow_copy(tree):
    return {k: _shallow_copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def merge(params: dict, adapters: dict, config: Gemma4Config, lora: LoraConfig, dtype=None) -> dict:
    """Dense parameters with every adapter folded in: W + scale · A B, computed in f32, stored in `dtype`
    (default: the base weight's dtype; a quantized base is dequantized)."""
    attached = attach(params, adapters, config, lora)
    out = _shallow_copy(params)
    for target in targets_of(config, adapters):
        weight = tree_get(attached, target.path)
        tree_set(out, target.path, weight.materialize(dtype or weight.dtype))
    return out


def count(adapters: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(adapters))


def expected_count(config: Gemma4Config, lora: LoraConfig) -> int:
    """r · (in + out) per adapted HF module: the textbook LoRA count, from the config alone."""
    total = 0
    for target in select_targets(config, lora):
        shape = _base_shape(config, target)
        groups = math.prod(n for n, r in zip(shape, target.roles, strict=True) if r in "ge")
        n_in = math.prod(n for n, r in zip(shape, target.roles, strict=True) if r == "i")
        n_out = math.prod(n for n, r in zip(shape, target.roles, strict=True) if r == "o")
        total += groups * lora.rank * (n_in + n_out)
    return total


def summary(config: Gemma4Config, adapters: dict) -> str:
    by_module: dict[str, int] = {}
    for target in targets_of(config, adapters):
        for module in target.modules:
            name = _short_name(target, module)
            by_module[name] = by_module.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in by_module.items())


# ----- Hugging Face PEFT layout --------------------------------------------------------------------------------

PEFT_WEIGHTS = "adapter_model.safetensors"
TARGETS_METADATA = "gemma4_jax_targets"  # key of PEFT_WEIGHTS' metadata (adapter_config.json's before 2026-12-05)
PEFT_CONFIG = "adapter_config.json"


def to_peft(config: Gemma4Config, adapters: dict, prefix: str = "model.", dtype=np.float32) -> dict[str, np.ndarray]:
    """PEFT tensor names -> arrays (f32, as PEFT files hold them):
    `base_model.model.{prefix}layers.{i}.{module}.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. `prefix` is
    where the checkpoint keeps the text model (`model.` for Gemma4ForCausalLM, `model.language_model.` for the
    multimodal checkpoints)."""
    out = {}
    targets = targets_of(config, adapters)
    stems = _peft_stems(targets)
    for target in targets:
        a, b = (np.asarray(x, dtype) for x in tree_get(adapters, target.path).values())
        rank = a.shape[-1]
        grouped = "g" in target.roles
        for g, stem in enumerate(stems[target.path]):
            if target.experts:
                a_hf, b_hf = _peft_expert_factors(a, b)
            else:
                a_g, b_g = (a[g], b[g]) if grouped else (a, b)
                a_hf, b_hf = a_g.reshape(-1, rank).T, b_g.reshape(rank, -1).T
            name = f"base_model.model.{prefix}{stem}"
            out[name + ".lora_A.weight"] = np.ascontiguousarray(a_hf)
            out[name + ".lora_B.weight"] = np.ascontiguousarray(b_hf)
    return out


def _peft_stems(targets: list[Target]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Each target's PEFT tensor-name stem(s): its module names, except for the expert stacks. PEFT wraps each
    adapted parameter of `layers.i.experts` around the module (`lora.ParamWrapper`), gate_up_proj first, so the
    last one adapted is `layers.i.experts` and each earlier one one `.base_layer` deeper."""
    out = {t.path: t.modules for t in targets if not t.experts}
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        if t.experts:
            by_layer.setdefault(t.layer, []).append(t)
    for stacks in by_layer.values():
        stacks.sort(key=lambda t: EXPERT_PARAMETERS.index(_short_name(t, t.modules[0])))
        for k, t in enumerate(stacks):
            module = t.modules[0].rsplit(".", 1)[0]  # layers.i.experts
            out[t.path] = (module + ".base_layer" * (len(stacks) - 1 - k),)
    return out


def _peft_expert_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert factors A [E, in, r], B [E, r, out] as PEFT stores a 3-D parameter's adapter: `lora_A` [E·r, in]
    (expert-major rows) and `lora_B` [out, r·E] (rank-major columns: column k·E + e), its update for expert e
    being lora_B[:, k·E + e] @ lora_A[e·r + k] summed over k (peft's ParamWrapper.get_delta_weight)."""
    experts, rank = a.shape[0], a.shape[-1]
    a_hf = a.reshape(experts, -1, rank).transpose(0, 2, 1).reshape(experts * rank, -1)
    b_hf = b.reshape(experts, rank, -1).transpose(2, 1, 0).reshape(-1, rank * experts)
    return a_hf, b_hf


def _from_peft_expert_factors(a_hf: np.ndarray, b_hf: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `_peft_expert_factors`: A [E, in, r], B [E, r, out]."""
    rank = a_hf.shape[0] // experts
    a = a_hf.reshape(experts, rank, -1).transpose(0, 2, 1)
    b = b_hf.reshape(-1, rank, experts).transpose(2, 1, 0)
    return a, b


def from_peft(config: Gemma4Config, tensors: dict[str, np.ndarray], lora: LoraConfig, source: str) -> dict:
    """The inverse of `to_peft` (any text prefix); every tensor must be used and have the expected shape."""
    by_module = {}
    for name, value in tensors.items():
        stem = name.removeprefix("base_model.model.")
        for prefix in ("model.language_model.", "model."):
            stem = stem.removeprefix(prefix) if stem.startswith(prefix + "layers.") else stem
        by_module[stem] = value
    tree: dict = {}
    used = set()
    targets = select_targets(config, lora)
    stems = _peft_stems(targets)
    for target in targets:
        base_shape = _base_shape(config, target)
        a_shape, b_shape = _factor_shapes(base_shape, target.roles, lora.rank)
        grouped = "g" in target.roles
        experts = base_shape[0] if target.experts else 1
        a_parts, b_parts = [], []
        for module, stem in zip(target.modules, stems[target.path], strict=True):
            names = (stem + ".lora_A.weight", stem + ".lora_B.weight")
            if any(n not in by_module for n in names):
                raise Gemma4Error(f"{source}: no adapter for {module} (adapter_config.json targets it)")
            used.update(names)
            a_hf, b_hf = (np.asarray(by_module[n], np.float32) for n in names)
            a_part_shape = a_shape[1:] if grouped or target.experts else a_shape  # [i..., r]
            b_part_shape = b_shape[1:] if grouped or target.experts else b_shape  # [r, o...]
            want = (
                (lora.rank * experts, math.prod(a_part_shape[:-1])),
                (math.prod(b_part_shape[1:]), lora.rank * experts),
            )
            if (a_hf.shape, b_hf.shape) != want:
                raise Gemma4Error(
                    f"{source}: {module} adapter has shapes {a_hf.shape}, {b_hf.shape}; rank {lora.rank} on "
                    f"{config.name} needs {want[0]}, {want[1]} (an adapter for another model or rank?)"
                )
            if target.experts:
                a, b = _from_peft_expert_factors(a_hf, b_hf, experts)
                a_parts.append(a.reshape(a_shape))
                b_parts.append(b.reshape(b_shape))
                continue
            a_parts.append(a_hf.T.reshape(a_part_shape))
            b_parts.append(b_hf.T.reshape(b_part_shape))
        a = np.stack(a_parts) if grouped else a_parts[0]
        b = np.stack(b_parts) if grouped else b_parts[0]
        tree_set(tree, target.path, {"a": jnp.asarray(a), "b": jnp.asarray(b)})
    unused = sorted(set(by_module) - used)
    if unused:
        raise Gemma4Error(f"{source}: tensors that match no target of {config.name}: {', '.join(unused[:3])}")
    return tree


def peft_config(config: Gemma4Config, adapters: dict, lora: LoraConfig, base_model: str | None) -> dict:
    adapted = targets_of(config, adapters)
    modules = [m for t in adapted if not t.experts for m in t.modules]
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    # Module names alone if they select exactly the adapted modules in HF's model, else an exact regex
    # (HF KV-shared readers have no k_proj/v_proj, so names alone already skip them).
    everywhere = [
        m for t in candidate_targets(config) if not t.experts for m in t.modules if m.rsplit(".", 1)[-1] in short
    ]
    target_modules: list[str] | str | None
    if not modules:
        target_modules = None  # expert stacks only
    elif sorted(everywhere) == sorted(modules):
        target_modules = short
    else:
        target_modules = r".*\.(" + "|".join(m.replace(".", r"\.") for m in modules) + ")"
    # Expert stacks: PEFT's `target_parameters` (names that end parameter names: `experts.down_proj` everywhere,
    # `layers.3.experts.down_proj` for one layer).
    stacks = [t.modules[0] for t in adapted if t.experts]
    names = sorted({_short_name(t, t.modules[0]) for t in adapted if t.experts})
    all_stacks = [
        t.modules[0] for t in candidate_targets(config) if t.experts and _short_name(t, t.modules[0]) in names
    ]
    target_parameters = names if sorted(all_stacks) == sorted(stacks) else stacks
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        **({"target_parameters": target_parameters} if target_parameters else {}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft(directory: str, config: Gemma4Config, adapters: dict, lora: LoraConfig, base_model=None, prefix="model."):
    """Writes adapter_model.safetensors + adapter_config.json (each atomically) into `directory`."""
    import os

    from gemma4_jax import files

    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise files.os_error(directory, e) from None
    tensors = to_peft(config, jax.device_get(adapters), prefix)
    # Our target patterns, to rebuild the same LoraConfig, ride in the weights' metadata: peft warns about (and
    # tells the user to upgrade over) any key of adapter_config.json it does not know.
    metadata = {"format": "pt", TARGETS_METADATA: json.dumps(list(lora.targets))}
    files.save_safetensors(os.path.join(directory, PEFT_WEIGHTS), tensors, metadata)
    files.write_json(os.path.join(directory, PEFT_CONFIG), peft_config(config, adapters, lora, base_model))


def _strip_model_prefix(name: str) -> str:
    for prefix in ("model.language_model.", "model."):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def load_peft(directory: str, config: Gemma4Config) -> tuple[dict, LoraConfig]:
    import os

    from gemma4_jax import files

    config_path = os.path.join(directory, PEFT_CONFIG)
    if not os.path.isdir(directory):
        raise Gemma4Error(f"adapter directory not found: {directory}")
    if not os.path.exists(config_path):
        raise Gemma4Error(f"{directory}: missing {PEFT_CONFIG} (expected a LoRA adapter directory)")
    weights_path = os.path.join(directory, PEFT_WEIGHTS)
    if not os.path.exists(weights_path):
        pickled = " (adapter_model.bin is a pickle, which is never loaded: save with safe_serialization)"
        raise Gemma4Error(
            f"{directory}: missing {PEFT_WEIGHTS}"
            + (pickled if os.path.exists(os.path.join(directory, "adapter_model.bin")) else "")
        )
    st = files.SafetensorsDir(weights_path)
    try:
        ours = json.loads(st.metadata.get(TARGETS_METADATA, "null"))
        if ours is not None and not (isinstance(ours, list) and ours and all(isinstance(t, str) for t in ours)):
            raise ValueError(f"{ours!r} is not a list of target names")
    except ValueError as e:
        raise Gemma4Error(f"{weights_path}: metadata {TARGETS_METADATA}: {e}") from None
    try:
        d = json.loads(files.read_text(config_path))
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        if d.get("peft_type", "LORA") != "LORA":
            raise Gemma4Error(f"{config_path}: peft_type {d['peft_type']!r} is not LORA")
        if d.get("use_dora") or d.get("use_rslora") or d.get("bias", "none") != "none":
            raise Gemma4Error(f"{config_path}: DoRA, rsLoRA and LoRA biases are not supported")
        ours = ours or d.get(TARGETS_METADATA)  # where adapters written before 2026-12-05 keep them
        modules = d.get("target_modules")
        parameters = [_strip_model_prefix(p) for p in d.get("target_parameters") or []]
        if not ours and modules is None and not parameters:
            raise KeyError("target_modules")
        if ours:
            targets = ours
        elif isinstance(modules, str) or modules is None:
            targets = None  # a regex (or expert stacks only): adopt exactly the modules that are in the file
        else:
            targets = [*modules, *parameters]
        lora_args = dict(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0)))
    except (KeyError, ValueError, TypeError) as e:
        raise Gemma4Error(f"{config_path}: not a LoRA adapter config ({e})") from None
    tensors = {name: st.read(name) for name in st.names()}
    if targets is None:
        # exact module names (dotted names match whole module names), and the expert parameters as listed
        stems = {_strip_model_prefix(n.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")) for n in tensors}
        targets = sorted(s for s in stems if ".experts" not in s) + parameters
    lora = LoraConfig(targets=tuple(targets), **lora_args)
    return from_peft(config, tensors, lora, directory), lora
