"""The model on a device mesh: one rules table from the parameter spec's logical axes to the mesh's axes.

Every leaf of the parameter spec names its axes (embed, heads, kv_heads, mlp, experts, vocab, ...). `RULES` says,
once, which mesh axes may shard each logical axis; a mesh is four named axes

  data    pure data parallelism: the batch is split, weights are replicated;
  fsdp    the batch is split and so is every weight's `embed` axis (ZeRO-3 / FSDP: weights are all-gathered
          layer by layer inside the step, gradients reduce-scattered);
  tensor  Megatron-style tensor parallelism: heads, KV heads, MLP and expert-MLP features and the vocabulary;
  expert  the MoE's expert stacks (26B-A4B), and the batch elsewhere;

of which a preset (`fsdp`, `fsdp_tp`, `expert`) or `--mesh fsdp=4,tensor=2` sets the sizes. The same table gives
the PartitionSpec of a weight, of a LoRA factor (its axes are the base weight's, plus an unsharded rank), of the KV
cache and of a batch, and the per-device bytes that `memory --mesh` prints, from shapes alone.

A dimension a mesh axis does not divide is left whole on that axis (replicated) rather than padded: E2B's single
KV head, 26B-A4B's two global KV heads on `tensor=4`. `describe` lists those cases. The vision and audio towers
(< 0.6 B parameters) have axis names of their own that no rule maps: they are replicated.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma4_jax import param_spec
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH = "batch"  # the logical axis of examples (tokens, the KV cache, training batches)

# Logical axis -> the mesh axes that may shard it, outermost first. Axes not listed are never sharded (head_dim,
# the K/V and gate/up groups, the PLE layer axis, a LoRA rank, the cache's sequence).
RULES: dict[str, tuple[str, ...]] = {
    BATCH: ("data", "fsdp", "expert"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "experts": ("expert",),
}
PRESETS = ("fsdp", "fsdp_tp", "expert")


# ----- mesh shapes -------------------------------------------------------------------------------------------


def _check_sizes(sizes: Mapping[str, int], what: str) -> dict[str, int]:
    unknown = [a for a in sizes if a not in MESH_AXES]
    if unknown:
        raise Gemma4Error(f"{what}: unknown mesh axis {', '.join(unknown)}; the axes are {', '.join(MESH_AXES)}")
    bad = [f"{a}={n}" for a, n in sizes.items() if not isinstance(n, int) or n < 1]
    if bad:
        raise Gemma4Error(f"{what}: mesh axis sizes must be integers >= 1, got {', '.join(bad)}")
    return {a: int(sizes.get(a, 1)) for a in MESH_AXES}


def _largest_divisor(n: int, of: int, at_most: int | None = None) -> int:
    """The largest d <= at_most dividing both n and `of` (1 when `of` is 0)."""
    best = 1
    for d in range(1, n + 1):
        if n % d == 0 and of and of % d == 0 and (at_most is None or d <= at_most):
            best = d
    return best


def preset_shape(preset: str, config: Gemma4Config, devices: int) -> dict[str, int]:
    """Mesh sizes of a preset on `devices` devices:
    fsdp     every device on `fsdp`;
    fsdp_tp  `tensor` = the largest divisor of the device count (<= 8, one host's chips) that divides the query
             heads, the rest on `fsdp`;
    expert   `expert` = the largest divisor of the device count that divides the number of experts, the rest on
             `fsdp` (MoE models only)."""
    if preset == "fsdp":
        return _check_sizes({"fsdp": devices}, preset)
    if preset == "fsdp_tp":
        tensor = _largest_divisor(devices, config.num_heads, at_most=8)
        return _check_sizes({"fsdp": devices // tensor, "tensor": tensor}, preset)
    if preset == "expert":
        if not config.num_experts:
            raise Gemma4Error(f"mesh preset expert: {config.name} has no experts (use fsdp or fsdp_tp)")
        expert = _largest_divisor(devices, config.num_experts)
        return _check_sizes({"fsdp": devices // expert, "expert": expert}, preset)
    raise Gemma4Error(f"unknown mesh preset {preset!r}; choose one of: auto, {', '.join(PRESETS)}, or axis=size,...")


def parse_mesh(text: str, config: Gemma4Config, devices: int) -> dict[str, int]:
    """`--mesh`: "fsdp=4,tensor=2" (unnamed axes are 1), a preset name, or "auto" (fsdp_tp for dense models,
    expert for MoE models). The sizes must multiply to `devices`."""
    text = text.strip()
    if text == "auto":
        sizes = preset_shape("expert" if config.num_experts else "fsdp_tp", config, devices)
    elif "=" not in text:
        sizes = preset_shape(text, config, devices)
    else:
        sizes = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name in sizes:
                raise Gemma4Error(f"--mesh {text}: axis {name} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise Gemma4Error(f"--mesh {text}: {part.strip()!r} is not axis=size") from None
        sizes = _check_sizes(sizes, f"--mesh {text}")
    if math.prod(sizes.values()) != devices:
        shown = ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1 device"
        raise Gemma4Error(
            f"--mesh {text}: {shown} is {math.prod(sizes.values())} devices, but there are {devices} "
            f"({jax.default_backend()}; XLA_FLAGS=--xla_force_host_platform_device_count=N makes N CPU devices)"
        )
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: Iterable | None = None) -> Mesh:
    """A mesh with the four axes (size 1 where not given) over `devices` (default: all devices of all processes)."""
    full = _check_sizes(sizes, "mesh")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(full.values()) != len(devices):
        raise Gemma4Error(f"mesh {format_sizes(full)} needs {math.prod(full.values())} devices, got {len(devices)}")
    # mesh_utils orders devices so that the innermost axes (tensor, expert) sit on the closest chips.
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(full[a] for a in MESH_AXES), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(tuple(full[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    return _check_sizes(dict(mesh.shape) if isinstance(mesh, Mesh) else mesh, "mesh")


def format_sizes(mesh: Mesh | Mapping[str, int]) -> str:
    sizes = mesh_sizes(mesh)
    return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "single device"


# ----- partition specs ---------------------------------------------------------------------------------------


def spec_of(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh | Mapping[str, int]) -> PartitionSpec:
    """The PartitionSpec of an array whose axes have these logical names: each axis takes the mesh axes its rule
    lists (size > 1, not taken by an earlier axis) while their product still divides it."""
    sizes = mesh_sizes(mesh)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape, strict=True):
        chosen, product = [], 1
        for axis in RULES.get(name, ()):
            if sizes[axis] > 1 and axis not in used and dim % (product * sizes[axis]) == 0:
                chosen.append(axis)
                product *= sizes[axis]
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard."""
    sizes = mesh_sizes(mesh)
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        out.append(dim // math.prod(sizes[a] for a in names))
    return tuple(out)


def leaf_spec(leaf: param_spec.Leaf, mesh: Mesh | Mapping[str, int]) -> PartitionSpec:
    return spec_of(leaf.axes, leaf.shape, mesh)


def param_specs(config: Gemma4Config, mesh: Mesh | Mapping[str, int]) -> dict:
    """The PartitionSpec of every leaf, as a tree shaped like the parameters."""
    return param_spec.tree_of(config, lambda leaf: leaf_spec(leaf, mesh))


def param_shardings(config: Gemma4Config, mesh: Mesh) -> dict:
    return param_spec.tree_of(config, lambda leaf: NamedSharding(mesh, leaf_spec(leaf, mesh)))


def check_mesh_fits(config: Gemma4Config, mesh: Mesh | Mapping[str, int]) -> None:
    """Refuses a mesh axis (size > 1) that shards no weight of `config`: its devices would hold copies that differ
    only in the batch they are given, which `data` says explicitly."""
    sizes = mesh_sizes(mesh)
    leaves = param_spec.param_spec(config)
    for axis in ("fsdp", "tensor", "expert"):
        if sizes[axis] == 1:
            continue
        asked = {}
        for leaf in leaves:
            for name, dim in zip(leaf.axes, leaf.shape, strict=True):
                if axis in RULES.get(name, ()):
                    asked.setdefault(name, set()).add(dim)
        if not asked:
            names = ", ".join(name for name, axes in RULES.items() if axis in axes and name != BATCH)
            raise Gemma4Error(f"mesh axis {axis}={sizes[axis]}: {config.name} has no {names} axis for it to shard")
        if not any(axis in str(leaf_spec(leaf, sizes)) for leaf in leaves):
            dims = "; ".join(f"{name} {sorted(d)}" for name, d in sorted(asked.items()))
            raise Gemma4Error(
                f"mesh axis {axis}={sizes[axis]} divides no dimension it shards in {config.name} ({dims}): "
                f"choose a size that divides one of them"
            )


def replicated_where_undivided(config: Gemma4Config, mesh: Mesh | Mapping[str, int]) -> list[str]:
    """Logical axes a rule would shard but the mesh does not divide (left whole on that mesh axis), with sizes."""
    sizes = mesh_sizes(mesh)
    found: dict[tuple[str, str], set[int]] = {}
    for leaf in param_spec.param_spec(config):
        spec = leaf_spec(leaf, sizes)
        for name, dim, entry in zip(leaf.axes, leaf.shape, spec, strict=True):
            for axis in RULES.get(name, ()):
                if sizes[axis] > 1 and entry is None:
                    found.setdefault((name, f"{axis}={sizes[axis]}"), set()).add(dim)
    for name, dim in _cache_axes(config):
        if sizes["tensor"] > 1 and dim % sizes["tensor"]:
            found.setdefault((f"cache {name}", f"tensor={sizes['tensor']}"), set()).add(dim)
    return [f"{name} {sorted(dims)} on {axis}" for (name, axis), dims in sorted(found.items())]


# ----- the KV cache, batches, LoRA factors -----------------------------------------------------------------------


def _cache_axes(config: Gemma4Config) -> list[tuple[str, int]]:
    return [("kv_heads", config.layer_kv_heads(i)) for i in range(config.num_layers) if not config.is_kv_reader(i)]


def cache_specs(cache, mesh: Mesh | Mapping[str, int]):
    """K/V [B, S, K, H] on (batch, -, kv_heads, -); positions [B, S] on batch."""

    def spec(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else None
        axes = (BATCH, "seq", "kv_heads", "head_dim") if name in ("k", "v") else (BATCH, "seq")
        return spec_of(axes, tuple(x.shape), mesh)

    return jax.tree_util.tree_map_with_path(spec, cache)


def batch_spec(shape: tuple[int, ...], mesh: Mesh | Mapping[str, int]) -> PartitionSpec:
    """An array whose first axis is the batch (tokens [B, T], logits [B, T, V], ...)."""
    return spec_of((BATCH, *(f"_{k}" for k in range(1, len(shape)))), tuple(shape), mesh)


def adapter_specs(config: Gemma4Config, adapters: dict, mesh: Mesh | Mapping[str, int]) -> dict:
    """LoRA factors A [g..., i..., r] and B [g..., r, o...] on the rules of their base weight's axes."""
    from gemma4_jax.model import tree_get, tree_set

    out: dict = {}
    for leaf in param_spec.param_spec(config):
        try:
            factors = tree_get(adapters, leaf.path)
        except (KeyError, TypeError):
            continue
        by_role = {role: [a for a, r in zip(leaf.axes, leaf.roles, strict=True) if r == role] for role in "egio"}
        lead = by_role["e"] + by_role["g"]
        a_axes = (*lead, *by_role["i"], "rank")
        b_axes = (*lead, "rank", *by_role["o"])
        specs = {}
        for name, axes in (("a", a_axes), ("b", b_axes)):
            shape = tuple(factors[name].shape)
            if len(axes) != len(shape):  # a factor layout this table does not know: keep it whole
                axes = tuple(f"_{k}" for k in range(len(shape)))
            specs[name] = spec_of(axes, shape, mesh)
        tree_set(out, leaf.path, specs)
    return out


def shardings(mesh: Mesh, specs):
    """A tree of PartitionSpecs as NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def place(tree, mesh: Mesh, specs):
    """`tree` (host or device arrays, identical on every process) laid out on `mesh` as `specs` say; each process
    transfers only the shards of its own devices. On CPU a shard may alias its host array (zero-copy): do not
    modify a placed host array afterwards."""

    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else None
        if host is None:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def to_host(tree):
    """Every array of `tree` as numpy on this host; arrays split across processes are gathered from them (every
    process must call this)."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


# ----- what a device holds -----------------------------------------------------------------------------------


def live_bytes_per_device(tree) -> dict:
    """Bytes of the arrays' shards on each device (from their shardings: what is resident, not a plan)."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@dataclasses.dataclass(frozen=True)
class DeviceShare:
    """Per-device bytes of a model's parts on a mesh (the largest shard where devices differ)."""

    mesh: dict[str, int]
    weights: int
    kv_cache: int
    optimizer: int  # LoRA adapters + Adam moments (f32), per device
    replicated: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.optimizer


def device_share(
    config: Gemma4Config,
    mesh: Mapping[str, int],
    bytes_per_weight: float,
    context: int,
    batch: int = 1,
    ple_on_device: bool = True,
    tower_bytes_per_weight: int = 4,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | None = None,
) -> DeviceShare:
    """What one device holds of `config` on a mesh of these sizes: every leaf's shard at `bytes_per_weight`
    (towers at `tower_bytes_per_weight`), the KV cache's shard (bf16), and with `lora_rank` the adapters of the
    default targets with two f32 Adam moments (12 bytes per adapter weight)."""
    from gemma4_jax import model, ple

    sizes = mesh_sizes(mesh)
    weights = 0.0
    for leaf in param_spec.param_spec(config):
        if leaf.unused or (leaf.path == ple.TABLE_PATH and not ple_on_device):
            continue
        rate = tower_bytes_per_weight if leaf.part != "text" else bytes_per_weight
        if leaf.quant == param_spec.SCALE and leaf.part == "text":
            rate = max(rate, 2)  # norms and scalars stay in float
        weights += math.prod(shard_shape(leaf.shape, leaf_spec(leaf, sizes), sizes)) * rate
    cache = jax.eval_shape(lambda: model.init_cache(config, batch, context))
    specs = cache_specs(cache, sizes)
    kv = sum(
        math.prod(shard_shape(x.shape, s, sizes)) * x.dtype.itemsize
        for (path, x), s in zip(
            jax.tree_util.tree_leaves_with_path(cache), jax.tree_util.tree_leaves(specs), strict=True
        )
        if path[0].key != "positions"
    )
    optimizer = 0
    if lora_rank:
        from gemma4_jax.train import lora as lora_lib

        lconf = lora_lib.LoraConfig(rank=lora_rank, **({"targets": lora_targets} if lora_targets else {}))
        shapes = lora_lib.adapter_shapes(config, lconf)
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=_is_shape)
        specs = adapter_specs(config, abstract, sizes)
        optimizer = 12 * sum(
            math.prod(shard_shape(x.shape, s, sizes))
            for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(specs), strict=True)
        )
    return DeviceShare(sizes, int(weights), int(kv), int(optimizer), tuple(replicated_where_undivided(config, sizes)))


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


# ----- several hosts -------------------------------------------------------------------------------------------


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins a multi-process run: from the arguments, else $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
    $JAX_PROCESS_ID, else the cluster JAX detects itself (TPU pods, SLURM, ...). Returns False when this is a
    single-process run (nothing given, no cluster found). On CPU the processes talk through gloo."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise Gemma4Error(
            "a multi-process run needs the coordinator address, the number of processes and this process's id "
            "(--coordinator/--num-processes/--process-id or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)"
        )
    if not 0 <= process_id < num_processes:
        raise Gemma4Error(f"process id {process_id} is outside [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


# ----- activations -------------------------------------------------------------------------------------------


def constrain(x, axes: tuple[str, ...]):
    """`x` laid out as its logical `axes` say on the mesh of the surrounding `jax.set_mesh` (none: unchanged).

    The model pins its residual stream to (batch, -, -): without it the partitioner may keep activations split
    on `embed` like the FSDP weights and sum partial dot products across devices, which is slower (a collective
    per matmul) and sums in another order than one device does."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_of(axes, tuple(x.shape), dict(mesh.shape))))
