"""`gemma4-jax memory`: how many bytes a variant needs on the device and on the host (spec §7.1, §7.2).

Weights are split by part (PLE table, token embedding, decoder, vision, audio) and priced per quantization
format (the encoders in float32, as the library runs them); the KV cache is the W-capped cache `model.init_cache`
allocates. Parameter counts come from the parameter spec, counted as the HF tree does: without the K/V weights of
KV-shared reader layers, which the official JAX tree carries but no layer reads (spec §6 #17).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

from gemma4_jax.files import human_bytes

# Bytes per weight. 8-bit formats are priced at 1 byte like spec §7.1's "8-bit" row: their scales (one per
# tensor for SFP8, one per output channel for int8) are not counted. Q4_0 stores 32 weights as 16 bytes of
# nibbles + one f16 scale = 18 bytes, the 4.5 bits/weight of spec §7.1 (real Q4_0 files keep some tensors at
# higher precision and are larger).
QUANT_BYTES_PER_WEIGHT = {"bf16": Fraction(2), "sfp8": Fraction(1), "int8": Fraction(1), "q4_0": Fraction(18, 32)}

PLE_PLACES = {"device": "device", "host": "host RAM", "mmap": "disk (mmap)"}

VARIANTS = ("e2b", "e4b", "31b", "26b_a4b")
# The encoders run in float32 whatever the text weights are stored in (`param_spec.leaf_dtype`); they are never
# quantized.
TOWER_BYTES_PER_WEIGHT = 4


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    params: int | None  # None for the KV cache
    bytes: int
    place: str  # "device", "host RAM", "disk (mmap)"
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    variant: str
    quant: str
    context: int
    batch: int
    ple: str
    text_only: bool
    parts: tuple[Part, ...]
    weight_params: int  # the HF tree of the parts included
    weight_bytes: int
    kv_uncapped_bytes: int  # the KV cache if local layers kept the whole context too (spec §7.2)
    reader_kv_params: int  # official JAX tree only; not in `parts`

    def total(self, place: str) -> int:
        return sum(p.bytes for p in self.parts if p.place == place)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_bytes"] = {place: self.total(place) for place in ("device", "host RAM", "disk (mmap)")}
        return d


@functools.cache
def param_split(variant: str) -> dict[str, int]:
    """Parameter counts by part, from the parameter spec (no allocation)."""
    from gemma4_jax import config, param_spec

    parts = (
        "ple_table",
        "token_embedding",
        "decoder",
        "reader_kv",
        "vision",
        "audio",
        "vision_encoder",
        "audio_encoder",
    )
    split = dict.fromkeys(parts, 0)
    for leaf in param_spec.param_spec(config.get_config(variant)):
        n = math.prod(leaf.shape)
        if leaf.part != "text":
            split[leaf.part] += n
            if leaf.path[0] != "embedder":  # the encoder itself, without its projection into the text width
                split[f"{leaf.part}_encoder"] += n
        elif leaf.unused:
            split["reader_kv"] += n
        elif leaf.quant == param_spec.PLE_TABLE:
            split["ple_table"] += n
        elif leaf.quant == param_spec.EMBEDDING:
            split["token_embedding"] += n
        else:
            split["decoder"] += n
    return split


def weight_bytes(params: int, quant: str) -> int:
    """Bytes of `params` weights in format `quant` (whole bytes, rounded up)."""
    return math.ceil(params * QUANT_BYTES_PER_WEIGHT[quant])


def plan(
    variant: str,
    quant: str = "bf16",
    context: int = 4096,
    batch: int = 1,
    ple: str = "device",
    text_only: bool = False,
) -> Plan:
    from gemma4_jax import config, model
    from gemma4_jax.errors import Gemma4Error

    if variant not in VARIANTS:
        raise Gemma4Error(f"memory: unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    if quant not in QUANT_BYTES_PER_WEIGHT:
        raise Gemma4Error(f"memory: unknown format {quant!r}; choose one of: {', '.join(QUANT_BYTES_PER_WEIGHT)}")
    if ple not in PLE_PLACES:
        raise Gemma4Error(f"memory: --ple must be one of {', '.join(PLE_PLACES)}, got {ple!r}")
    cfg = config.get_config(variant)
    if not 1 <= context <= cfg.max_context:
        raise Gemma4Error(f"memory: context {context} is outside [1, {cfg.max_context}], the context of {variant}")
    if batch < 1:
        raise Gemma4Error(f"memory: batch must be >= 1, got {batch}")

    if ple != "device" and not cfg.per_layer_input_dim:
        raise Gemma4Error(f"memory: --ple {ple}: {variant} has no Per-Layer Embeddings table")

    split = param_split(variant)
    counts = [
        ("PLE table", split["ple_table"], PLE_PLACES[ple], "V·L·P, one row per token"),
        ("token embedding", split["token_embedding"], "device", "V·D, also the tied LM head"),
        (
            "decoder",
            split["decoder"],
            "device",
            "layers + final norm" + (" + PLE projections" if cfg.per_layer_input_dim else ""),
        ),
    ]
    parts = [Part(name, n, weight_bytes(n, quant), place, note) for name, n, place, note in counts if n]
    if not text_only:
        towers = (("vision", "ViT"), ("audio", "Conformer"))
        parts += [
            Part(
                name,
                split[name],
                split[name] * TOWER_BYTES_PER_WEIGHT,
                "device",
                f"{kind} encoder {split[name + '_encoder']:,} + projection into D "
                f"{split[name] - split[name + '_encoder']:,}, float32",
            )
            for name, kind in towers
            if split[name]
        ]

    lengths = model.cache_lengths(cfg, context)
    kv = model.cache_bytes(cfg, context, batch)
    # MiB as spec §7.2 gives it
    kv_note = ", ".join(f"{kind} {n} slots" for kind, n in lengths.items()) + f", bf16; {mib(kv)}"
    parts.append(Part("KV cache (W-capped)", None, kv, "device", kv_note))
    # One token's K/V in every owning layer = the per-token bytes with no window cap.
    kv_uncapped = model.cache_bytes(cfg, 1, batch) * context
    return Plan(
        variant,
        quant,
        context,
        batch,
        ple,
        text_only,
        tuple(parts),
        sum(p.params for p in parts if p.params is not None),
        sum(p.bytes for p in parts if p.params is not None),
        kv_uncapped,
        split["reader_kv"],
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_plan(p: Plan) -> str:
    rate = QUANT_BYTES_PER_WEIGHT[p.quant]
    unit = "byte" if rate == 1 else "bytes"
    lines = [
        f"{p.variant}: weights {p.quant} ({float(rate):g} {unit}/weight), KV cache bf16, context {p.context}, "
        f"batch {p.batch}, PLE table on {PLE_PLACES[p.ple]}{', text only' if p.text_only else ''}",
        "",
    ]
    rows = [(part.name, f"{part.params:,}" if part.params is not None else "", part, part.note) for part in p.parts]
    rows.insert(-1, ("weights (HF tree)", f"{p.weight_params:,}", None, ""))
    width = max(len(r[0]) for r in rows)
    header = f"{'part':<{width}}  {'params':>15}  {'bytes':>16}  {'':>11}  {'where':<12}  note"
    lines += [header, "-" * len(header)]
    for name, params, part, note in rows:
        if part is None:
            lines.append(f"{name:<{width}}  {params:>15}  {p.weight_bytes:>16,}  {human_bytes(p.weight_bytes):>11}")
            continue
        size = human_bytes(part.bytes)
        lines.append(f"{name:<{width}}  {params:>15}  {part.bytes:>16,}  {size:>11}  {part.place:<12}  {note}")
    lines.append("-" * len(header))
    for place in ("device", "host RAM", "disk (mmap)"):
        total = p.total(place)
        if total or place == "device":
            lines.append(f"{'total on ' + place:<{width}}  {'':>15}  {total:>16,}  {human_bytes(total):>11}")
    lines += [
        "",
        f"KV cache without the window cap (every layer keeps the whole context): {mib(p.kv_uncapped_bytes)}.",
        "Not counted: activations, and the scales of 8-bit formats (1 byte/weight as in spec §7.1).",
    ]
    if p.reader_kv_params:
        lines.append(
            f"Not counted: {p.reader_kv_params:,} K/V weights of KV-shared reader layers in the official JAX tree "
            f"(never read; {human_bytes(weight_bytes(p.reader_kv_params, p.quant))} if a loader keeps them)."
        )
    return "\n".join(lines)


# ----- on a device mesh ---------------------------------------------------------------------------------------

# Common slices: accelerator memory per device (bytes) by device count. A TPU "-8" name counts TensorCores: v4-8
# and v5p-8 are 4 chips, v5e-8 and v6e-8 are 8.
SLICES = {
    "TPU v5e-8": (8, 16 * 2**30),
    "TPU v6e-8": (8, 32 * 2**30),
    "TPU v4-8": (4, 32 * 2**30),
    "TPU v5p-8": (4, 95 * 2**30),
    "8x H100 80GB": (8, 80 * 10**9),
    "8x H200": (8, 141 * 10**9),
    "4x A100 40GB": (4, 40 * 10**9),
}
# Room kept free on each device for activations, compiled programs and the runtime (as `HEADROOM` on the host).
DEVICE_HEADROOM = 0.10


def mesh_plan(p: Plan, mesh_text: str, lora_rank: int = 0):
    """Per-device bytes of `p` on a mesh (`--mesh` text: axis=size,... or a preset with every device), with the
    parameter sharding rules (`gemma4_jax.sharding`)."""
    from gemma4_jax import config, sharding
    from gemma4_jax.errors import Gemma4Error

    cfg = config.get_config(p.variant)
    cfg = cfg.text_only() if p.text_only else cfg
    if "=" not in mesh_text:
        raise Gemma4Error(f"memory --mesh takes axis=size,... (e.g. fsdp=4,tensor=2), got {mesh_text!r}")
    sizes = sharding.parse_mesh(mesh_text, cfg, math.prod(int(part.split("=")[1]) for part in mesh_text.split(",")))
    sharding.check_mesh_fits(cfg, sizes)
    return sharding.device_share(
        cfg,
        sizes,
        float(QUANT_BYTES_PER_WEIGHT[p.quant]),
        p.context,
        p.batch,
        ple_on_device=p.ple == "device",
        tower_bytes_per_weight=TOWER_BYTES_PER_WEIGHT,
        lora_rank=lora_rank,
    )


def format_mesh_plan(p: Plan, share, lora_rank: int = 0) -> str:
    from gemma4_jax import sharding

    devices = math.prod(share.mesh.values())
    rows = [("weights", share.weights), (f"KV cache (batch {p.batch}, context {p.context})", share.kv_cache)]
    if lora_rank:
        rows.append((f"LoRA r={lora_rank} adapters + AdamW moments (f32)", share.optimizer))
    rows.append(("total per device", share.total))
    width = max(len(r[0]) for r in rows)
    lines = ["", f"on mesh {sharding.format_sizes(share.mesh)} ({devices} devices), per device:"]
    lines += [f"  {name:<{width}}  {n:>16,}  {human_bytes(n):>11}" for name, n in rows]
    if share.replicated:
        lines.append("  left whole (the mesh axis does not divide them): " + "; ".join(share.replicated))
    fits = [
        f"{name} ({human_bytes(room)}/device): {'fits' if share.total <= room * (1 - DEVICE_HEADROOM) else 'too big'}"
        for name, (count, room) in SLICES.items()
        if count == devices
    ]
    if fits:
        lines.append(f"  with {DEVICE_HEADROOM:.0%} of each device kept free: " + "; ".join(fits))
    lines.append("  Not counted: activations (batch x sequence x width per layer, more when training).")
    return "\n".join(lines)
