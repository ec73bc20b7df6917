"""LiteRT export: our .tflite models run in the ai-edge-litert interpreter and our .litertlm in the LiteRT-LM
engine (both Google's runtimes, not our code), compared with `gemma4_jax.model.apply`.

Models: `tiny` (PLE, KV sharing, sliding window 4 < the 28-token test sequence, p-RoPE, double-wide MLP) and
`tiny_moe` (MoE + dense MLP, K=V global layers). Tolerances:
- float export vs model.apply: max |logit diff| <= 1e-3 over the prefill and 16 decode steps, greedy tokens equal
  (measured ~1e-5);
- int8/int4 weights: a weight-only twin of the quantized model (same quantized weights, float compute) vs JAX
  run on the dequantized weights: <= 1e-3, greedy tokens equal (measured ~2e-5);
- the dynamic-range int8/int4 models additionally quantize activations at run time; their distance from the same
  JAX forward is only bounded against breakage (< 1.5x the logit range; measured 0.1-0.9x on these random
  tiny models, where MoE routing flips under int4).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from gemma4_jax.export import litert, litert_graph

from gemma4_jax import cli, config, model

PREFILL_LEN, CACHE_LEN, DECODE_STEPS = 16, 64, 16
PROMPT = [2, *range(300, 311)]  # BOS + 11 tokens: longer than the sliding window (4)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizer_fixture import write_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module", params=["tiny", "tiny_moe"])
def exported(request, tmp_path_factory, tokenizer_dir):
    """A float export through the CLI; (config, params, output dir)."""
    out = str(tmp_path_factory.mktemp(request.param) / "litert")
    argv = ["export", "litert", "--variant", request.param, "--tokenizer", tokenizer_dir]
    argv += ["--prefill-len", str(PREFILL_LEN), "--cache-len", str(CACHE_LEN), "-o", out]
    assert cli.main(argv) == 0
    cfg = config.get_config(request.param)
    return cfg, model.init_params(cfg, 0, jnp.float32), out


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _side(cfg, out):
    if not cfg.per_layer_input_dim:
        return {}
    return {name: _read(os.path.join(out, file)) for name, file in litert.SIDE_MODELS.items()}


def test_layout(exported):
    from ai_edge_litert.interpreter import Interpreter

    cfg, _, out = exported
    sigs = Interpreter(model_content=_read(os.path.join(out, "model.tflite"))).get_signature_list()
    assert set(sigs) == {"prefill", "decode"}
    owners = [i for i in range(cfg.num_layers) if not cfg.is_kv_reader(i)]
    assert len(owners) < cfg.num_layers or not cfg.num_kv_shared_layers
    caches = {f"kv_cache_{kv}_{i}" for i in owners for kv in "kv"}
    token_inputs = {"embeddings", "per_layer_embeddings"} if cfg.per_layer_input_dim else {"tokens"}
    for sig in sigs.values():
        assert set(sig["inputs"]) == caches | token_inputs | {"input_pos"}
        assert set(sig["outputs"]) == caches | {"logits"}
    files = set(os.listdir(out))
    expected = {"model.tflite", "model.litertlm", "export.json"}
    if cfg.per_layer_input_dim:
        expected |= {"embedder.tflite", "per_layer_embedder.tflite"}
    assert files == expected
    if cfg.per_layer_input_dim:
        ple = Interpreter(model_content=_read(os.path.join(out, "per_layer_embedder.tflite")))
        outputs = ple.get_signature_runner("per_layer_embedder")(token_ids=np.asarray([[7]], np.int32))
        assert outputs["embeddings"].shape == (1, 1, cfg.num_layers, cfg.per_layer_input_dim)


def test_float_matches_jax(exported):
    cfg, params, out = exported
    reference = litert.jax_reference(cfg, params, PROMPT, DECODE_STEPS + 1, CACHE_LEN)
    model_bytes = _read(os.path.join(out, "model.tflite"))
    err, _, got = litert.compare(cfg, model_bytes, _side(cfg, out), PREFILL_LEN, CACHE_LEN, PROMPT, reference)
    assert err <= 1e-3
    assert got == reference[2]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_matches_jax_on_dequantized_weights(exported, quant):
    cfg, params, out = exported
    bits = {"int8": 8, "int4": 4}[quant]
    float_bytes = _read(os.path.join(out, "model.tflite"))
    weights = litert_graph.graph_weights(cfg, params)
    quantized = litert_graph.quantized_like(weights, bits, 8)
    reference = litert.graph_reference(cfg, quantized, weights.embedding, PROMPT, DECODE_STEPS + 1, CACHE_LEN)
    side = _side(cfg, out)

    twin = litert.quantize(float_bytes, quant, 8, weight_only=True)
    err, _, got = litert.compare(cfg, twin, side, PREFILL_LEN, CACHE_LEN, PROMPT, reference)
    assert err <= 1e-3
    assert got == reference[2]
    # The reference really is quantized: far from the float forward.
    float_reference = litert.jax_reference(cfg, params, PROMPT, 2, CACHE_LEN)
    assert np.max(np.abs(reference[0] - float_reference[0])) > 10 * err

    dynamic = litert.quantize(float_bytes, quant, 8)
    assert len(dynamic) < len(float_bytes) * (0.6 if bits == 8 else 0.5)
    err, scale, _ = litert.compare(cfg, dynamic, side, PREFILL_LEN, CACHE_LEN, PROMPT, reference)
    assert err < litert.DYNAMIC_BOUND * scale


def test_int4_keeps_per_layer_inputs_at_8_bits(exported):
    """The PLE projections' weights stay int8 when the rest is int4 (4 bits there roughly doubles error)."""
    from ai_edge_litert.interpreter import Interpreter

    cfg, _, out = exported
    twin = litert.quantize(_read(os.path.join(out, "model.tflite")), "int4", 8, weight_only=True)
    interpreter = Interpreter(model_content=twin)
    ple, other = [], []
    for d in interpreter.get_tensor_details():
        if len(d["quantization_parameters"]["scales"]) > 1:  # per-channel quantized weights
            q_max = int(np.abs(interpreter.get_tensor(d["index"]).astype(np.int32)).max())
            # The context projection [L*P, D] is named after its fused reshape, so it is found by shape.
            context = tuple(d["shape"]) == (cfg.num_layers * cfg.per_layer_input_dim, cfg.embed_dim)
            (ple if "per_layer_input" in d["name"] or context else other).append(q_max)
    if cfg.per_layer_input_dim:
        assert len(ple) == 2 * cfg.num_layers + 1  # gate + projection per layer, the context projection
        assert all(q > 7 for q in ple)
    else:
        assert ple == []
    assert other and all(q <= 8 for q in other)


def test_litert_lm_engine_greedy_equals_jax(exported, tokenizer_dir, tmp_path):
    """The engine streams text, not ids: its greedy text must equal its own detokenization of JAX's greedy ids
    (cut at the first stop token), after it tokenized the prompt to the same ids as our tokenizer."""
    import litert_lm

    from gemma4_jax.tokenizer import load_tokenizer

    cfg, params, out = exported
    text = "The quick brown fox"
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt = [cfg.bos_id, *tokenizer.encode(text)]
    n = 10
    _, _, greedy = litert.jax_reference(cfg, params, prompt, n, CACHE_LEN)
    stops = {1, 106, 50}
    until_stop = []
    for t in greedy:
        if t in stops:
            break
        until_stop.append(t)
    assert until_stop, "the fixed prompt should produce at least one token before a stop token"

    engine = litert_lm.Engine(os.path.join(out, "model.litertlm"), max_num_tokens=CACHE_LEN, cache_dir=str(tmp_path))
    try:
        assert engine.tokenize(text) == prompt[1:]
        session = engine.create_session(
            apply_prompt_template=False,
            sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0),
            max_output_tokens=n,
        )
        session.run_prefill([text])
        generated = "".join(chunk.texts[0] for chunk in session.run_decode_async())
        session.close()
        # Byte-fallback pieces make text ambiguous across tokenizers, so the JAX ids go through the engine's own
        # detokenizer.
        expected = engine.detokenize(until_stop)
    finally:
        engine.close()
    assert generated == expected


def test_bad_arguments_write_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    argv = ["export", "litert", "--variant", "tiny", "--prefill-len", "64", "--cache-len", "16", "-o", str(out)]
    assert cli.main(argv) == 2
    assert "exceeds --cache-len" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    assert cli.main(["export", "litert", "--variant", "tiny", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
