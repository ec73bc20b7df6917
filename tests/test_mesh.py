"""The model, its cache, the sampler and LoRA training on a device mesh (gemma4_jax.sharding).

Sharded runs happen in subprocesses (tests/mesh_worker.py): JAX fixes the number of host devices when it starts.
Tolerances, measured on this project's CI machine (2 cores, XLA:CPU):
- float64: logits, loss and adapter gradients equal one device's to <= 1e-12 relative (measured <= 2e-14): the
  sharded programs compute the same function (both sides compiled as mesh_worker.FLOAT64_COMPILE says).
- float32: the same quantities differ by summation order only (a contraction split across devices, gradients
  summed shard by shard): logits <= 1e-5 x max|logit| (measured 2.1e-5 at max 4.2, i.e. 5e-6), loss <= 2e-6 (4
  ulps at 6.7; measured 9.5e-7), gradients <= 2e-5 x max|g| (measured 1.1e-5). One device alone differs by 1.5e-5
  between computing 8 rows at once and one at a time. Data/FSDP on dense models all-gather the weights and are
  bit-identical to one device computing the same rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gemma4_jax import memory, param_spec, sharding
from gemma4_jax.config import get_config
from gemma4_jax.errors import Gemma4Error

WORKER = os.path.join(os.path.dirname(__file__), "mesh_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None, timeout=900):
    done = subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(model) -> the directory holding one device's numbers for `model` (mesh_worker.reference),
    computed once per module: each mesh test and the two-process test compare against the same run."""
    directory, done = tmp_path_factory.mktemp("one device"), set()

    def get(model: str) -> str:
        if model not in done:
            _run("reference", model, str(directory))
            done.add(model)
        return str(directory)

    return get


def _presets(tmp_path, reference, model: str, meshes: str) -> dict:
    out = tmp_path / f"{model}.json"
    _run("presets", model, str(out), meshes, reference(model))
    return json.loads(out.read_text())


def _check_preset(name: str, r: dict, dense: bool) -> None:
    where = f"{name} on {r['mesh']}"
    assert r["logits64_rel"] <= 1e-12, where
    assert r["loss64_rel"] <= 1e-12 and r["grads64_rel"] <= 1e-12, where
    assert r["logits"] <= 1e-5 * r["logits_scale"], where
    assert r["loss"] <= 2e-6, where
    assert r["grads"] <= 2e-5 * r["grads_scale"], where
    assert r["greedy_equal"], (where, r["greedy"], r["greedy_one_device"])
    if dense and "tensor" not in r["mesh"]:
        assert r["logits_vs_same_rows"] == 0.0, where
    assert r["devices"] == 8 and r["live_per_device"] == [r["expected_per_device"]], where
    assert r["every_leaf_split_as_ruled"], where


@pytest.mark.slow
def test_fsdp_tp_matches_one_device(tmp_path, reference):
    _check_preset("tiny", _presets(tmp_path, reference, "tiny", "fsdp_tp")["fsdp_tp"], dense=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, meshes",
    [("tiny", "fsdp;data=2,fsdp=2,tensor=2"), ("tiny_keqv", "fsdp;fsdp_tp"), ("tiny_moe", "fsdp;fsdp_tp;expert")],
)
def test_presets_match_one_device(tmp_path, reference, model, meshes):
    results = _presets(tmp_path, reference, model, meshes)
    assert list(results) == meshes.split(";")
    for r in results.values():
        _check_preset(model, r, dense="moe" not in model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_and_restore_on_other_meshes(tmp_path, reference):
    """Two jax.distributed processes on localhost (4 CPU devices each, gloo) = one process; their sharded
    checkpoint (saved on fsdp=8) restores exactly on fsdp=8, on fsdp=2 x tensor=4 and on one device."""
    import mesh_worker

    one_device, numbers = mesh_worker.load_reference("tiny", reference("tiny"))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, "process", str(tmp_path)],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    _run("single", str(tmp_path))
    for p in procs:
        log = p.communicate(timeout=900)[0]
        assert p.returncode == 0, log[-4000:]

    info = [json.loads((tmp_path / f"process {r}.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "single.json").read_text())
    assert [i["processes"] for i in info] == [2, 2] and info[0]["devices"] == 8 and info[0]["mesh"] == "fsdp=8"
    assert sorted(info[0]["local_devices"] + info[1]["local_devices"]) == info[0]["all_devices"]  # each its own 4
    logits = [np.load(tmp_path / f"logits {r}.npy") for r in (0, 1)]
    ref = one_device["logits"]
    assert np.array_equal(logits[0], logits[1])
    assert np.abs(logits[0] - ref).max() <= 1e-5 * np.abs(ref).max()
    assert abs(info[0]["loss"] - numbers["loss"]) <= 2e-6
    with np.load(tmp_path / "grads 0.npz") as grads:  # same paths as the reference's, or max_abs_flat fails
        error = mesh_worker.max_abs_flat(dict(grads), one_device["grads"])
    assert error <= 2e-5 * mesh_worker.max_of(one_device["grads"])
    # Three Adam steps: the same losses as one process to f32 summation order.
    for step, loss in single["train_losses"].items():
        assert abs(info[0]["train_losses"][step] - loss) <= 1e-5 * abs(loss)
    assert info[0]["restore_error"] == 0.0 and info[1]["restore_error"] == 0.0

    _run("restore", str(tmp_path / "train"), str(tmp_path / "restore.json"))
    restored = json.loads((tmp_path / "restore.json").read_text())
    saved = np.load(tmp_path / "restored 0.npz")
    assert (
        "P(None, 'fsdp')" in restored["fsdp=8"]["specs"] and "P('tensor', None)" in restored["fsdp=2,tensor=4"]["specs"]
    )
    one = np.load(tmp_path / "logits one device.npy")
    for name in ("fsdp=8", "fsdp=2,tensor=4", "one device"):
        adapters = np.load(tmp_path / f"adapters {name}.npz")
        assert all(np.array_equal(adapters[k], saved[k]) for k in saved), name  # bit for bit, whatever the mesh
        assert np.abs(np.load(tmp_path / f"logits {name}.npy") - one).max() <= 1e-5 * np.abs(one).max(), name


def test_checkpoints_load_straight_onto_their_shards_and_see_and_hear(tmp_path):
    """orbax and HF checkpoints of tiny_mm loaded onto fsdp=4,tensor=2 equal one device's load bit for bit, each leaf
    split as the rules say (the towers, 0-d clip bounds included, replicated); from orbax each read is one device's
    shard, so a split tensor is never read whole (TensorStore reads the slice). A photograph and espeak-ng speech in
    one prompt give one device's greedy tokens and logits to float32 summation order (module docstring)."""
    _run("files", str(tmp_path), str(tmp_path / "files.json"), timeout=600)
    out = json.loads((tmp_path / "files.json").read_text())
    for name in ("orbax", "hf"):
        leaves = out[name]["leaves"]
        assert all(v["equal"] for v in leaves.values()), [k for k, v in leaves.items() if not v["equal"]]
        assert all(v["as_ruled"] for v in leaves.values()), [k for k, v in leaves.items() if not v["as_ruled"]]
    leaves, reads = out["orbax"]["leaves"], out["orbax"]["reads"]
    split = {k for k, v in leaves.items() if v["split"]}
    assert len(split) > 100 and any(k.startswith("audio_encoder") for k in leaves)
    assert {leaf for leaf, *_ in reads} == set(leaves)  # every leaf read through its slices
    assert all(got == shard for _, got, shard, _ in reads), [r for r in reads if r[1] != r[2]]
    assert all(got < whole for leaf, got, _, whole in reads if leaf in split)
    mm = out["multimodal"]
    assert mm["soft_tokens"] > 0 and mm["logits"] <= 1e-5 * mm["logits_scale"], mm
    assert mm["greedy"][0] == mm["greedy"][1] and len(mm["greedy"][0]) == 8, mm["greedy"]


# ----- the rules, without devices ------------------------------------------------------------------------------


def test_rules_shard_each_leaf_as_named():
    cfg = get_config("31b")
    sizes = {"fsdp": 2, "tensor": 4}
    q = param_spec.leaf_of(cfg, "layer_0/attn/q_einsum/w")  # heads embed head_dim
    assert tuple(sharding.leaf_spec(q, sizes)) == ("tensor", "fsdp", None)
    table = param_spec.leaf_of(cfg, "embedder/input_embedding")  # vocab embed
    assert tuple(sharding.leaf_spec(table, sizes)) == ("tensor", "fsdp")
    # 26B-A4B: its global layers' 2 KV heads do not divide tensor=4: left whole there, and said so.
    moe = get_config("26b_a4b")
    glob = next(i for i, t in enumerate(moe.layer_types) if t == "global")
    kv = param_spec.leaf_of(moe, f"layer_{glob}/attn/k_einsum/w")
    assert tuple(sharding.leaf_spec(kv, sizes)) == (None, "fsdp", None)
    assert any(r.startswith("kv_heads [2]") for r in sharding.replicated_where_undivided(moe, sizes))
    experts = param_spec.leaf_of(moe, "layer_0/mlp/gating_einsum/w")  # experts gate_up expert_mlp embed
    assert tuple(sharding.leaf_spec(experts, {"expert": 8})) == ("expert", None, None, None)
    # Per-expert LoRA factors follow their stack: A [experts, embed, r], B [experts, r, gate_up, expert_mlp].
    import jax

    from gemma4_jax.train import lora

    shapes = lora.adapter_shapes(moe, lora.LoraConfig(rank=8, targets=lora.EXPERT_PARAMETERS))
    factors = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    specs = sharding.adapter_specs(moe, factors, {"expert": 8, "fsdp": 2, "tensor": 4})
    gate_up = specs["layer_0"]["mlp"]["gating_einsum"]["w"]
    assert tuple(gate_up["a"]) == ("expert", "fsdp", None) and tuple(gate_up["b"]) == ("expert", None, None, "tensor")
    # The batch takes data, then fsdp, then expert, while they divide it.
    assert tuple(sharding.batch_spec((4, 7), {"data": 2, "fsdp": 4})) == ("data", None)
    assert tuple(sharding.batch_spec((8, 7), {"data": 2, "fsdp": 4})) == (("data", "fsdp"), None)


def test_presets_and_mesh_text():
    cfg = get_config("26b_a4b")
    assert sharding.parse_mesh("fsdp=4,tensor=2", cfg, 8) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert sharding.parse_mesh("auto", cfg, 8) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 8}
    assert sharding.parse_mesh("fsdp_tp", get_config("e2b"), 16) == {"data": 1, "fsdp": 2, "tensor": 8, "expert": 1}
    assert sharding.parse_mesh("fsdp", cfg, 8)["fsdp"] == 8


@pytest.mark.parametrize(
    "text, model, devices, message",
    [
        ("fsdp=4,tensor=4", "tiny", 8, "is 16 devices, but there are 8"),
        ("fsdp=4,pipeline=2", "tiny", 8, "unknown mesh axis pipeline"),
        ("fsdp=four", "tiny", 8, "is not axis=size"),
        ("fsdp=0,tensor=8", "tiny", 8, "integers >= 1"),
        ("expert", "tiny", 8, "tiny has no experts"),
        ("ring", "tiny", 8, "unknown mesh preset 'ring'"),
    ],
)
def test_bad_mesh_text(text, model, devices, message):
    with pytest.raises(Gemma4Error, match=message):
        sharding.parse_mesh(text, get_config(model), devices)


def test_an_axis_that_divides_nothing_is_refused():
    with pytest.raises(Gemma4Error, match=r"mesh axis tensor=5 divides no dimension it shards in tiny \(heads"):
        sharding.check_mesh_fits(get_config("tiny"), {"tensor": 5})
    with pytest.raises(Gemma4Error, match="mesh axis expert=2: tiny has no experts axis for it to shard"):
        sharding.check_mesh_fits(get_config("tiny"), {"expert": 2})
    sharding.check_mesh_fits(get_config("tiny_moe"), {"expert": 2})


@pytest.mark.parametrize("variant", ["31b", "26b_a4b"])
def test_memory_per_device_is_the_plan_divided_by_the_rules(variant):
    """`memory --mesh` on 8 devices: per-device weights = the planner's total weights split as the rules say."""
    cfg = get_config(variant)
    plan = memory.plan(variant, "bf16", context=8192, text_only=True)
    for sizes in ({"fsdp": 8}, {"fsdp": 2, "tensor": 4}, {"expert": 8} if cfg.num_experts else {"fsdp": 8}):
        share = sharding.device_share(cfg.text_only(), sizes, 2, context=8192)
        total = split = 0
        for leaf in param_spec.param_spec(cfg.text_only()):
            if leaf.unused:
                continue
            spec = sharding.leaf_spec(leaf, sizes)
            ways = int(np.prod([sizes.get(a, 1) for e in spec if e for a in ((e,) if isinstance(e, str) else e)]))
            total += int(np.prod(leaf.shape)) * 2
            split += int(np.prod(leaf.shape)) * 2 // ways
        assert total == plan.weight_bytes  # the planner's total, leaf by leaf
        assert share.weights == split
        if sizes.get("fsdp") == 8:  # every weight but the head-dim norm scales (< 0.01 %) has an embed axis
            assert plan.weight_bytes / 8 <= share.weights <= plan.weight_bytes / 8 * 1.0001
        kv = next(p.bytes for p in plan.parts if p.params is None)
        assert share.kv_cache <= kv and share.kv_cache * 8 >= kv


def test_memory_mesh_command(capsys):
    """`gemma4-jax memory --mesh ... --json`: the per-device numbers are `sharding.device_share`'s (the rules), and
    the text output names the slices it fits."""
    from gemma4_jax import cli

    assert cli.main(["memory", "--variant", "26b_a4b", "--text-only", "--context", "8192", "--mesh", "expert=8",
                     "--lora-rank", "16", "--json"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)["per_device"]
    share = sharding.device_share(get_config("26b_a4b").text_only(), {"expert": 8}, 2, context=8192, lora_rank=16)
    assert (got["weights"], got["kv_cache"], got["optimizer"]) == (share.weights, share.kv_cache, share.optimizer)
    assert got["total"] == share.weights + share.kv_cache + share.optimizer
    assert cli.main(["memory", "--variant", "31b", "--text-only", "--mesh", "fsdp=2,tensor=4"]) == 0
    out = capsys.readouterr().out
    assert "on mesh fsdp=2,tensor=4 (8 devices), per device:" in out and "TPU v5e-8" in out
