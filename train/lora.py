"""LoRA adapters as weight objects of the model (gemma4_jax/model.py, "weights").

A `LoraWeight` wraps a frozen base weight (a dense array or a quantized weight object: QLoRA) and two small
f32 factors. Its contraction is `einsum(x, W) + scale * ((x A) B)`, so `W + AB` is never formed in the forward
pass; only `merge` builds it, once.

Every adapted weight has an official layout (spec §5.1) whose axes each play one role:
  "g"  a group axis: separate adapters per index (K and V in `kv_einsum` [2, K, D, H], gate and up in
       `gating_einsum` [2, F, D]), as Hugging Face has separate modules for them,
  "i"  an input axis (contracted with the activations),
  "o"  an output axis.
A has shape [g..., i..., r] and B [g..., r, o...] (each in the order of the weight's axes); the Hugging Face
LoRA factors of module `m` (`lora_A` [r, in], `lora_B` [out, r]) are A.reshape(-1, r).T and B.reshape(r, -1).T
of that module's group, because the official layouts flatten in the same order as HF's Linear weights.

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
DEFAULT_TARGETS = ATTENTION_MODULES + MLP_MODULES


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r, as PEFT does without rsLoRA), dropout on the adapter
    input, and target patterns.

    A pattern is either a module name (`q_proj`, `gate_proj`, `per_layer_projection`, ...) that matches it in
    every layer, or an fnmatch pattern over full module names such as `layers.1[0-9].self_attn.*`.
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
    g = [n for n, r in zip(shape, roles, strict=True) if r == "g"]
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
        by_role = {"g": "", "i": "", "o": ""}
        for letter, role in zip(weight_spec, self.roles, strict=True):
            by_role[role] += letter
        return by_role["g"], by_role["i"], by_role["o"]

    def einsum(self, eqn: str, x: jax.Array) -> jax.Array:
        y = model.einsum(eqn, x, self.base)
        inputs, out_spec = eqn.replace(" ", "").split("->")
        x_spec, w_spec = inputs.split(",")
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


def candidate_targets(config: Gemma4Config) -> list[Target]:
    """Every leaf LoRA can adapt (`lora=True` in the parameter spec, spec §6.1): attention and dense-MLP matrices and
    the per-layer PLE gate/projection. KV-shared readers' K/V projections are never used, so they are not
    candidates; embeddings, norms, scalars, the MoE router and experts stay frozen."""
    return [
        Target(leaf.path, leaf.roles, leaf.lora_modules, int(leaf.path[0].removeprefix("layer_")))
        for leaf in param_spec.param_spec(config)
        if leaf.lora and not leaf.unused
    ]


def _matches(pattern: str, module: str) -> bool:
    if "." not in pattern and not any(c in pattern for c in "*?["):
        return module.rsplit(".", 1)[-1] == pattern
    return fnmatch.fnmatchcase(module, pattern.removeprefix("model."))


def select_targets(config: Gemma4Config, lora: LoraConfig) -> list[Target]:
    """The leaves `lora.targets` select. K/V (and gate/up) share one official leaf, so they go together."""
    chosen, used = [], set()
    for target in candidate_targets(config):
        hits = []
        for module in target.modules:
            matching = [p for p in lora.targets if _matches(p, module)]
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
    known = {m.rsplit(".", 1)[-1] for t in candidate_targets(config) for m in t.modules}
    unused = [p for p in lora.targets if p not in used]
    if unused:
        raise Gemma4Error(
            f"LoRA target(s) {', '.join(unused)} match no module of {config.name}; modules: {', '.join(sorted(known))}"
        )
    return chosen


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
        groups = math.prod(n for n, r in zip(shape, target.roles, strict=True) if r == "g")
        n_in = math.prod(n for n, r in zip(shape, target.roles, strict=True) if r == "i")
        n_out = math.prod(n for n, r in zip(shape, target.roles, strict=True) if r == "o")
        total += groups * lora.rank * (n_in + n_out)
    return total


def summary(config: Gemma4Config, adapters: dict) -> str:
    by_module: dict[str, int] = {}
    for target in targets_of(config, adapters):
        for module in target.modules:
            name = module.rsplit(".", 1)[-1]
            by_module[name] = by_module.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in by_module.items())


# ----- Hugging Face PEFT layout --------------------------------------------------------------------------------

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def to_peft(config: Gemma4Config, adapters: dict, prefix: str = "model.") -> dict[str, np.ndarray]:
    """PEFT tensor names -> f32 arrays: `base_model.model.{prefix}layers.{i}.{module}.lora_A.weight` [r, in] and
    `.lora_B.weight` [out, r]. `prefix` is where the checkpoint keeps the text model (`model.` for
    Gemma4ForCausalLM, `model.language_model.` for the multimodal checkpoints)."""
    out = {}
    for target in targets_of(config, adapters):
        a, b = (np.asarray(x, np.float32) for x in tree_get(adapters, target.path).values())
        rank = a.shape[-1]
        grouped = "g" in target.roles
        for g, module in enumerate(target.modules):
            a_g, b_g = (a[g], b[g]) if grouped else (a, b)
            name = f"base_model.model.{prefix}{module}"
            out[name + ".lora_A.weight"] = np.ascontiguousarray(a_g.reshape(-1, rank).T)
            out[name + ".lora_B.weight"] = np.ascontiguousarray(b_g.reshape(rank, -1).T)
    return out


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
    for target in select_targets(config, lora):
        base_shape = _base_shape(config, target)
        a_shape, b_shape = _factor_shapes(base_shape, target.roles, lora.rank)
        grouped = "g" in target.roles
        a_parts, b_parts = [], []
        for module in target.modules:
            names = (module + ".lora_A.weight", module + ".lora_B.weight")
            if any(n not in by_module for n in names):
                raise Gemma4Error(f"{source}: no adapter for {module} (adapter_config.json targets it)")
            used.update(names)
            a_hf, b_hf = (np.asarray(by_module[n], np.float32) for n in names)
            a_part_shape = a_shape[1:] if grouped else a_shape  # [i..., r]
            b_part_shape = b_shape[1:] if grouped else b_shape  # [r, o...]
            want = ((lora.rank, math.prod(a_part_shape[:-1])), (math.prod(b_part_shape[1:]), lora.rank))
            if (a_hf.shape, b_hf.shape) != want:
                raise Gemma4Error(
                    f"{source}: {module} adapter has shapes {a_hf.shape}, {b_hf.shape}; rank {lora.rank} on "
                    f"{config.name} needs {want[0]}, {want[1]} (an adapter for another model or rank?)"
                )
            a_part = a_hf.T.reshape(a_part_shape)
            b_part = b_hf.T.reshape(b_part_shape)
            a_parts.append(a_part)
            b_parts.append(b_part)
        a = np.stack(a_parts) if grouped else a_parts[0]
        b = np.stack(b_parts) if grouped else b_parts[0]
        tree_set(tree, target.path, {"a": jnp.asarray(a), "b": jnp.asarray(b)})
    unused = sorted(set(by_module) - used)
    if unused:
        raise Gemma4Error(f"{source}: tensors that match no target of {config.name}: {', '.join(unused[:3])}")
    return tree


def peft_config(config: Gemma4Config, adapters: dict, lora: LoraConfig, base_model: str | None) -> dict:
    modules = [m for t in targets_of(config, adapters) for m in t.modules]
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    # Module names alone if they select exactly the adapted modules in HF's model, else an exact regex
    # (HF KV-shared readers have no k_proj/v_proj, so names alone already skip them).
    everywhere = [m for t in candidate_targets(config) for m in t.modules if m.rsplit(".", 1)[-1] in short]
    if sorted(everywhere) == sorted(modules):
        target_modules: list[str] | str = short
    else:
        target_modules = r".*\.(" + "|".join(m.replace(".", r"\.") for m in modules) + ")"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        # ours, ignored by peft: the patterns to rebuild the same LoraConfig
        "gemma4_jax_targets": list(lora.targets),
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
    files.save_safetensors(os.path.join(directory, PEFT_WEIGHTS), tensors, {"format": "pt"})
    files.write_json(os.path.join(directory, PEFT_CONFIG), peft_config(config, adapters, lora, base_model))


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
    try:
        d = json.loads(files.read_text(config_path))
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        if d.get("peft_type", "LORA") != "LORA":
            raise Gemma4Error(f"{config_path}: peft_type {d['peft_type']!r} is not LORA")
        if d.get("use_dora") or d.get("use_rslora") or d.get("bias", "none") != "none":
            raise Gemma4Error(f"{config_path}: DoRA, rsLoRA and LoRA biases are not supported")
        targets = d.get("gemma4_jax_targets") or d["target_modules"]
        if isinstance(targets, str):
            # a regex: adopt exactly the modules that are in the file
            targets = None
        lora_args = dict(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0)))
    except (KeyError, ValueError, TypeError) as e:
        raise Gemma4Error(f"{config_path}: not a LoRA adapter config ({e})") from None
    st = files.SafetensorsDir(weights_path)
    tensors = {name: st.read(name) for name in st.names()}
    if targets is None:
        # exact module names (fnmatch patterns with dots match whole module names)
        stems = {n.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for n in tensors}
        targets = sorted({s.removeprefix("model.language_model.").removeprefix("model.") for s in stems})
    lora = LoraConfig(targets=tuple(targets), **lora_args)
    return from_peft(config, tensors, lora, directory), lora
