"""LiteRT export: our .tflite models run in the ai-edge-litert interpreter and our .litertlm in the LiteRT-LM
engine (both Google's runtimes, not our code), compared with `gemma4_jax.model.apply`.

Models: `tiny` (PLE, KV sharing, sliding window 4 < the 28-token test sequence, p-RoPE, double-wide MLP) and
`tiny_moe` (MoE + dense MLP, K=V global layers). Tolerances:
- float export vs model.apply: max |logit diff| <= 1e-3 over the prefill and 16 decode steps, greedy tokens equal
  (measured ~1e-5);
- int8/int4 weights: our quantized FULLY_CONNECTED weights equal ai-edge-quantizer's dynamic recipe on the
  float export bit for bit (the independent oracle);
- a weight-only twin of the quantized export (same quantized weights and int8 tables, float compute) vs JAX
  (`litert_graph.step`) on the same weights: <= 1e-3, greedy tokens equal (measured ~1e-5);
- the dynamic-range int8/int4 models (what the export ships) additionally quantize activations at run time: vs
  the same JAX forward, max |logit diff| <= DYNAMIC_TOL x max |logit| (measured 0.0070-0.0080 of it at int8,
  0.0080-0.0124 at int4, on logits up to ~10), and greedy tokens equal on all 17 steps.
The models are trained to be decisive (tests/decisive.py: greedy continuation of PROMPT = TARGET with top-1/top-2
margins >= 6, as a real model's), so an equal greedy continuation is decided by the model and not by which way
rounding tips a random model's near-tie (asserted: margin > 2x the logit difference).
"""

from __future__ import annotations

import os

import decisive
import numpy as np
import pytest

from gemma4_jax import cli, config
from gemma4_jax.export import litert, litert_graph, runtimes

PREFILL_LEN, CACHE_LEN, DECODE_STEPS = 16, 64, 16
PROMPT = [2, *range(300, 311)]  # BOS + 11 tokens: longer than the sliding window (4)
# What the test models are trained to say after PROMPT (tests/decisive.py): the first token and the 16 decoded.
TARGET = np.random.default_rng(9).integers(107, 512, size=DECODE_STEPS + 1).tolist()
SEEDS = {"tiny": 0, "tiny_moe": 2}
# Dynamic-range models vs JAX on the same quantized weights: max |logit diff| / max |logit| (see the docstring).
DYNAMIC_TOL = {"int8": 0.02, "int4": 0.025}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizer_fixture import write_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module", params=["tiny", "tiny_moe"])
def exported(request, tmp_path_factory, tokenizer_dir):
    """A model trained to be decisive (tests/decisive.py), saved as a checkpoint and exported (float) through the
    CLI; (config, params, output dir)."""
    from gemma4_jax.hf_format import save_hf_checkpoint

    cfg = config.get_config(request.param)
    params = decisive.train_decisive(cfg, decisive.conditioned_init(cfg, SEEDS[request.param]), PROMPT, TARGET)
    root = tmp_path_factory.mktemp(request.param)
    save_hf_checkpoint(str(root / "ckpt"), cfg, params)
    out = str(root / "litert")
    argv = ["export", "litert", "--checkpoint", str(root / "ckpt"), "--tokenizer", tokenizer_dir]
    argv += ["--prefill-len", str(PREFILL_LEN), "--cache-len", str(CACHE_LEN), "-o", out]
    assert cli.main(argv) == 0
    return cfg, params, out


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _side(cfg, out):
    if not cfg.per_layer_input_dim:
        return {}
    return {name: _read(os.path.join(out, file)) for name, file in litert.SIDE_MODELS.items()}


@pytest.mark.slow
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


@pytest.mark.slow
def test_float_matches_jax(exported):
    cfg, params, out = exported
    reference = litert.jax_reference(cfg, params, PROMPT, DECODE_STEPS + 1, CACHE_LEN)
    model_bytes = _read(os.path.join(out, "model.tflite"))
    err, _, got = litert.compare(cfg, model_bytes, _side(cfg, out), PREFILL_LEN, CACHE_LEN, PROMPT, reference)
    assert err <= 1e-3
    assert got == reference[2]


def _quantized_models(cfg, params, bits, directory):
    """Our quantized export of `params` (PLE projections at 8 bits), written twice under `directory`: the
    dynamic-range model and its weight-only twin; (weights, {"dynamic"|"twin": {file: path}})."""
    weights = litert_graph.graph_weights(cfg, params, prepare=litert_graph.quantizer(cfg, bits, 8))
    converted = litert.convert_models(cfg, weights, PREFILL_LEN, CACHE_LEN)
    paths = {}
    for kind, weight_only in (("dynamic", False), ("twin", True)):
        os.makedirs(os.path.join(directory, kind))
        paths[kind] = litert.write_models(converted, os.path.join(directory, kind), weight_only=weight_only)
    return weights, paths


def _side_paths(paths):
    return {name: paths[file] for name, file in litert.SIDE_MODELS.items() if file in paths}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_matches_jax_on_quantized_weights(exported, quant, tmp_path, monkeypatch):
    cfg, params, out = exported
    bits = {"int8": 8, "int4": 4}[quant]
    if quant == "int4":  # one block per layer: the split layout full-size PLE tables need (> 2^31 elements)
        monkeypatch.setattr(litert_graph, "TABLE_PART_ELEMENTS", 1)
    weights, paths = _quantized_models(cfg, params, bits, str(tmp_path))
    if cfg.per_layer_input_dim:
        assert len(weights[litert_graph.PLE_TABLE].values) == (cfg.num_layers if quant == "int4" else 1)
    reference = litert.graph_reference(cfg, weights, PROMPT, DECODE_STEPS + 1, CACHE_LEN)
    # The weights: the twin (float compute on the same quantized weights and tables) equals JAX on them.
    twin = paths["twin"]
    err, _, got = litert.compare(
        cfg, twin["model.tflite"], _side_paths(twin), PREFILL_LEN, CACHE_LEN, PROMPT, reference
    )
    assert err <= 1e-3
    assert got == reference[2]
    # The reference really is quantized: far from the float forward.
    float_reference = litert.jax_reference(cfg, params, PROMPT, 2, CACHE_LEN)
    assert np.max(np.abs(reference[0] - float_reference[0])) > 10 * err

    dynamic = paths["dynamic"]
    for file, path in dynamic.items():
        assert os.path.getsize(path) < os.path.getsize(os.path.join(out, file)) * (0.6 if bits == 8 else 0.5)
    err, scale, got = litert.compare(
        cfg, dynamic["model.tflite"], _side_paths(dynamic), PREFILL_LEN, CACHE_LEN, PROMPT, reference
    )
    margin = decisive.top_margins(np.concatenate([reference[0][-1:], reference[1]])).min()
    print(f"{cfg.name} {quant} dynamic-range: max |dlogit| {err:.3g} = {err / scale:.3g} of max |logit| {scale:.3g}")
    print(f"{cfg.name} {quant} dynamic-range: greedy {len(got)} steps, min top-1/top-2 margin {margin:.2f}")
    assert err <= DYNAMIC_TOL[quant] * scale
    assert margin > 2 * err  # the greedy comparison is decided by the model, not by rounding
    assert got == reference[2]


def _weight_tensors(model_bytes):
    """{(subgraph, tensor name): (type, scales, zero points, axis, data bytes)} of the per-channel quantized
    tensors of a .tflite (inline or offset/size buffers)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    out = {}
    for si, sg in enumerate(m.subgraphs):
        for t in sg.tensors:
            q = t.quantization
            if q is None or q.scale is None or len(q.scale) < 2:
                continue
            buf = m.buffers[t.buffer]
            data = bytes(buf.data) if buf.data is not None else model_bytes[buf.offset : buf.offset + buf.size]
            out[(si, t.name.decode())] = (t.type, q.scale.tobytes(), tuple(q.zeroPoint), q.quantizedDimension, data)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_equal_ai_edge_quantizer(exported, quant, tmp_path):
    """Our quantized FULLY_CONNECTED weights are bit-identical (type, scales, zero points, packed data) to
    ai-edge-quantizer's dynamic recipe applied to our float export (the PLE projections at 8 bits); the float
    export holds the same float weights as constants, so both quantize the same numbers."""
    from ai_edge_quantizer import qtyping, quantizer

    cfg, params, out = exported
    bits = {"int8": 8, "int4": 4}[quant]
    q = quantizer.Quantizer(bytearray(_read(os.path.join(out, "model.tflite"))))
    fc = qtyping.TFLOperationName.FULLY_CONNECTED
    q.add_dynamic_config(".*", fc, bits)
    if bits != 8:
        q.add_dynamic_config(".*per_layer_input.*", fc, 8)
    oracle = _weight_tensors(bytes(q.quantize(enable_progress_bar=False).quantized_model))
    weights, paths = _quantized_models(cfg, params, bits, str(tmp_path))
    ours = _weight_tensors(_read(paths["dynamic"]["model.tflite"]))
    matrices = set(litert_graph.named_tensors(weights)) - {litert_graph.EMBEDDING, litert_graph.PLE_TABLE}
    assert {name for _, name in ours} == {f"{sig}_{name}" for sig in ("prefill", "decode") for name in matrices}
    assert set(ours) == set(oracle)
    for key, tensor in ours.items():
        assert tensor == oracle[key], key


@pytest.mark.slow
def test_int4_keeps_per_layer_inputs_at_8_bits(exported, tmp_path):
    """The PLE projections' weights stay int8 when the rest is int4 (4 bits there roughly doubles error)."""
    from ai_edge_litert import schema_py_generated as schema

    cfg, params, _ = exported
    _, paths = _quantized_models(cfg, params, 4, str(tmp_path))
    tensors = _weight_tensors(_read(paths["dynamic"]["model.tflite"]))
    ple = {name for _, name in tensors if "per_layer_" in name}  # input gate, projection, context projection
    if cfg.per_layer_input_dim:
        # gate + projection per layer and the context projection, in both signatures
        assert len(ple) == 2 * (2 * cfg.num_layers + 1)
    else:
        assert not ple
    for (_, name), (tensor_type, *_) in tensors.items():
        assert tensor_type == (schema.TensorType.INT8 if name in ple else schema.TensorType.INT4), name


@pytest.mark.slow
def test_litert_lm_engine_greedy_equals_jax(exported, tokenizer_dir, tmp_path):
    """The engine streams text, not ids: its greedy text must equal its own detokenization of JAX's greedy ids
    (cut at the first stop token), after it tokenized the prompt to the same ids as our tokenizer."""
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

    # Byte-fallback pieces make text ambiguous across tokenizers, so the JAX ids go through the engine's own
    # detokenizer.
    got = runtimes.engine_greedy(
        os.path.join(out, "model.litertlm"), text, n, CACHE_LEN, str(tmp_path), detokenize=[until_stop]
    )
    assert got["prompt_ids"] == prompt[1:]
    assert got["text"] == got["detokenized"][0]


@pytest.mark.slow
def test_quantized_cli_export_runs_in_engine(tokenizer_dir, tmp_path):
    """The CLI's int4 path (bf16 load, tensor-by-tensor quantization, decode-only weight-only twin check) writes
    a bundle the litert-lm engine runs (offset/size buffers, int8 lookup tables)."""
    import json

    out = str(tmp_path / "litert")
    argv = ["export", "litert", "--variant", "tiny", "--quant", "int4", "--tokenizer", tokenizer_dir]
    argv += ["--prefill-len", str(PREFILL_LEN), "--cache-len", str(CACHE_LEN), "-o", out]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "export.json")) as f:
        check = json.load(f)["check"]
    assert check["weights_max_abs_logit_diff"] <= 1e-3
    assert set(os.listdir(out)) == {"model.tflite", "model.litertlm", "export.json", *litert.SIDE_MODELS.values()}
    got = runtimes.engine_greedy(
        os.path.join(out, "model.litertlm"), "The quick brown fox", 4, CACHE_LEN, str(tmp_path)
    )
    assert got["text"]


def test_bad_arguments_write_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    argv = ["export", "litert", "--variant", "tiny", "--prefill-len", "64", "--cache-len", "16", "-o", str(out)]
    assert cli.main(argv) == 2
    assert "exceeds --cache-len" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", "litert", "--variant", "tiny", "-o", str(out)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_float_export_of_random_weights_checks_itself(tokenizer_dir, tmp_path):
    """The default tier's LiteRT path: a float export of random weights, which the exporter runs in the interpreter
    against model.apply before writing anything (the slow tests check trained models in depth)."""
    import json

    out = str(tmp_path / "litert")
    argv = ["export", "litert", "--variant", "tiny", "--tokenizer", tokenizer_dir, "--prefill-len", "16"]
    assert cli.main([*argv, "--cache-len", "64", "-o", out]) == 0
    with open(os.path.join(out, "export.json")) as f:
        check = json.load(f)["check"]
    assert check["max_abs_logit_diff"] <= 1e-3 and check["litert_greedy"] == check["jax_greedy"]
    assert set(os.listdir(out)) == {"model.tflite", "model.litertlm", "export.json", *litert.SIDE_MODELS.values()}
