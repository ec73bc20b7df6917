"""`gemma4-jax memory`: how many bytes a variant needs on the device and on the host (spec §7.1, §7.2).

Weights are split by part (PLE table, token embedding, decoder, vision, audio) and priced per quantization
format; the KV cache is the W-capped cache `model.init_cache` allocates. Text-model parameter counts come from
the real parameter tree (`model.param_shapes`), counted as the HF tree does: without the K/V weights of
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

# The vision and audio encoders are not implemented yet, so their sizes are the spec's constants (§7.1 counts,
# widths from §4.1 / §4.2) until they land; the projections into the text width D are computed from D.
SPEC_VISION_ENCODER_PARAMS = {"e2b": 167_364_928, "e4b": 167_364_928, "31b": 569_550_384, "26b_a4b": 569_550_384}
SPEC_VISION_WIDTH = {"e2b": 768, "e4b": 768, "31b": 1152, "26b_a4b": 1152}  # mm_input_projection [d_v, D]
SPEC_AUDIO_ENCODER_PARAMS = {"e2b": 304_825_088, "e4b": 304_825_088, "31b": 0, "26b_a4b": 0}
SPEC_AUDIO_WIDTH = 1536  # audio_input_projection [1536, D]

VARIANTS = tuple(SPEC_VISION_ENCODER_PARAMS)


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
def text_param_split(variant: str) -> dict[str, int]:
    """Text-model parameter counts by part, from the real parameter tree (no allocation)."""
    from gemma4_jax import config, model

    cfg = config.get_config(variant)
    shapes = model.param_shapes(cfg)
    embedder = shapes["embedder"]
    reader_kv = sum(
        model.count_params(shapes[f"layer_{i}"]["attn"].get(name, {}))
        for i in range(cfg.num_layers)
        if cfg.is_kv_reader(i)
        for name in ("kv_einsum", "k_einsum", "key_norm")
    )
    ple = model.count_params(embedder.get("per_layer_embeddings", {}))
    token = model.count_params(embedder["input_embedding"])
    return {
        "ple_table": ple,
        "token_embedding": token,
        "decoder": model.count_params(shapes) - ple - token - reader_kv,
        "reader_kv": reader_kv,
    }


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

    text = text_param_split(variant)
    counts = [
        ("PLE table", text["ple_table"], PLE_PLACES[ple], "V·L·P, one row per token"),
        ("token embedding", text["token_embedding"], "device", "V·D, also the tied LM head"),
        (
            "decoder",
            text["decoder"],
            "device",
            "layers + final norm" + (" + PLE projections" if cfg.per_layer_input_dim else ""),
        ),
    ]
    if not text_only:
        d = cfg.embed_dim
        vision = SPEC_VISION_ENCODER_PARAMS[variant] + SPEC_VISION_WIDTH[variant] * d
        counts.append(("vision", vision, "device", "spec §7.1 constant: encoder + projection"))
        if SPEC_AUDIO_ENCODER_PARAMS[variant]:
            audio = SPEC_AUDIO_ENCODER_PARAMS[variant] + SPEC_AUDIO_WIDTH * d
            counts.append(("audio", audio, "device", "spec §7.1 constant: encoder + projection"))
    parts = [Part(name, n, weight_bytes(n, quant), place, note) for name, n, place, note in counts if n]

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
        text["reader_kv"],
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
