"""The LoRA training loop: one jitted step (AdamW, warmup + cosine, clipping, gradient accumulation), eval,
metrics, progress, and orbax checkpoints that a resumed run continues from exactly.

Output directory:
  checkpoints/<step>/      orbax: adapters + optimizer state ("state") and the data position ("meta")
  metrics.jsonl            one object per step ({"step", "loss", "lr", "grad_norm", "tokens", ...}) and per eval
  adapter_model.safetensors, adapter_config.json   the final adapters in Hugging Face PEFT layout
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import model
from gemma4_jax.config import Gemma4Config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.files import Progress
from gemma4_jax.train import lora as lora_lib
from gemma4_jax.train.data import Batches, Rows

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch: int = 4
    accumulation: int = 1
    seq_len: int = 512
    lr: float = 1e-4
    warmup_steps: int | None = None  # default: 10 % of the steps, at most 100
    min_lr_ratio: float = 0.1  # the cosine decays to lr · min_lr_ratio
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    save_every: int = 50
    eval_every: int = 50
    seed: int = 0
    remat: bool = False

    def __post_init__(self):
        for name in ("steps", "batch", "accumulation", "save_every", "eval_every"):
            if getattr(self, name) < 1:
                raise Gemma4Error(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise Gemma4Error(f"learning rate must be > 0, got {self.lr}")

    @property
    def warmup(self) -> int:
        return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    # What a resumed run must share with the original one to continue it exactly.
    def trajectory(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("save_every", "eval_every", "remat"):
            d.pop(key)
        return d


def make_optimizer(tc: TrainConfig):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=tc.warmup,
        decay_steps=max(tc.steps, tc.warmup + 1),
        end_value=tc.lr * tc.min_lr_ratio,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(tc.clip_norm), optax.adamw(schedule, weight_decay=tc.weight_decay)
    )
    return optimizer, schedule


def token_losses(params, batch, config: Gemma4Config, remat: bool) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token NLL, sum of weights) of one [B, T] batch of packed rows."""
    logits, _ = model.apply(
        params,
        batch["inputs"],
        batch["positions"],
        config=config,
        segments=batch["segments"],
        soft_tokens=batch.get("soft_tokens"),  # image/audio embeddings from the frozen encoders (data.embed_media)
        soft_mask=batch.get("soft_mask"),
        blocks=batch.get("blocks"),
        remat=remat,
    )
    acc = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 in float64 checks
    logp = jax.nn.log_softmax(logits.astype(acc), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    weights = batch["weights"].astype(acc)
    return jnp.sum(nll * weights), jnp.sum(weights)


def accumulated_grads(config: Gemma4Config, lora: lora_lib.LoraConfig, tc: TrainConfig) -> Callable:
    """grads(adapters, base, batch [A, B, T], step) -> (grads, loss, tokens): the A micro-batches scanned, the
    gradient and loss token-weighted means over all of them (the same as one batch of A·B rows)."""

    def loss_sums(adapters, base, micro, key):
        params = lora_lib.attach(base, adapters, config, lora, key)
        return token_losses(params, micro, config, tc.remat)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def grads(adapters, base, batch, step_index):
        key = jax.random.fold_in(jax.random.key(tc.seed), step_index)
        keys = jax.random.split(key, tc.accumulation)

        def micro_step(carry, xs):
            total_grads, total, count = carry
            micro, k = xs
            (s, n), g = grad_fn(adapters, base, micro, k)
            return (jax.tree.map(jnp.add, total_grads, g), total + s, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, adapters)
        acc = jnp.promote_types(base["embedder"]["input_embedding"].dtype, jnp.float32)  # as token_losses sums
        init = (zeros, jnp.zeros((), acc), jnp.zeros((), acc))
        (summed, total, count), _ = jax.lax.scan(micro_step, init, (batch, keys))
        denominator = jnp.maximum(count, 1.0)
        return jax.tree.map(lambda g: g / denominator, summed), total / denominator, count

    return grads


@functools.lru_cache(maxsize=8)
def make_step(config: Gemma4Config, lora: lora_lib.LoraConfig, tc: TrainConfig) -> Callable:
    """step(adapters, opt_state, base, batch [A, B, T], step) -> (adapters, opt_state, metrics).

    `base` is an argument (not a constant baked into the program) and is not donated: it is read in place every
    step. On a mesh (called under `jax.set_mesh`, with sharded arguments) the same program is partitioned.
    """
    import optax

    optimizer, _ = make_optimizer(tc)
    grads_fn = accumulated_grads(config, lora, tc)

    def step(adapters, opt_state, base, batch, step_index):
        grads, loss, count = grads_fn(adapters, base, batch, step_index)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return adapters, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def make_eval(config: Gemma4Config, lora: lora_lib.LoraConfig) -> Callable:
    @jax.jit
    def evaluate(adapters, base, batch):
        return token_losses(lora_lib.attach(base, adapters, config, lora), batch, config, False)

    return evaluate


def tree_bytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


# ----- checkpoints -------------------------------------------------------------------------------------------


def _manager(out_dir: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    # orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a killed
    # run leaves either a whole checkpoint or a temporary directory that `all_steps` ignores.
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, CHECKPOINTS)), options=options)


def save_checkpoint(manager, step: int, adapters, opt_state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    state = {"adapters": adapters, "opt_state": opt_state}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def read_meta(manager, step: int) -> dict:
    """The JSON side of a checkpoint (run settings, data position), read without the arrays."""
    import orbax.checkpoint as ocp

    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:  # orbax raises many types for a damaged checkpoint
        raise Gemma4Error(f"checkpoint {step} cannot be read ({type(e).__name__}: {e})") from None


def restore_checkpoint(manager, step: int, adapters, opt_state) -> tuple[dict, object, dict]:
    import orbax.checkpoint as ocp

    # Each array comes back on the sharding of its template (any mesh, or one device), not the one it was saved on.
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        {"adapters": adapters, "opt_state": opt_state},
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return restored.state["adapters"], restored.state["opt_state"], dict(restored.meta)


class TokenRate:
    """Training tokens per second, from the second step on (the first one compiles)."""

    def __init__(self):
        self.t0: float | None = None
        self.tokens = 0.0

    def update(self, tokens: float) -> float:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
            return float("nan")
        self.tokens += tokens
        return self.tokens / max(now - self.t0, 1e-9)


# ----- the loop ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    adapters: dict
    losses: dict[int, float]  # step -> training loss (steps run in this call)
    eval_losses: dict[int, float]
    start_step: int
    seconds: float


def _metrics_rewind(path: str, keep_through: int) -> None:
    """On resume: drop metrics of steps after the restored checkpoint (a killed run may have logged them)."""
    from gemma4_jax.files import write_text

    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_through]
    write_text(path, "".join(lines))


def train(
    config: Gemma4Config,
    base: dict,
    train_rows: Rows,
    eval_rows: Rows | None,
    lora: lora_lib.LoraConfig,
    tc: TrainConfig,
    out_dir: str,
    resume: bool = False,
    log: Callable[[str], None] = print,
    base_id: str = "",
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
    """Trains LoRA adapters on `base` (frozen; dense or quantized leaves) and writes `out_dir` (see module doc).
    `base_id` identifies the base model: a resumed run must have the same one. With a `mesh` (`base` sharded on
    it, `api.load(mesh=...)`), the adapters and their optimizer state are sharded by the rules of their base
    weights, each step's rows are split over the batch axes, and checkpoints are written and read shard by shard
    (a run may resume on another mesh)."""
    import optax  # noqa: F401  (fail early if missing)

    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    manager = _manager(out_dir)
    existing = list(manager.all_steps())
    if existing and not resume:
        raise Gemma4Error(f"{out_dir} already has checkpoints (steps {existing}): pass --resume or choose a new -o")

    _, schedule = make_optimizer(tc)
    adapters, opt_state = init_state(config, lora, tc, mesh)
    batches = Batches(train_rows, tc.batch, tc.accumulation, tc.seed)
    fingerprint = train_rows.fingerprint()
    run = {"base": base_id, "lora": lora.to_dict(), "train": tc.trajectory(), "data_fingerprint": fingerprint}

    start = 0
    metrics_path = os.path.join(out_dir, METRICS)
    if resume and existing:
        start = max(existing)
        recorded = read_meta(manager, start).get("run", {})
        differs = [k for k in run if recorded.get(k) != run[k]]
        if differs:
            names = ", ".join({"base": "base model", "data_fingerprint": "data"}.get(k, k) for k in differs)
            raise Gemma4Error(
                f"--resume: this run's {names} differ from the checkpoint's in {out_dir}; "
                "resume with the same base model, data and settings"
            )
        adapters, opt_state, meta = restore_checkpoint(manager, start, adapters, opt_state)
        if meta["rows_consumed"] != start * batches.rows_per_step:
            raise Gemma4Error(f"--resume: checkpoint {start} records an inconsistent data position")
        _metrics_rewind(metrics_path, start)
        log(f"resuming from step {start} (epoch {batches.epoch_of(start):.2f}) in {out_dir}")
    elif resume:
        log(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")
    if not (resume and existing) and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run (a run killed before its first checkpoint starts over)

    n_adapter = lora_lib.count(adapters)
    n_base = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(base, is_leaf=lambda x: not isinstance(x, dict)))
    log(
        f"LoRA r={lora.rank} alpha={lora.alpha:g} dropout={lora.dropout:g} on {lora_lib.summary(config, adapters)}\n"
        f"adapter parameters: {n_adapter:,} ({100 * n_adapter / n_base:.3f} % of {n_base:,}); "
        f"optimizer state: {tree_bytes(opt_state):,} bytes (AdamW: 2 f32 moments per adapter parameter)\n"
        f"data: {len(train_rows)} packed rows of {tc.seq_len} for training, "
        f"{0 if eval_rows is None else len(eval_rows)} for eval; {tc.batch} x {tc.accumulation} rows per step"
    )

    step_fn = make_step(config, lora, dataclasses.replace(tc, save_every=1, eval_every=1))
    eval_fn = make_eval(config, lora) if eval_rows is not None and len(eval_rows) else None

    def run_eval(adapters) -> float:
        total = count = 0.0
        for first in range(0, len(eval_rows), tc.batch):
            index = np.arange(first, first + tc.batch) % len(eval_rows)
            batch = eval_rows.take(index)
            batch["weights"] = batch["weights"] * (np.arange(first, first + tc.batch) < len(eval_rows))[:, None]
            with mesh_context(mesh):
                s, n = eval_fn(adapters, base, shard_batch(batch, mesh, leading=0))
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    progress = Progress("training", tc.steps, unit="steps", every=30)
    progress.done = start
    token_rate = TokenRate()
    last_saved = start if existing and resume else None
    with open(metrics_path, "a") as metrics_file:

        def record(entry):
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

        for step in range(start + 1, tc.steps + 1):
            batch = batches.at(step - 1)
            with mesh_context(mesh):
                adapters, opt_state, m = step_fn(adapters, opt_state, base, shard_batch(batch, mesh), step - 1)
            loss, tokens = float(m["loss"]), float(m["tokens"])
            if not math.isfinite(loss):
                progress.close()
                kept = f"the last good checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
                raise Gemma4Error(
                    f"non-finite training loss ({loss}) at step {step}; stopped ({kept} in {out_dir}). "
                    "Lower --lr or check the data."
                )
            losses[step] = loss
            rate = token_rate.update(float(np.sum(batch["positions"] >= 0)))
            rate_text = "" if math.isnan(rate) else f" | {rate:,.0f} tok/s"
            progress.advance(1, f"loss {loss:.4f}{rate_text}")
            record(
                {
                    "step": step,
                    "loss": loss,
                    "lr": float(schedule(step - 1)),
                    "grad_norm": float(m["grad_norm"]),
                    "tokens": tokens,
                    "tokens_per_s": None if math.isnan(rate) else rate,
                    "epoch": batches.epoch_of(step),
                }
            )
            if eval_fn is not None and (step % tc.eval_every == 0 or step == tc.steps):
                eval_losses[step] = run_eval(adapters)
                record({"step": step, "eval_loss": eval_losses[step]})
                log(f"step {step}: eval loss {eval_losses[step]:.4f}")
            if step % tc.save_every == 0 or step == tc.steps:
                meta = {"step": step, "rows_consumed": step * batches.rows_per_step, "run": run}
                save_checkpoint(manager, step, adapters, opt_state, meta)
                last_saved = step
    progress.close()
    return TrainResult(adapters, losses, eval_losses, start, time.perf_counter() - started)


def latest_adapters(out_dir: str, config: Gemma4Config, lora: lora_lib.LoraConfig, tc: TrainConfig, mesh=None):
    """The adapters of the newest checkpoint in `out_dir` (on `mesh`'s shards, whatever mesh wrote them)."""
    manager = _manager(out_dir)
    if manager.latest_step() is None:
        raise Gemma4Error(f"{out_dir}: no checkpoints")
    adapters, opt_state = init_state(config, lora, tc, mesh)
    adapters, _, _ = restore_checkpoint(manager, manager.latest_step(), adapters, opt_state)
    return adapters


# ----- on a mesh ----------------------------------------------------------------------------------------------


def mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def init_state(config: Gemma4Config, lora: lora_lib.LoraConfig, tc: TrainConfig, mesh=None):
    """Fresh adapters and optimizer state, on `mesh`'s shards when one is given: each Adam moment on its adapter's
    sharding (the step count replicated), so the state is split from the start and keeps its layout step to step."""
    optimizer, _ = make_optimizer(tc)
    adapters = lora_lib.init_adapters(config, lora, tc.seed)
    if mesh is None:
        return adapters, optimizer.init(adapters)
    from gemma4_jax import sharding

    adapters = sharding.place(adapters, mesh, sharding.adapter_specs(config, adapters, mesh))
    by_path = {_dict_keys(path): x.sharding for path, x in jax.tree_util.tree_leaves_with_path(adapters)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def moment_sharding(path, _):
        keys = _dict_keys(path)  # a moment's path ends with its adapter's path (optax keeps the tree)
        return next((sh for p, sh in by_path.items() if keys[-len(p) :] == p), replicated)

    abstract = jax.eval_shape(optimizer.init, adapters)
    out = jax.tree_util.tree_map_with_path(moment_sharding, abstract)
    return adapters, jax.jit(optimizer.init, out_shardings=out)(adapters)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def shard_batch(batch: dict, mesh, leading: int = 1) -> dict:
    """A step's rows [A, B, T] (`leading` 1; an eval batch [B, T]: 0) split over the mesh's batch axes."""
    if mesh is None:
        return batch
    from gemma4_jax import sharding

    def spec(x):
        axes = [f"_{k}" for k in range(np.ndim(x))]
        axes[leading] = sharding.BATCH
        return sharding.spec_of(tuple(axes), np.shape(x), mesh)

    return sharding.place(batch, mesh, jax.tree.map(spec, batch))
