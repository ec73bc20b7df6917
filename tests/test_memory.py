"""`gemma4-jax memory` against every number of spec §7.1 (weight bytes, parameter counts) and §7.2 (KV cache)."""

import json

import jax
import pytest
import spec_numbers as spec

from gemma4_jax import cli, config, memory, model, ple
from gemma4_jax.errors import Gemma4Error

VARIANTS = config.OFFICIAL_VARIANTS

# spec §7.1 "Weight bytes (HF tree, 1 GiB = 2³⁰ B)", as printed there (2 decimals); 8-bit covers sfp8 and int8
SPEC_WEIGHT_GIB = {
    "bf16": {"e2b": "9.51", "e4b": "14.79", "26b_a4b": "48.07", "31b": "58.25"},
    "sfp8": {"e2b": "4.75", "e4b": "7.40", "26b_a4b": "24.03", "31b": "29.13"},
    "int8": {"e2b": "4.75", "e4b": "7.40", "26b_a4b": "24.03", "31b": "29.13"},
    "q4_0": {"e2b": "2.67", "e4b": "4.16", "26b_a4b": "13.52", "31b": "16.38"},
}


def _part(p: memory.Plan, name: str) -> memory.Part | None:
    return next((part for part in p.parts if part.name == name), None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_equal_spec(variant):
    full = memory.plan(variant)
    assert full.weight_params == spec.TOTAL_HF[variant]
    assert full.reader_kv_params == spec.UNUSED_READER_KV[variant]
    text = memory.plan(variant, text_only=True)
    assert text.weight_params == spec.TEXT_HF[variant]
    ple_table = _part(text, "PLE table")
    assert (ple_table.params if ple_table else 0) == spec.PLE_TABLE[variant]
    assert text.weight_params - (ple_table.params if ple_table else 0) == spec.TEXT_NO_PLE[variant]
    assert _part(text, "token embedding").params == spec.TOKEN_EMBED[variant]
    assert _part(text, "decoder").params == spec.TEXT_NO_PLE_NO_EMBED[variant]
    assert _part(text, "vision") is None and _part(text, "audio") is None
    vision = _part(full, "vision").params
    audio = _part(full, "audio").params if _part(full, "audio") else 0
    assert vision + audio == spec.VISION_ENCODER[variant] + spec.AUDIO_ENCODER[variant] + spec.MM_PROJECTIONS[variant]
    if variant in spec.VISION_WITH_PROJECTION:
        assert (vision, audio) == (spec.VISION_WITH_PROJECTION[variant], spec.AUDIO_WITH_PROJECTION[variant])


@pytest.mark.parametrize("quant", list(SPEC_WEIGHT_GIB))
def test_weight_bytes_equal_spec(quant):
    """Spec §7.1 prices the whole HF tree in the format; the planner prices the text parts so and adds the encoders
    in float32, as this library holds them (never quantized)."""
    for variant, gib in SPEC_WEIGHT_GIB[quant].items():
        p = memory.plan(variant, quant)
        towers = [part for part in p.parts if part.name in ("vision", "audio")]
        assert all(part.bytes == 4 * part.params for part in towers)
        tower_params = sum(part.params for part in towers)
        in_format = memory.plan(variant, quant, text_only=True).weight_bytes + memory.weight_bytes(tower_params, quant)
        assert f"{in_format / 2**30:.2f}" == gib, (variant, quant)
        assert p.weight_bytes == sum(part.bytes for part in p.parts if part.params is not None)
        assert p.weight_bytes == in_format - memory.weight_bytes(tower_params, quant) + 4 * tower_params
    # exact bytes per weight: bf16 2, 8-bit 1, Q4_0 18 bytes per block of 32
    n = spec.TEXT_HF["e2b"]
    exact = {"bf16": 2 * n, "sfp8": n, "int8": n, "q4_0": None}[quant]
    text = memory.plan("e2b", quant, text_only=True).weight_bytes
    if exact is not None:
        assert text == exact
    else:
        assert abs(text - n * 18 / 32) < 4  # <= 1 byte rounded up per part


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_spec(variant):
    for context, (uncapped, capped) in spec.KV_MIB[variant].items():
        p = memory.plan(variant, context=context)
        assert _part(p, "KV cache (W-capped)").bytes == capped * 2**20, context
        assert p.kv_uncapped_bytes == uncapped * 2**20, context
        assert _part(memory.plan(variant, context=context, batch=3), "KV cache (W-capped)").bytes == 3 * capped * 2**20
    assert _part(memory.plan(variant, context=1), "KV cache (W-capped)").bytes == spec.KV_BYTES_PER_TOKEN[variant]
    if 262144 not in spec.KV_MIB[variant]:  # "– (max 128K)"
        with pytest.raises(Gemma4Error, match="outside"):
            memory.plan(variant, context=262144)


def test_ple_placement_moves_only_the_table():
    on_device = memory.plan("e2b", "q4_0")
    for mode, place in (("host", "host RAM"), ("mmap", "disk (mmap)")):
        off = memory.plan("e2b", "q4_0", ple=mode)
        table = _part(off, "PLE table")
        assert table.place == place and table.bytes == _part(on_device, "PLE table").bytes
        assert off.total("device") == on_device.total("device") - table.bytes
        assert off.total(place) == table.bytes
    with pytest.raises(Gemma4Error, match="no Per-Layer Embeddings"):
        memory.plan("31b", ple="host")


def test_device_bytes_e2b_with_and_without_ple_table():
    """The device share of the real bf16 E2B parameter tree, as `ple.split_table` leaves it (no allocation)."""
    shapes = model.param_shapes(config.E2B)
    rest, table = ple.split_table(shapes)

    def nbytes(tree):
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))

    assert nbytes(table) == 2 * spec.PLE_TABLE["e2b"]
    assert nbytes(rest) == nbytes(shapes) - 2 * spec.PLE_TABLE["e2b"]
    assert "per_layer_embeddings" in shapes["embedder"]  # the caller's tree is untouched


def test_cli_table_and_json(capsys):
    assert cli.main(["memory", "--variant", "e2b"]) == 0
    out = capsys.readouterr().out
    assert "30.00 MiB" in out and "72.00 MiB" in out
    assert "vision" in out and f"{spec.VISION_WITH_PROJECTION['e2b']:,}" in out and "float32" in out
    assert f"ViT encoder {spec.VISION_ENCODER['e2b']:,} + projection" in out  # spec §4.1
    assert f"Conformer encoder {spec.AUDIO_ENCODER['e2b']:,} + projection" in out  # spec §4.2
    assert cli.main(["memory", "--variant", "e4b", "--quant", "q4_0", "--ple", "host", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    parts = {p["name"]: p for p in d["parts"]}
    assert parts["PLE table"]["place"] == "host RAM"
    assert d["total_bytes"]["host RAM"] == parts["PLE table"]["bytes"]
    assert d["weight_params"] == spec.TOTAL_HF["e4b"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variant", "e2b", "--context", "131073"], "outside"),
        (["--variant", "e4b", "--context", "0"], "outside"),
        (["--variant", "e2b", "--batch", "0"], "batch"),
        (["--variant", "26b_a4b", "--ple", "mmap"], "no Per-Layer Embeddings"),
    ],
)
def test_bad_input_is_one_error_line(capsys, argv, message):
    assert cli.main(["memory", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err and captured.err.startswith("gemma4-jax: error:")
