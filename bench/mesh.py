"""A sharded decode and a sharded LoRA train step, timed, next to the memory-bandwidth and FLOP rooflines.

    python bench/mesh.py                                   # CPU: 8 forced host devices, tiny, every preset
    python bench/mesh.py --variant e2b --mesh fsdp_tp      # a real size on the forced host devices
    python bench/mesh.py --device gpu --variant e2b --mesh auto --batch 8   # the accelerator machine

Decode: `Sampler.generate` on a batch of random prompts; tok/s counts every row's tokens. Its roofline is the
weights + KV cache one device reads per step over that device's memory bandwidth. Train: `loop.make_step` on
random rows (LoRA r=16 on attention + MLP); MFU is the compiled step's FLOPs (XLA's cost analysis, summed over
devices) per second over the devices' peak. Known peaks: H100 SXM 989 TFLOP/s bf16 dense and 3.35 TB/s, H200
989 TFLOP/s and 4.8 TB/s. On CPU the bandwidth is measured (a large numpy copy) and no FLOP peak is claimed.
There is no peer to compare with here (no other JAX Gemma 4 shards LoRA training); the rooflines are the yardstick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # bf16 dense FLOP/s, HBM bytes/s


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu")
    p.add_argument("--host-devices", type=int, default=8, help="CPU only: forced host devices (default 8)")
    p.add_argument("--variant", default="tiny")
    p.add_argument("--mesh", default="all", help="a --mesh value, or 'all' for every preset that applies")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8, help="decode rows and train rows per step")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="train row length")
    p.add_argument("--steps", type=int, default=3, help="timed train steps (after one that compiles)")
    return p.parse_args(argv)


def _cpu_bandwidth() -> float:
    import numpy as np

    a = np.ones(1 << 27, np.uint8)  # 128 MiB
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best  # read + write


def main(argv=None) -> int:
    args = _args(argv)
    if args.device == "cpu":
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.host_devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gemma4_jax import api, sharding
    from gemma4_jax.config import get_config
    from gemma4_jax.train import loop
    from gemma4_jax.train import lora as lora_lib

    kind = jax.devices()[0].device_kind
    peak_flops, bandwidth = next((v for k, v in PEAKS.items() if k in kind), (None, None))
    if args.device == "cpu":
        bandwidth = _cpu_bandwidth()  # shared by all forced devices: the whole machine's
    cfg = get_config(args.variant)
    meshes = [args.mesh] if args.mesh != "all" else [m for m in sharding.PRESETS if m != "expert" or cfg.num_experts]
    print(f"{jax.device_count()} x {kind} ({jax.default_backend()}); {args.variant} {args.dtype}")
    print(f"{'mesh':<24} {'decode tok/s':>12} {'roofline':>9} {'train tok/s':>12} {'step s':>7} {'MFU':>6}")
    for mesh_text in meshes:
        model = api.load(variant=args.variant, dtype=args.dtype, mesh=mesh_text, text_only=True, progress=False)
        rng = np.random.default_rng(0)
        prompts = [[2, *rng.integers(3, cfg.vocab_size, args.prompt_len - 1).tolist()] for _ in range(args.batch)]
        sampler = model.sampler(stop_tokens=())  # every row decodes --new-tokens
        sampler.generate(prompts, args.new_tokens)  # compiles
        gen = sampler.generate(prompts, args.new_tokens)
        decode = args.batch * gen.decode_steps / gen.decode_seconds
        per_device = max(sharding.live_bytes_per_device(model.params).values())
        sizes = dict(model.mesh.shape) if model.mesh is not None else {}  # one device: no mesh
        share = sharding.device_share(cfg.text_only(), sizes, 2, args.prompt_len + args.new_tokens,
                                      args.batch)  # fmt: skip
        devices_per_bandwidth = jax.device_count() if args.device == "cpu" else 1
        roofline = args.batch * bandwidth / ((per_device + share.kv_cache) * devices_per_bandwidth)

        lora = lora_lib.LoraConfig(rank=16)
        tc = loop.TrainConfig(batch=args.batch, seq_len=args.seq_len, steps=args.steps + 1, lr=1e-4)
        adapters, opt_state = loop.init_state(cfg.text_only(), lora, tc, model.mesh)
        tokens = rng.integers(3, cfg.vocab_size, (1, args.batch, args.seq_len)).astype(np.int32)
        ones = np.ones(tokens.shape, np.int32)
        positions = np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), tokens.shape).copy()
        batch = loop.shard_batch({"inputs": tokens, "targets": np.roll(tokens, -1, -1), "positions": positions,
                                  "segments": ones, "weights": ones.astype(np.float32)}, model.mesh)  # fmt: skip
        step = loop.make_step(cfg.text_only(), lora, tc)
        with loop.mesh_context(model.mesh):
            compiled = step.lower(adapters, opt_state, model.params, batch, 0).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = float(cost.get("flops", 0.0)) * jax.device_count()  # the per-device program, on every device
            adapters, opt_state, m = compiled(adapters, opt_state, model.params, batch, 0)
            jax.block_until_ready(m)
            start = time.perf_counter()
            for i in range(args.steps):
                adapters, opt_state, m = compiled(adapters, opt_state, model.params, batch, i + 1)
            jax.block_until_ready(m)
        seconds = (time.perf_counter() - start) / args.steps
        train = args.batch * args.seq_len / seconds
        mfu = f"{100 * flops / seconds / (peak_flops * jax.device_count()):.1f}%" if peak_flops and flops else "n/a"
        name = sharding.format_sizes(model.mesh) if model.mesh is not None else "one device"
        print(f"{name:<24} {decode:>12.1f} {roofline:>9.1f} {train:>12.1f} {seconds:>7.3f} {mfu:>6}", flush=True)
        del model, adapters, opt_state
    unit = "measured copy" if args.device == "cpu" else "HBM per device"
    print(f"roofline: batch x bandwidth / bytes one device reads per decode step; bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({unit}{', shared by the forced devices' if args.device == 'cpu' else ''})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
