"""Sharded runs for tests/test_mesh.py, in a process of their own: the device count is fixed when JAX starts.

    python tests/mesh_worker.py reference MODEL DIR       # one device's numbers, once per model
    python tests/mesh_worker.py presets MODEL OUT.json "fsdp;fsdp_tp" DIR  # 8 forced host devices vs DIR's
    python tests/mesh_worker.py restore CKPT OUT.json     # a training checkpoint onto other meshes
    python tests/mesh_worker.py files DIR OUT.json        # orbax and HF checkpoints onto a mesh; image + speech
    python tests/mesh_worker.py process DIR               # one of several jax.distributed processes

Each writes numbers (JSON, .npy); the test decides what they must be.
"""

from __future__ import annotations

import json
import os
import sys

# `reference` too: its one-device programs are compiled in the same setting as the sharded ones they are compared to.
if __name__ == "__main__" and sys.argv[1] in ("reference", "presets", "restore", "files"):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np

from gemma4_jax import api, param_spec, sharding
from gemma4_jax.model import tree_get
from gemma4_jax.train import loop
from gemma4_jax.train import lora as lora_lib

LORA = lora_lib.LoraConfig(rank=4)


def lora_for(config) -> lora_lib.LoraConfig:
    """Attention + MLP, and on an MoE model every expert stack too (its adapters shard on `expert`)."""
    return lora_lib.LoraConfig(
        rank=4, targets=LORA.targets + (lora_lib.EXPERT_PARAMETERS if config.num_experts else ())
    )


# The float64 runs show that a sharded program computes the same function as one device's (<= 1e-12). They compile
# without XLA:CPU's backend optimizations (measured on tiny fsdp_tp: gradients 46 -> 33 s, forward 12.5 -> 9.2 s),
# which moves float64 results by round-off only; the float32 runs, whose numbers users get, compile as users' do.
FLOAT64_COMPILE = {"xla_backend_optimization_level": 0}

TRAIN = loop.TrainConfig(batch=8, accumulation=2, seq_len=16, steps=3, lr=1e-2, warmup_steps=0, save_every=3)
TOKENS = np.random.default_rng(0).integers(2, 500, (8, 12)).astype(np.int32)
PROMPTS = [[2, *np.random.default_rng(row).integers(3, 500, 4 + 2 * row).tolist()] for row in range(4)]


def train_batch(rows: int = TRAIN.batch) -> dict:
    tokens = np.random.default_rng(1).integers(2, 500, (TRAIN.accumulation, rows, TRAIN.seq_len)).astype(np.int32)
    positions = np.broadcast_to(np.arange(TRAIN.seq_len, dtype=np.int32), tokens.shape).copy()
    ones = np.ones(tokens.shape, np.int32)
    return {"inputs": tokens, "targets": np.roll(tokens, -1, -1), "positions": positions, "segments": ones,
            "weights": ones.astype(np.float32)}  # fmt: skip


def nonzero_adapters(config, dtype=np.float32) -> dict:
    """Adapters with B != 0 (fresh ones have B = 0, which would hide the adapter path)."""
    adapters = lora_lib.init_adapters(config, lora_for(config), seed=0)
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda x: (np.asarray(x) + rng.normal(0, 0.02, x.shape)).astype(dtype), adapters)


def forward(model: api.Model, tokens=TOKENS, compiler_options=None) -> np.ndarray:
    with api._mesh_context(model.mesh):
        params = model.params
        placed = (
            tokens
            if model.mesh is None
            else sharding.place(tokens, model.mesh, sharding.batch_spec(tokens.shape, model.mesh))
        )
        if compiler_options is None:  # jit's cache: `reference` calls this once per row
            out, _ = api._jitted_apply()(params, placed, config=model.config)
        else:
            lowered = api._jitted_apply().lower(params, placed, config=model.config)
            out, _ = lowered.compile(compiler_options)(params, placed)
    return np.asarray(sharding.to_host(out))


def grads(model: api.Model, adapters: dict, compiler_options=None) -> tuple[float, dict]:
    fn = jax.jit(loop.accumulated_grads(model.config, lora_for(model.config), TRAIN))
    batch = train_batch()
    if model.mesh is not None:
        adapters = sharding.place(adapters, model.mesh, sharding.adapter_specs(model.config, adapters, model.mesh))
        batch = loop.shard_batch(batch, model.mesh)
    with api._mesh_context(model.mesh):
        g, loss, _ = fn.lower(adapters, model.params, batch, 0).compile(compiler_options)(
            adapters, model.params, batch, 0
        )
    return float(loss), sharding.to_host(g)


def max_abs(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip


def max_of(tree) -> float:
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def expected_shards(leaf, sizes) -> int:
    """How many ways the rules split a leaf, worked out here from the rules table alone: per axis, the mesh
    axes of its rule (size > 1, unused so far) while they divide."""
    used, total = set(), 1
    for name, dim in zip(leaf.axes, leaf.shape, strict=True):
        product = 1
        for axis in sharding.RULES.get(name, ()):
            if sizes[axis] > 1 and axis not in used and dim % (product * sizes[axis]) == 0:
                product *= sizes[axis]
                used.add(axis)
        total *= product
    return total


def float64_model(name: str, mesh=None) -> api.Model:
    """The random weights `api.load` draws, in float64 (placed onto `mesh` by `api.from_params`)."""
    from gemma4_jax.config import get_config
    from gemma4_jax.model import init_params

    config = get_config(name)
    return api.from_params(config, init_params(config, 0, np.float64), mesh=mesh)


def reference(model_name: str, directory: str) -> None:
    """One device's numbers for `presets` (and `test_two_processes...`), computed once per model and test module:
    float64 logits, loss and gradients; float32 logits of the whole batch and row by row, loss, gradients and
    greedy tokens. Written to `directory/MODEL reference.npz` (+ `.json`)."""
    out = {}
    with jax.enable_x64(True):
        one64 = float64_model(model_name)
        out["logits64"] = forward(one64, compiler_options=FLOAT64_COMPILE)
        loss64, grads64 = grads(one64, nonzero_adapters(one64.config, np.float64), FLOAT64_COMPILE)
        out |= {f"grads64/{k}": v for k, v in _flat(grads64).items()}
    one = api.load(variant=model_name, dtype="float32", progress=False, layout="checkpoint")
    out["logits"] = forward(one)
    out["rows"] = np.concatenate([forward(one, TOKENS[r : r + 1]) for r in range(len(TOKENS))])
    loss, g = grads(one, nonzero_adapters(one.config))
    out |= {f"grads/{k}": v for k, v in _flat(g).items()}
    # Greedy decoding in float32: the top-2 logit gaps along these continuations are >= 6e-3, far above f32
    # summation-order noise (~1e-5), so the sharded continuations must be the same tokens.
    tokens = one.sampler().generate(PROMPTS, 12).tokens
    np.savez(os.path.join(directory, f"{model_name} reference.npz"), **out)
    with open(os.path.join(directory, f"{model_name} reference.json"), "w") as f:
        json.dump({"loss": loss, "loss64": loss64, "greedy": tokens}, f)


def load_reference(model_name: str, directory: str) -> tuple[dict, dict]:
    """`reference`'s arrays (gradients as flat {path: array} dicts under "grads" and "grads64") and numbers."""
    with np.load(os.path.join(directory, f"{model_name} reference.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    for kind in ("grads", "grads64"):
        prefix = kind + "/"
        arrays[kind] = {k[len(prefix) :]: arrays.pop(k) for k in list(arrays) if k.startswith(prefix)}
    with open(os.path.join(directory, f"{model_name} reference.json")) as f:
        return arrays, json.load(f)


def max_abs_flat(a: dict, b: dict) -> float:
    """max |a - b| over two flat {path: array} dicts with the same paths."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max_abs([a[k] for k in sorted(a)], [b[k] for k in sorted(a)])


def presets(model_name: str, out_path: str, meshes: str, reference_dir: str) -> None:
    """`model_name` on each of `meshes` (separated by ";") against one device (`reference`, read from
    `reference_dir`)."""
    ref, numbers = load_reference(model_name, reference_dir)
    results = {}
    for mesh in meshes.split(";"):
        m = api.load(variant=model_name, dtype="float32", progress=False, mesh=mesh)
        sizes = dict(m.mesh.shape)
        logits = forward(m)
        loss, g = grads(m, nonzero_adapters(m.config))
        greedy = m.sampler().generate(PROMPTS, 12).tokens
        live = sharding.live_bytes_per_device(m.params)
        want, split_ok = 0, True
        for leaf in param_spec.param_spec(m.config):
            array = tree_get(m.params, leaf.path)
            shards = expected_shards(leaf, sizes)
            want += array.nbytes // shards
            split_ok &= all(s.data.nbytes * shards == array.nbytes for s in array.addressable_shards)
        with jax.enable_x64(True):
            m64 = float64_model(model_name, mesh)
            logits64 = forward(m64, compiler_options=FLOAT64_COMPILE)
            loss_64, g64 = grads(m64, nonzero_adapters(m64.config, np.float64), FLOAT64_COMPILE)
        results[mesh] = {
            "mesh": sharding.format_sizes(m.mesh),
            "logits": max_abs(logits, ref["logits"]),
            "logits_scale": max_of(ref["logits"]),
            "logits_vs_same_rows": max_abs(logits, ref["rows"]),
            "logits64_rel": max_abs(logits64, ref["logits64"]) / max_of(ref["logits64"]),
            "greedy_equal": greedy == numbers["greedy"],
            "greedy": greedy,
            "greedy_one_device": numbers["greedy"],
            "loss": abs(loss - numbers["loss"]),
            "grads": max_abs_flat(_flat(g), ref["grads"]),
            "grads_scale": max_of(ref["grads"]),
            "loss64_rel": abs(loss_64 - numbers["loss64"]) / abs(numbers["loss64"]),
            "grads64_rel": max_abs_flat(_flat(g64), ref["grads64"]) / max_of(ref["grads64"]),
            "live_per_device": sorted(set(live.values())),
            "expected_per_device": want,
            "devices": len(live),
            "every_leaf_split_as_ruled": bool(split_ok),
            "replicated": sharding.replicated_where_undivided(m.config, m.mesh),
        }
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


def trained_checkpoint(directory: str, mesh) -> loop.TrainResult:
    """Three sharded training steps of tiny on `mesh`, checkpointed (orbax, shard by shard) in `directory`."""
    from gemma4_jax.train import data

    model = api.load(variant="tiny", dtype="float32", progress=False, mesh=mesh)
    rows = np.random.default_rng(3).integers(2, 500, (32, TRAIN.seq_len + 1)).astype(np.int32)
    examples = [data.Example(r, np.ones(len(r), np.float32)) for r in rows]
    train_rows = data.pack(examples, TRAIN.seq_len)
    return loop.train(
        model.config, model.params, train_rows, None, LORA, TRAIN, directory, log=lambda _: None, mesh=model.mesh
    )


def restore(checkpoint: str, out_path: str) -> None:
    """The checkpoint of `process`/`trained_checkpoint` restored onto three meshes: logits with the adapters."""
    out = {}
    for mesh in ("fsdp=8", "fsdp=2,tensor=4", None):
        model = api.load(variant="tiny", dtype="float32", progress=False, layout="checkpoint", mesh=mesh)
        adapters = loop.latest_adapters(checkpoint, model.config, LORA, TRAIN, model.mesh)
        specs = [str(getattr(x.sharding, "spec", "one device")) for x in jax.tree.leaves(adapters)]
        adapted = api.Model(model.config, lora_lib.attach(model.params, adapters, model.config, LORA), mesh=model.mesh)
        name = mesh or "one device"
        np.save(os.path.join(os.path.dirname(out_path), f"logits {name}.npy"), forward(adapted))
        np.savez(os.path.join(os.path.dirname(out_path), f"adapters {name}.npz"), **_flat(sharding.to_host(adapters)))
        out[name] = {"specs": sorted(set(specs))}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


def process(directory: str) -> None:
    """One of two jax.distributed processes (4 CPU devices each, one mesh of 8): a sharded forward, a sharded
    gradient, three training steps with a sharded checkpoint, and its restore, written for the test."""
    assert sharding.initialize_distributed()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    me = jax.process_index()
    model = api.load(variant="tiny", dtype="float32", progress=False, mesh="fsdp")
    logits = forward(model)
    loss, g = grads(model, nonzero_adapters(model.config))
    trained = trained_checkpoint(os.path.join(directory, "train"), model.mesh)
    adapters = loop.latest_adapters(os.path.join(directory, "train"), model.config, LORA, TRAIN, model.mesh)
    restored = sharding.to_host(adapters)
    restore_error = max_abs(restored, sharding.to_host(trained.adapters))
    local = sorted({s.device.id for x in jax.tree.leaves(model.params) for s in x.addressable_shards})
    np.save(os.path.join(directory, f"logits {me}.npy"), logits)
    np.savez(os.path.join(directory, f"grads {me}.npz"), **_flat(g))
    np.savez(os.path.join(directory, f"restored {me}.npz"), **_flat(restored))
    every = sorted(d.id for d in jax.devices())
    with open(os.path.join(directory, f"process {me}.json"), "w") as f:
        json.dump({"loss": loss, "processes": jax.process_count(), "devices": jax.device_count(),
                   "local_devices": local, "all_devices": every, "mesh": sharding.format_sizes(model.mesh),
                   "restore_error": restore_error, "train_losses": trained.losses}, f)  # fmt: skip


def single(directory: str) -> None:
    """The one-device reference of `process`'s training (same data, same steps); its forward and gradients are
    `reference`'s."""
    from gemma4_jax.config import get_config

    trained = trained_checkpoint(os.path.join(directory, "train single"), None)
    adapters = loop.latest_adapters(os.path.join(directory, "train single"), get_config("tiny"), LORA, TRAIN)
    np.savez(os.path.join(directory, "restored single.npz"), **_flat(sharding.to_host(adapters)))
    with open(os.path.join(directory, "single.json"), "w") as f:
        json.dump({"train_losses": trained.losses}, f)


def files(directory: str, out_path: str) -> None:
    """tiny_mm (decoder and both towers) written as an orbax and an HF checkpoint in `directory`, each loaded onto
    fsdp=4,tensor=2 and onto one device: per leaf, whether the two are equal bit for bit and the sharded one lies as
    the rules say; per orbax read, the elements it read, its device's shard's and the whole tensor's. Then a prompt
    with a photograph and speech (tests/real_media.py) through both orbax loads: logits and greedy tokens."""
    from real_media import speak
    from skimage import data

    from gemma4_jax import cli, orbax_format
    from gemma4_jax.config import get_config

    config = get_config("tiny_mm")
    tree = api.load(config=config, dtype="float32", progress=False, layout="checkpoint").params
    orbax_dir, hf_dir = os.path.join(directory, "orbax"), os.path.join(directory, "hf")
    orbax_format.save_orbax(orbax_dir, sharding.to_host(tree), config=config)
    assert cli.main(["convert", "--checkpoint", orbax_dir, "--to", "hf", "-o", hf_dir]) == 0

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    reads = []  # (leaf, elements read, elements of a shard, elements of the tensor) of every orbax read
    read_slice = orbax_format.OrbaxSource.read_slice

    def recorded(self, leaf, dtype, index):
        value = read_slice(self, leaf, dtype, index)
        shard = jax.sharding.NamedSharding(mesh, sharding.leaf_spec(leaf, mesh)).shard_shape(leaf.shape)
        reads.append(("/".join(leaf.path), value.size, int(np.prod(shard)), int(np.prod(leaf.shape))))
        return value

    orbax_format.OrbaxSource.read_slice = recorded
    out = {}
    for name, path in (("orbax", orbax_dir), ("hf", hf_dir)):
        one = api.load(path, dtype="float32", progress=False, layout="checkpoint").params
        reads.clear()
        sharded = api.load(path, dtype="float32", progress=False, mesh=mesh).params
        leaves = {}
        for leaf in param_spec.param_spec(config):
            x, spec = tree_get(sharded, leaf.path), sharding.leaf_spec(leaf, mesh)
            leaves["/".join(leaf.path)] = {
                "equal": bool(np.array_equal(np.asarray(x), np.asarray(tree_get(one, leaf.path)))),
                "as_ruled": x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), len(leaf.shape)),
                "split": any(axis is not None for axis in spec),
            }
        out[name] = {"leaves": leaves, "reads": list(reads)}
        if name == "orbax":
            models = [api.Model(config, params, mesh=m) for params, m in ((one, None), (sharded, mesh))]
            ids = [2, 5, config.image_token_id, 6, config.audio_token_id, 7]
            media = {"images": [data.astronaut()], "audio": speak(directory, ["the image shows a person"])}
            expanded, soft = models[0].prepare(ids, **media, image_tokens=70)
            logits = [m.logits(expanded, soft) for m in models]
            greedy = [m.generate(ids, **media, image_tokens=70, max_new_tokens=8).tokens for m in models]
            out["multimodal"] = {
                "logits": float(np.abs(logits[1] - logits[0]).max()),
                "logits_scale": float(np.abs(logits[0]).max()),
                "greedy": greedy,
                "soft_tokens": int(np.sum(np.asarray(expanded) == config.image_token_id)),
            }
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


def _flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    commands = {
        "reference": reference, "presets": presets, "restore": restore, "files": files, "process": process,
        "single": single,
    }  # fmt: skip
    commands[command](*args)
