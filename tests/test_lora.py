"""LoRA fine-tuning (gemma4_jax.train): adapters as weight objects, merge, PEFT export, training, resume, data.

Tolerances: merged vs adapted forward in f32 1e-5 max-abs on O(5) logits (only summation order differs);
PEFT export vs transformers + peft in f64 1e-9 (as the HF parity tests: two correct implementations agree to
~1e-13 there), the MoE expert stacks' adapters included (logits and gradients); resumed vs uninterrupted losses
rtol 1e-6 (same programs on the same CPU, float32).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizer_fixture import write_tokenizer

from gemma4_jax import config, model
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.train import data, loop, lora

CFG = config.TINY_E2B  # PLE, KV sharing (layers 5..8 read layers 2 and 4), sliding window, double-wide MLP
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side!"),
    ("Translate good morning into German.", "Guten Morgen."),
    ("Write a short poem about the sea.", "The sea is wide and blue."),
    ("What does get_weather take?", "A location string."),
]
ALL_TARGETS = lora.DEFAULT_TARGETS + lora.PLE_MODULES
MOE_TARGETS = lora.DEFAULT_TARGETS + lora.EXPERT_PARAMETERS


def _all_targets(cfg):
    return ALL_TARGETS if cfg.per_layer_input_dim else MOE_TARGETS if cfg.num_experts else lora.DEFAULT_TARGETS


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    write_tokenizer(str(root / "tok"))
    with open(root / "chat.jsonl", "w") as f:
        for q, a in QA:
            f.write(json.dumps(_chat(q, a)) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer(files):
    from gemma4_jax.tokenizer import load_tokenizer

    return load_tokenizer(str(files / "tok"))


def _random_adapters(cfg, lora_cfg, seed=1, scale=0.1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = lora.init_adapters(cfg, lora_cfg, 0)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale, dtype), shapes)


forward = jax.jit(model.apply, static_argnames=("config",))


# ----- adapters, merge, PEFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param("tiny", "float32", marks=pytest.mark.slow),
        ("tiny", "float64"),
        ("tiny_keqv", "float64"),
        ("tiny_moe", "float64"),
    ],
)
def test_merged_forward_equals_adapted_forward(name, dtype):
    """f64: equal to 1e-12. f32: max-abs <= 1e-5 x max|logit| (~4e-5 here): merely re-rounding each merged weight
    by <= 1/2 ulp already moves this random 9-layer model's logits by 1.3e-5 (measured), so an absolute 1e-5
    is below f32's floor. The f32 ratio over init seeds 0-5 is 3.7e-6 - 1.07e-5 (seed 0 is the tail, seed 1:
    4.0e-6); the weights are drawn from seed 1."""
    cfg = config.get_config(name)
    lora_cfg = lora.LoraConfig(rank=4, alpha=8, targets=_all_targets(cfg))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with jax.enable_x64(dtype == "float64"):
        params = model.init_params(cfg, 1, jnp.dtype(dtype))
        adapters = _random_adapters(cfg, lora_cfg, scale=0.03, dtype=jnp.dtype(dtype))
        adapted, _ = forward(lora.attach(params, adapters, cfg, lora_cfg), tokens, config=cfg)
        merged, _ = forward(lora.merge(params, adapters, cfg, lora_cfg), tokens, config=cfg)
        base, _ = forward(params, tokens, config=cfg)
    adapted, merged, base = (np.asarray(x) for x in (adapted, merged, base))
    assert np.max(np.abs(adapted - base)) > 0.1  # the adapters matter
    bound = 1e-12 if dtype == "float64" else 1e-5 * np.max(np.abs(merged))
    assert np.max(np.abs(adapted - merged)) <= bound


@pytest.mark.slow
def test_qlora_int8_base():
    """A quantized base (QLoRA): the adapted forward equals the merged forward of the dequantized base."""
    from gemma4_jax import quant

    lora_cfg = lora.LoraConfig(rank=4, alpha=8)
    params = model.init_params(CFG, 0, jnp.float32)
    qparams = quant.quantize_params(params, CFG, quant.JaxPolicy("int8"))
    adapters = _random_adapters(CFG, lora_cfg)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    adapted, _ = forward(lora.attach(qparams, adapters, CFG, lora_cfg), tokens, config=CFG)
    merged = lora.merge(qparams, adapters, CFG, lora_cfg, dtype=jnp.float32)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged["layer_0"]["attn"]))
    expected, _ = forward(quant.dequantize_params(lora.merge(qparams, adapters, CFG, lora_cfg)), tokens, config=CFG)
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(expected), atol=1e-4, rtol=0)


def test_adapter_count_matches_theory():
    """r·(in + out) per HF module, written out from the config (independent of the code's role tables)."""
    lora_cfg = lora.LoraConfig(rank=8, alpha=16, targets=ALL_TARGETS)
    adapters = lora.init_adapters(CFG, lora_cfg)
    r, d, n, p = 8, CFG.embed_dim, CFG.num_heads, CFG.per_layer_input_dim
    total = 0
    for i in range(CFG.num_layers):
        h, k, f = CFG.layer_head_dim(i), CFG.layer_kv_heads(i), CFG.layer_ffw_hidden(i)
        total += r * (d + n * h) * 2  # q_proj, o_proj
        total += 0 if CFG.is_kv_reader(i) else 2 * r * (d + k * h)  # k_proj, v_proj (readers have none)
        total += 2 * r * (d + f) + r * (f + d)  # gate, up, down
        total += 2 * r * (d + p)  # per_layer_input_gate, per_layer_projection
    assert lora.count(adapters) == total == lora.expected_count(CFG, lora_cfg)
    # B starts at zero: training starts exactly at the base model
    assert not any(np.any(np.asarray(t["b"])) for t in _factor_dicts(adapters))


def test_expert_adapter_count_matches_theory():
    """Per MoE layer, one adapter per expert on each stack: E·r·(D + 2F) for gate_up_proj [E, 2F, D] and
    E·r·(F + D) for down_proj [E, D, F]."""
    cfg = config.get_config("tiny_moe")
    lora_cfg = lora.LoraConfig(rank=3, targets=lora.EXPERT_PARAMETERS)
    r, d, e, f = 3, cfg.embed_dim, cfg.num_experts, cfg.expert_hidden
    adapters = lora.init_adapters(cfg, lora_cfg)
    assert lora.count(adapters) == lora.expected_count(cfg, lora_cfg) == cfg.num_layers * e * r * (d + 2 * f + f + d)
    a, b = (adapters["layer_0"]["mlp"]["gating_einsum"]["w"][k].shape for k in "ab")
    assert a == (e, d, r) and b == (e, r, 2, f)


def _factor_dicts(tree):
    if "a" in tree:
        return [tree]
    return [d for v in tree.values() for d in _factor_dicts(v)]


def test_target_patterns():
    from gemma4_jax import cli

    assert cli.DEFAULT_TARGETS == lora.DEFAULT_TARGETS
    only_q = lora.select_targets(CFG, lora.LoraConfig(targets=("layers.[0-2].self_attn.q_proj",)))
    assert [t.layer for t in only_q] == [0, 1, 2]
    with pytest.raises(Gemma4Error, match="share one weight"):
        lora.select_targets(CFG, lora.LoraConfig(targets=("k_proj",)))
    with pytest.raises(Gemma4Error, match="match no module"):
        lora.select_targets(CFG, lora.LoraConfig(targets=("q_proj", "qkv")))
    # MoE: the bare name down_proj is the dense MLP's module (as PEFT's target_modules); the expert stacks are
    # parameters, selected by their own names or a full pattern
    moe = config.get_config("tiny_moe")
    paths = {"/".join(t.path[1:]) for t in lora.select_targets(moe, lora.LoraConfig(targets=("down_proj",)))}
    assert paths == {"mlp2/linear"}
    only = lora.select_targets(moe, lora.LoraConfig(targets=("experts.down_proj",)))
    assert {"/".join(t.path[1:]) for t in only} == {"mlp/linear/w"} and len(only) == moe.num_layers
    assert [t.layer for t in lora.select_targets(moe, lora.LoraConfig(targets=("layers.1.experts.*",)))] == [1, 1]
    with pytest.raises(Gemma4Error, match="dropout is not supported on the MoE experts"):
        lora.select_targets(moe, lora.LoraConfig(dropout=0.1, targets=lora.EXPERT_PARAMETERS))
    with pytest.raises(Gemma4Error, match="match no module"):
        lora.select_targets(CFG, lora.LoraConfig(targets=lora.EXPERT_PARAMETERS))  # a dense model has none


@pytest.mark.slow
def test_reader_layers_train_source_kv_adapters():
    """Adapters on a source layer's K/V get gradient from the KV-shared readers (no cache on this path).

    Layer 2's own attention output is switched off (attn_vec_einsum = 0), so its K/V reach the loss only
    through readers 5 and 8; the gradient must be non-zero and match central finite differences (f64)."""
    lora_cfg = lora.LoraConfig(rank=2, alpha=2, targets=("layers.2.self_attn.[kv]_proj",))
    with jax.enable_x64(True):
        params = model.init_params(CFG, 0, jnp.float64)
        params["layer_2"]["attn"]["attn_vec_einsum"]["w"] = jnp.zeros_like(
            params["layer_2"]["attn"]["attn_vec_einsum"]["w"]
        )
        adapters = _random_adapters(CFG, lora_cfg, dtype=jnp.float64)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 10)))

        def loss(ad):
            logits, _ = model.apply(lora.attach(params, ad, CFG, lora_cfg), tokens[:, :-1], config=CFG)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        grads = jax.jit(jax.grad(loss))(adapters)
        g = grads["layer_2"]["attn"]["kv_einsum"]["w"]
        assert float(jnp.max(jnp.abs(g["a"]))) > 1e-6 and float(jnp.max(jnp.abs(g["b"]))) > 1e-6
        direction = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(3).standard_normal(x.shape)), adapters)
        eps = 1e-5
        plus = jax.tree.map(lambda a, d: a + eps * d, adapters, direction)
        minus = jax.tree.map(lambda a, d: a - eps * d, adapters, direction)
        numeric = float((jax.jit(loss)(plus) - jax.jit(loss)(minus)) / (2 * eps))
        analytic = float(
            sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))
        )
    assert abs(analytic) > 1e-6
    assert abs(analytic - numeric) <= 1e-6 * abs(analytic), (analytic, numeric)


@pytest.mark.slow
def test_peft_export_matches_transformers_peft(tmp_path):
    import torch
    from hf_reference import full_float64, hf_model
    from peft import PeftModel

    from gemma4_jax import hf_format

    hf = hf_model(CFG, seed=0)
    hf.save_pretrained(tmp_path / "base")
    lora_cfg = lora.LoraConfig(rank=4, alpha=12, targets=ALL_TARGETS)
    adapters = _random_adapters(CFG, lora_cfg)
    lora.save_peft(str(tmp_path / "adapter"), CFG, adapters, lora_cfg)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16))

    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).double().eval()
    n_lora = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    assert n_lora == lora.count(adapters)
    with torch.no_grad(), full_float64():
        expected = peft_model(torch.tensor(tokens)).logits.numpy()
    with jax.enable_x64(True):
        _, params = hf_format.load_hf_checkpoint(str(tmp_path / "base"), dtype=jnp.float64)
        loaded, loaded_cfg = lora.load_peft(str(tmp_path / "adapter"), CFG)
        assert loaded_cfg == lora_cfg
        loaded = jax.tree.map(lambda x: x.astype(jnp.float64), loaded)
        ours, _ = forward(lora.attach(params, loaded, CFG, lora_cfg), tokens, config=CFG)
        base, _ = forward(params, tokens, config=CFG)
    assert np.max(np.abs(np.asarray(ours) - np.asarray(base))) > 0.1
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-9, rtol=0)


def test_adapter_config_is_plain_peft_and_keeps_our_patterns(tmp_path):
    """adapter_config.json holds only keys peft's LoraConfig has (an unknown one makes peft warn and tell the user to
    upgrade); our target patterns ride in the weights' metadata and come back as the same LoraConfig, and adapters
    written before that (the patterns in adapter_config.json) still load the same."""
    import dataclasses

    import peft

    from gemma4_jax import files

    lora_cfg = lora.LoraConfig(rank=2, alpha=3, targets=("layers.[0-2].self_attn.q_proj", "down_proj"))
    adapters = _random_adapters(CFG, lora_cfg)
    directory = tmp_path / "adapter"
    lora.save_peft(str(directory), CFG, adapters, lora_cfg)
    written = json.loads((directory / lora.PEFT_CONFIG).read_text())
    assert set(written) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert isinstance(written["target_modules"], str)  # a regex: the patterns are not in it
    loaded, loaded_cfg = lora.load_peft(str(directory), CFG)
    assert loaded_cfg == lora_cfg
    # as written before 2026-12-05
    weights = str(directory / lora.PEFT_WEIGHTS)
    st = files.SafetensorsDir(weights)
    assert json.loads(st.metadata[lora.TARGETS_METADATA]) == list(lora_cfg.targets)
    files.save_safetensors(weights, {name: st.read(name) for name in st.names()}, {"format": "pt"})
    files.write_json(str(directory / lora.PEFT_CONFIG), {**written, lora.TARGETS_METADATA: list(lora_cfg.targets)})
    older, older_cfg = lora.load_peft(str(directory), CFG)
    assert older_cfg == lora_cfg
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(older), jax.tree.leaves(loaded), strict=True))
    # peft's own kind (neither): the modules in the file, by exact name
    files.write_json(str(directory / lora.PEFT_CONFIG), written)
    _, peft_cfg = lora.load_peft(str(directory), CFG)
    assert sorted(peft_cfg.targets) == sorted(
        [f"layers.{i}.self_attn.q_proj" for i in range(3)] + [f"layers.{i}.mlp.down_proj" for i in range(9)]
    )


# ----- data -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_moe_expert_adapters_match_transformers_peft(tmp_path):
    """26B-A4B's expert stacks as PEFT `target_parameters` (peft's ParamWrapper, one adapter per expert): our
    export loads into peft, peft's own adapter file loads into ours, and the adapted logits and the loss's
    gradients w.r.t. every factor (experts and attention/MLP alike) agree with transformers + peft in float64."""
    import peft
    import torch
    from hf_reference import full_float64, hf_model

    from gemma4_jax import hf_format

    cfg = config.get_config("tiny_moe")
    hf = hf_model(cfg, seed=0)
    hf.save_pretrained(tmp_path / "base")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    with jax.enable_x64(True):
        _, params = hf_format.load_hf_checkpoint(str(tmp_path / "base"), dtype=jnp.float64)

    def ours(adapters, lora_cfg):
        def loss(ad):
            logits, _ = model.apply(lora.attach(params, ad, cfg, lora_cfg), tokens, config=cfg)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)), logits

        with jax.enable_x64(True):
            adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), adapters)
            grads, logits = jax.jit(jax.grad(loss, has_aux=True))(adapters)
        return np.asarray(logits), lora.to_peft(cfg, jax.tree.map(np.asarray, grads), dtype=np.float64)

    def theirs(peft_model):
        peft_model = peft_model.double()
        with full_float64():
            logits = peft_model(torch.tensor(tokens)).logits
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            loss = -torch.gather(logp, -1, torch.tensor(tokens)[:, 1:, None]).mean()
            loss.backward()
        grads = {n.replace(".default", ""): p.grad.numpy() for n, p in peft_model.named_parameters() if "lora_" in n}
        return logits.detach().numpy(), grads

    def agree(a, b):
        (logits_a, grads_a), (logits_b, grads_b) = a, b
        np.testing.assert_allclose(logits_a, logits_b, atol=1e-9, rtol=0)
        assert sorted(grads_a) == sorted(grads_b)
        scale = max(np.max(np.abs(g)) for g in grads_b.values())
        assert scale > 1e-3
        for name in grads_b:
            np.testing.assert_allclose(grads_a[name], grads_b[name], atol=1e-9 * scale, rtol=0, err_msg=name)

    # our adapters (every expert stack, one layer's gate_up only, q_proj) -> PEFT files -> transformers + peft
    lora_cfg = lora.LoraConfig(
        rank=3, alpha=6, targets=("q_proj", "experts.down_proj", "layers.1.experts.gate_up_proj")
    )
    # float32 values, as the PEFT file holds them: both sides compute in float64 from the same numbers
    adapters = _random_adapters(cfg, lora_cfg)
    lora.save_peft(str(tmp_path / "ours"), cfg, adapters, lora_cfg)
    written = json.loads((tmp_path / "ours" / lora.PEFT_CONFIG).read_text())
    assert written["target_parameters"] == ["layers.0.experts.down_proj", "layers.1.experts.gate_up_proj",
                                            "layers.1.experts.down_proj", "layers.2.experts.down_proj",
                                            "layers.3.experts.down_proj", "layers.4.experts.down_proj",
                                            "layers.5.experts.down_proj"]  # fmt: skip
    peft_model = peft.PeftModel.from_pretrained(hf_model(cfg, seed=0), str(tmp_path / "ours"), is_trainable=True)
    result = ours(adapters, lora_cfg)
    agree(result, theirs(peft_model))
    with jax.enable_x64(True):
        base, _ = forward(params, tokens, config=cfg)
    assert np.max(np.abs(result[0] - np.asarray(base))) > 0.1  # the adapters matter

    # peft's own adapter (both stacks everywhere; random B) -> our load_peft
    torch.manual_seed(1)
    config_peft = peft.LoraConfig(r=2, lora_alpha=5, target_parameters=list(lora.EXPERT_PARAMETERS))
    peft_model = peft.get_peft_model(hf_model(cfg, seed=0), config_peft)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded, loaded_cfg = lora.load_peft(str(tmp_path / "theirs"), cfg)
    assert loaded_cfg.rank == 2 and sorted(loaded_cfg.targets) == sorted(lora.EXPERT_PARAMETERS)
    agree(ours(loaded, loaded_cfg), theirs(peft_model))


def test_chat_loss_mask_covers_only_answers(tokenizer):
    example = data.chat_example(tokenizer, _chat(*QA[0])["messages"] + _chat(*QA[1])["messages"])
    learned = [int(t) for t, w in zip(example.tokens, example.weights, strict=True) if w]
    expected = tokenizer.encode(QA[0][1] + "<turn|>") + tokenizer.encode(QA[1][1] + "<turn|>")
    assert learned == expected


def test_packing_keeps_examples_apart(tokenizer):
    examples = [data.chat_example(tokenizer, _chat(q, a)["messages"]) for q, a in QA]
    rows = data.pack(examples, 128)
    assert len(rows) < len(examples)  # several examples share a row
    for r in range(len(rows)):
        for s in set(rows.segments[r].tolist()) - {0}:
            where = rows.segments[r] == s
            assert rows.positions[r][where].tolist() == list(range(int(where.sum())))
        assert np.all(rows.positions[r][rows.segments[r] == 0] == -1)
    assert rows.weights.sum() == sum(e.weights[1:].sum() for e in examples)
    # a packed row scores exactly like its examples run one by one (f64: only masking can make a difference)
    with jax.enable_x64(True):
        params = model.init_params(CFG, 0, jnp.float64)
        packed, _ = forward(params, rows.inputs[:1], rows.positions[:1], config=CFG, segments=rows.segments[:1])
        start = 0
        for e in examples[: int(rows.segments[0].max())]:
            alone, _ = forward(params, e.tokens[None, :-1], config=CFG)
            n = len(e.tokens) - 1
            np.testing.assert_allclose(np.asarray(packed)[0, start : start + n], np.asarray(alone)[0], atol=1e-12)
            start += n


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{oops"],
            r":2: invalid JSON",
        ),
        (['{"messages": []}'], r":1: 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r":1: no assistant/model message"),
        (
            ['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}'],
            "'content' must be",
        ),
        (['{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}'], "string 'role'"),
        (
            ['{"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]}'],
            "list of text/image/audio parts",
        ),
        (
            [
                '{"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}, '
                '{"role": "assistant", "content": "x"}]}'
            ],
            r":1: message 0: image file not found: .*nope\.png",
        ),
        (["[1, 2]"], r':1: expected \{"messages"'),
        ([], "no training examples"),
        ([json.dumps(_chat("a long question " * 20, "a long answer " * 20))], "all 1 chats are longer"),
    ],
)
def test_bad_data(tokenizer, tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(Gemma4Error, match=message):
        data.load_dataset([str(path)], tokenizer, 64, config.get_config("tiny_mm"))


def test_overlong_chats_are_dropped_and_text_is_windowed(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [_chat(*QA[0]), _chat("a long question " * 20, "a long answer " * 20), {"text": "The sea is wide. " * 30}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = data.load_dataset([str(path)], tokenizer, 40)
    assert ds.dropped == 1 and len(ds.examples[0].tokens) <= 41
    doc = [*tokenizer.encode("The sea is wide. " * 30, add_bos=True), tokenizer.eos_id]
    windows = ds.examples[1:]
    assert len(windows) > 1 and all(len(w.tokens) <= 41 for w in windows)
    # every document token after the first is a target exactly once
    assert sum(int(w.weights.sum()) for w in windows) == len(doc) - 1


# ----- training ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_overfits_chats_and_greedy_generation_reproduces_an_answer(files, tokenizer, tmp_path, capsys):
    from gemma4_jax.sampler import Sampler

    ds = data.load_dataset([str(files / "chat.jsonl")], tokenizer, 64)
    rows = data.pack(ds.examples, 64)
    lora_cfg = lora.LoraConfig(rank=16, alpha=32)
    tc = loop.TrainConfig(steps=80, batch=len(rows), seq_len=64, lr=1e-2, warmup_steps=5, save_every=80, eval_every=80)
    base = model.init_params(CFG, 0, jnp.float32)
    result = loop.train(CFG, base, rows, None, lora_cfg, tc, str(tmp_path / "run"))
    first, last = result.losses[1], result.losses[tc.steps]
    assert last <= 0.1 * first, (first, last)

    out = capsys.readouterr().out
    n = lora.count(result.adapters)
    assert f"adapter parameters: {n:,}" in out
    # AdamW state: two f32 moments per adapter parameter + two int32 step counters (adam's and the schedule's)
    assert f"optimizer state: {8 * n + 2 * 4:,} bytes" in out

    merged = lora.merge(base, result.adapters, CFG, lora_cfg)
    question, answer = QA[0]
    prompt = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    generated = Sampler(CFG, merged).generate([prompt], max_new_tokens=24)
    assert tokenizer.decode(generated.tokens[0]) == answer
    assert generated.finish_reasons[0] == "stop"  # it ended on <turn|>


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(files, tokenizer, tmp_path):
    ds = data.load_dataset([str(files / "chat.jsonl")], tokenizer, 64)
    rows = data.pack(ds.examples, 64)
    base = model.init_params(CFG, 0, jnp.float32)
    lora_cfg = lora.LoraConfig(rank=16, alpha=32)
    # A learning rate of 1e30 makes the second step's adapters overflow.
    tc = loop.TrainConfig(steps=80, batch=len(rows), seq_len=64, lr=1e30, warmup_steps=0, save_every=1, eval_every=80)
    with pytest.raises(Gemma4Error, match=r"non-finite training loss .* at step (\d+).*last good checkpoint is step"):
        loop.train(CFG, base, rows, None, lora_cfg, tc, str(tmp_path / "run"))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit())
    assert steps
    restored = loop.latest_adapters(str(tmp_path / "run"), CFG, lora_cfg, tc)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored))


def _finetune_cmd(files, out, steps):
    return [
        sys.executable, "-m", "gemma4_jax.cli", "finetune", "--variant", "tiny", "--dtype", "f32",
        "--tokenizer", str(files / "tok"), "--data", str(files / "chat.jsonl"), "--eval-fraction", "0.2",
        "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--steps", str(steps), "--batch", "1", "--grad-accum", "2",
        "--seq-len", "64", "--lr", "3e-3", "--save-every", "5", "--eval-every", "10", "-o", str(out),
    ]  # fmt: skip


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(files, tmp_path):
    """SIGKILL after a checkpoint, `--resume`: the per-step losses equal an uninterrupted run's (dropout,
    accumulation, eval and data order included)."""
    steps = 20
    # The CLI's compilation cache (on for users, off for the tests) in a directory of this test's own: the killed,
    # resumed and merge runs load what the first run compiled, as a user's second run would.
    env = dict(os.environ, GEMMA4_JAX_CACHE=str(files / "jax-cache"))
    whole = tmp_path / "whole"
    done = subprocess.run(_finetune_cmd(files, whole, steps), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    n = int(re.search(r"adapter parameters: ([\d,]+)", done.stdout).group(1).replace(",", ""))
    assert n == lora.expected_count(CFG, lora.LoraConfig(rank=4, alpha=8))
    assert f"optimizer state: {8 * n + 8:,} bytes" in done.stdout
    expected = _losses(whole)
    assert sorted(expected) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _finetune_cmd(files, killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "5").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = sorted(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
    assert complete and max(complete) < steps, complete  # killed mid-run, after a checkpoint
    # orbax wrote each checkpoint to a temporary directory renamed when complete; a half-written one is ignored
    assert all(s.isdigit() or ".orbax-checkpoint-tmp" in s for s in os.listdir(killed / "checkpoints"))
    resumed = subprocess.run(
        [*_finetune_cmd(files, killed, steps), "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {max(complete)}" in resumed.stdout
    got = _losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose(
        [got[s] for s in range(1, steps + 1)], [expected[s] for s in range(1, steps + 1)], rtol=1e-6
    )

    # merge: the adapters fold into a normal checkpoint that loads and scores like base + adapters
    merged_dir = tmp_path / "merged"
    merge = subprocess.run(
        [sys.executable, "-m", "gemma4_jax.cli", "merge", "--variant", "tiny", "--dtype", "f32",
         "--adapter", str(killed), "-o", str(merged_dir)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert merge.returncode == 0, merge.stderr
    from gemma4_jax import hf_format

    _, merged = hf_format.load_hf_checkpoint(str(merged_dir), dtype=jnp.float32)
    base = model.init_params(CFG, 0, jnp.float32)
    adapters, lora_cfg = lora.load_peft(str(killed), CFG)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    adapted, _ = forward(lora.attach(base, adapters, CFG, lora_cfg), tokens, config=CFG)
    via_file, _ = forward(merged, tokens, config=CFG)
    # f32 floor: see test_merged_forward_equals_adapted_forward
    assert np.max(np.abs(np.asarray(via_file) - np.asarray(adapted))) <= 1e-5 * np.max(np.abs(np.asarray(adapted)))


def test_cli_bad_data_is_one_error_and_writes_nothing(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_chat("q", "a")) + "\nnot json\n")
    out = tmp_path / "out"
    cmd = _finetune_cmd(files, out, 5)
    cmd[cmd.index(str(files / "chat.jsonl"))] = str(bad)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"gemma4-jax: error: {bad}:2: invalid JSON")
    assert not out.exists()


# ----- images and audio in the data ----------------------------------------------------------------------------


def _media_files(root):
    """A photo, a tone and a JSONL of chats whose user turns hold them (paths relative to the JSONL)."""
    import shutil

    import soundfile
    from skimage import data as skimage_data

    shutil.copy(os.path.join(skimage_data.data_dir, "coffee.png"), root / "coffee.png")
    soundfile.write(str(root / "tone.wav"), (0.3 * np.sin(np.arange(12_000) / 4)).astype(np.float32), 16_000)

    def turn(parts, answer):
        return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}

    image, clip = {"type": "image", "image": "coffee.png"}, {"type": "audio", "audio": "tone.wav"}
    rows = {
        "images": [
            turn([image, {"type": "text", "text": "What is this?"}], "A cup of coffee."),
            turn([{"type": "text", "text": "Compare"}, image, image], "They are the same."),
        ],
        "audio": [
            turn([clip, {"type": "text", "text": "What do you hear?"}], "A tone."),
            turn([image, clip], "Coffee and a tone."),
        ],
    }
    for name, chats in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


@pytest.mark.parametrize("name, data_file", [("tiny_mm", "audio"), ("tiny_mm_bidi", "images")])
def test_media_chats_pack_and_score_like_single_prompts(files, tokenizer, name, data_file):
    """Chats with images (and audio) load with their slots widened (never targets), and a packed row of them scores
    exactly like each chat run alone with its soft tokens (float64): the slots, their embeddings and the image
    blocks (bidirectional on the 31B-style config) travel through packing intact."""
    from gemma4_jax import multimodal

    cfg = config.get_config(name)
    root = _media_files(files)
    ds = data.load_dataset([str(root / f"{data_file}.jsonl")], tokenizer, 256, cfg, image_tokens=70)
    answer = {"images": "A cup of coffee.", "audio": "A tone."}[data_file]
    plain = [data.chat_example(tokenizer, _chat("x", answer)["messages"])]
    for example in ds.examples:
        slots = np.isin(example.tokens, [cfg.image_token_id, cfg.audio_token_id])
        assert slots.sum() == sum(m.num_tokens for m in example.media) and not example.weights[slots].any()
    learned = [t for t, w in zip(ds.examples[0].tokens, ds.examples[0].weights, strict=True) if w]
    assert learned == [t for t, w in zip(plain[0].tokens, plain[0].weights, strict=True) if w]
    with jax.enable_x64(True):
        params = model.init_params(cfg, 0, jnp.float64)
        data.embed_media(ds.examples, params, cfg)
        rows = data.pack(ds.examples, 256)
        assert len(rows) == 1  # both chats share the row
        batch = rows.take(np.array([0]))
        packed, _ = forward(
            params, batch["inputs"], batch["positions"], config=cfg, segments=batch["segments"],
            soft_tokens=batch["soft_tokens"], soft_mask=batch["soft_mask"], blocks=batch["blocks"],
        )  # fmt: skip
        start = 0
        for e in ds.examples:
            n = len(e.tokens) - 1
            tokens, mask, blocks = multimodal.batch([e.soft], len(e.tokens), jnp.float64)
            alone, _ = forward(
                params, e.tokens[None, :-1], config=cfg,
                soft_tokens=tokens[:, :-1], soft_mask=mask[:, :-1], blocks=blocks[:, :-1],
            )  # fmt: skip
            np.testing.assert_allclose(np.asarray(packed)[0, start : start + n], np.asarray(alone)[0], atol=1e-12)
            start += n
    assert len(set(batch["blocks"][0][batch["blocks"][0] >= 0].tolist())) == {"images": 3, "audio": 1}[data_file]


@pytest.mark.slow
def test_finetune_on_image_and_audio_chats(files, tmp_path, capsys):
    """`gemma4-jax finetune` on chats with images and audio (towers frozen, LoRA on the text decoder): the loss
    falls, and the adapters touch only the text decoder."""
    from gemma4_jax import cli, hf_format

    root = _media_files(files)
    cfg = config.get_config("tiny_mm")
    ckpt = str(tmp_path / "base")
    base = model.init_params(cfg, 0, jnp.float32)
    hf_format.save_hf_checkpoint(ckpt, cfg, base)
    write_tokenizer(ckpt)
    out = str(tmp_path / "run")
    argv = ["finetune", "--checkpoint", ckpt, "--data", str(root / "audio.jsonl"), "--image-tokens", "70",
            "--seq-len", "256", "--steps", "30", "--batch", "1", "--lr", "1e-2", "--rank", "8", "--eval-fraction", "0",
            "-o", out, "--dtype", "f32"]  # fmt: skip
    assert cli.main(argv) == 0
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0], losses
    adapters, _ = lora.load_peft(out, cfg)
    assert adapters and all(key.startswith("layer_") for key in adapters)  # only the text decoder is adapted
