"""GGUF export: llama.cpp (through llama-cpp-python) loads our files and computes what our JAX model computes.

For each tiny model -- (a) `tiny` (PLE, KV sharing, double-wide MLP on the shared layers, sliding window 4 < the
sequence), (b) `tiny_keqv` (K=V global layers), (c) `tiny_moe` -- trained to be decisive as a real model is: from
the seed's random f32 init, all parameters are trained (Adam, a few seconds) until the greedy continuation of the
16-token PROMPT is the 8-token TARGET with a top-1/top-2 logit margin >= decisive.MARGIN on every step:
- f32 file: llama.cpp's logits on PROMPT equal `model.apply` on the original params to F32_TOL, and to
  F32_TOL_SAME_GELU (1e-3) when our forward uses llama.cpp's f16 GELU table (see F32_TOL).
- f16 / bf16 / q8_0 / q4_0 files: llama.cpp's logits equal `model.apply` on the weights read back from the file
  and dequantized by gguf-py (`gguf.quants.dequantize`, an independent decoder) to QUANT_TOL[quant]. The
  tolerances cover what llama.cpp does beyond our dequantized forward: its CPU matmuls round the activations
  to the weight's dot-product type (f16 for F16, bf16 for BF16, Q8_0 blocks for Q8_0/Q4_0 weights), and its GELU
  is an f16 table. At q4_0 the agreement must also be much tighter than the quantization's own effect on the
  logits, so the comparison sees that llama.cpp used the 4-bit weights we wrote.
- Greedy continuations (llama.cpp's greedy sampler vs our `Sampler` at temperature 0) are identical on all 8
  steps at every quantization, and every step's top-1/top-2 margin exceeds twice the measured logit difference
  (asserted), so the agreement is decided by the model and not by which way rounding tips a near-tie. (On the
  untrained random weights the margins were smaller than llama.cpp's activation rounding at 8 bits and below;
  on the untrained `tiny_moe` at bf16 that rounding even swapped a router near-tie -- 2nd/3rd expert
  probabilities 0.186 / 0.182 -- and the logits differed by 1.9. With the rounding copied into our forward the
  experts and logits agreed to 1e-6: llama.cpp's bf16 MoE kernels are right.)
  At f32 the continuation is TARGET. The same holds for a merged LoRA fine-tune of the trained `tiny_keqv`.
- The file read back with `gguf.GGUFReader` has the metadata, tokenizer, tensor names, shapes and storage types
  we intend; bf16 checkpoints export their exact values.
- A SIGKILLed export leaves nothing at the destination; bad input gives one error line and writes nothing;
  configs whose KV sharing llama.cpp cannot express are refused.

llama.cpp runs with f32 K/V caches and without flash attention, so the f32 comparison is not limited by cache
rounding.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import decisive
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import llama_cpp_gelu
from tokenizer_fixture import write_tokenizer

from gemma4_jax import cli, config, hf_format, model, param_spec
from gemma4_jax.export import gguf as gguf_export
from gemma4_jax.export.runtimes import llama_run
from gemma4_jax.sampler import Sampler, SamplingConfig

# llama.cpp's CPU GELU is a float16 lookup table (GGML_GELU_FP16 in ggml-cpu/vec.h: input rounded to f16, output
# an f16 table entry), the one thing its f32 forward computes differently from an exact GELU: with each GELU taken
# at llama.cpp's own input through its table, our logits equal its logits to <= 4e-6 (measured by dumping its graph
# nodes). Hence two f32 bounds: against `model.apply` as is (exact GELU), measured 9.7e-4 .. 1.4e-3 on the trained
# test models at logit std 1.1 on one machine and 9.9e-4 .. 2.11e-3 on another (AVX2 without AVX-512: llama.cpp
# is built for the host CPU, and the same code at 51061a4 gave 2.11e-3 there); and against `model.apply` with
# llama.cpp's GELU table swapped in (references.llama_cpp_gelu), measured 1.3e-5 .. 5e-4 -- what is left there is
# f16 rounding-midpoint flips of GELU inputs that differ by f32 summation order (~1e-6).
F32_TOL = 3e-3
F32_TOL_SAME_GELU = 1e-3
# max |llama.cpp - JAX(dequantized weights)|; llama.cpp rounds the matmul activations (f16 / bf16 / Q8_0 blocks).
# Measured maxima over the three trained models: f16 3.5e-3, bf16 2.2e-2, q8_0 7.6e-2, q4_0 1.0e-1 (logit std
# 1.1), against a quantization effect of 0.64 .. 1.3 on the logits at q4_0; the bounds are ~2x those.
QUANT_TOL = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 0.15, "q4_0": 0.2}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
NEW_TOKENS = 8

CASES = {
    # llama.cpp takes shared K/V from the last two owner layers (local, then global); with 3 shared layers the
    # tiny preset's layers 4 (local) and 5 (global) are those owners. See test_kv_sharing_llama_cpp_cannot_express.
    "tiny": config.get_config("tiny").replace(num_kv_shared_layers=3),
    "tiny_keqv": config.get_config("tiny_keqv"),
    "tiny_moe": config.get_config("tiny_moe"),
}
SEEDS = {"tiny": 0, "tiny_keqv": 1, "tiny_moe": 2}
# BOS, then ordinary tokens of the fixture vocabulary (ids >= 107 are not special), long enough to wrap the window.
PROMPT = [2, *np.random.default_rng(7).integers(107, 512, size=15).tolist()]
# The continuation the test models are trained to produce after PROMPT (ordinary vocabulary ids).
TARGET = np.random.default_rng(8).integers(107, 512, size=NEW_TOKENS).tolist()

_apply = jax.jit(model.apply, static_argnames=("config",))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer(path, chat_template="{{ bos_token }}{% for m in messages %}<|turn>{{ m['content'] }}{% endfor %}")
    return path


@functools.cache
def decisive_params(name: str):
    """The case's conditioned random init trained until its greedy continuation of PROMPT is TARGET with a
    top-1/top-2 margin >= decisive.MARGIN on every step (tests/decisive.py). Cached: the merged-LoRA test
    reuses the trained base."""
    return decisive.train_decisive(CASES[name], decisive.conditioned_init(CASES[name], SEEDS[name]), PROMPT, TARGET)


class Case:
    """One tiny model: f32 params (by default trained to be decisive), its HF checkpoint (with tokenizer files)
    and its exports, made on demand."""

    def __init__(self, name: str, root: str, tokenizer_dir: str, params=None):
        self.name, self.cfg = name, CASES[name]
        self.params = decisive_params(name) if params is None else params
        self.ckpt = os.path.join(root, "ckpt")
        hf_format.save_hf_checkpoint(self.ckpt, self.cfg, self.params)
        for file in os.listdir(tokenizer_dir):
            with open(os.path.join(tokenizer_dir, file), "rb") as src, open(os.path.join(self.ckpt, file), "wb") as dst:
                dst.write(src.read())
        self.root = root
        self._files: dict[str, str] = {}

    def gguf(self, quant: str) -> str:
        if quant not in self._files:
            path = os.path.join(self.root, f"{self.name}-{quant}.gguf")
            code = cli.main(["export", "gguf", "--checkpoint", self.ckpt, "--quant", quant, "-o", path])
            assert code == 0
            self._files[quant] = path
        return self._files[quant]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tokenizer_dir) -> Case:
    return Case(request.param, str(tmp_path_factory.mktemp(request.param)), tokenizer_dir)


def jax_run(cfg, params, tokens: list[int], new_tokens: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Our logits for `tokens`, our greedy continuation, and the logits along prompt + continuation."""
    logits = np.asarray(_apply(params, np.asarray([tokens]), config=cfg)[0][0], np.float32)
    sampler = Sampler(cfg, params, SamplingConfig(temperature=0.0), stop_tokens=())
    greedy = sampler.generate([tokens], new_tokens).tokens[0]
    full = np.asarray(_apply(params, np.asarray([tokens + greedy]), config=cfg)[0][0], np.float32)
    return logits, greedy, full


def gguf_names(cfg) -> dict[str, str]:
    """HF name -> GGUF name of every tensor llama.cpp has (from the parameter spec)."""
    return {
        n: g for leaf in param_spec.param_spec(cfg) if not leaf.unused for n, g in zip(leaf.hf, leaf.gguf, strict=True)
    }


def dequantized_params(path: str, cfg):
    """The parameter tree of the weights as stored in the GGUF file, dequantized by gguf-py."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def read(full_name: str):
        tensor = tensors.get(gguf_names(cfg).get(full_name.removeprefix("model.")))
        if tensor is None:
            return None  # KV-shared readers' K/V (not in the file, unused by the model)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, np.float32).reshape([int(n) for n in reversed(tensor.shape)])

    return hf_format.params_from_hf(cfg, read, jnp.float32, text_prefix="model.", source=path)


def _check_greedy(ours: list[int], theirs: list[int], full_logits: np.ndarray, err: float, what: str) -> None:
    """Greedy tokens agree on all NEW_TOKENS steps, and every step's top-1/top-2 margin (ours, along our
    continuation) exceeds twice the measured logit difference: the agreement is decided by the model, not by
    which way llama.cpp's rounding tips a near-tie. full_logits: [len(PROMPT) + NEW_TOKENS, V]."""
    margin = decisive.top_margins(full_logits[len(PROMPT) - 1 : len(PROMPT) - 1 + NEW_TOKENS]).min()
    print(f"{what}: greedy {NEW_TOKENS} steps, min top-1/top-2 margin {margin:.2f}, max |logit diff| {err:.2e}")
    assert margin > 2 * err, f"{what}: a near-tie (margin {margin:.2f}) makes the greedy comparison meaningless"
    assert ours == theirs, f"{what}: greedy continuations differ: {ours} vs {theirs}"


@pytest.mark.slow
def test_f32_logits_and_greedy_match_jax(case, monkeypatch):
    ours, our_greedy, full = jax_run(case.cfg, case.params, PROMPT, NEW_TOKENS)
    theirs, their_greedy = llama_run(case.gguf("f32"), PROMPT, NEW_TOKENS)
    assert theirs.shape == ours.shape
    err = np.abs(theirs - ours).max()
    # The same forward with llama.cpp's GELU (model.py calls jax.nn.gelu at trace time; a fresh jit retraces).
    monkeypatch.setattr(jax.nn, "gelu", llama_cpp_gelu)
    tokens = np.asarray([PROMPT])
    same_gelu = np.asarray(jax.jit(lambda p: model.apply(p, tokens, config=case.cfg)[0][0])(case.params), np.float32)
    err_same_gelu = np.abs(theirs - same_gelu).max()
    print(
        f"{case.name} f32: max |llama.cpp - jax| = {err:.2e}, with llama.cpp's GELU table {err_same_gelu:.2e} "
        f"(logit std {ours.std():.2f})"
    )
    assert err <= F32_TOL
    assert err_same_gelu <= F32_TOL_SAME_GELU
    assert our_greedy == TARGET  # what the model was trained to say (decisive_params)
    _check_greedy(our_greedy, their_greedy, full, err, f"{case.name} f32")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_logits_and_greedy_match_jax_on_dequantized_weights(case, quant):
    path = case.gguf(quant)
    params = dequantized_params(path, case.cfg)
    ours, our_greedy, full = jax_run(case.cfg, params, PROMPT, NEW_TOKENS)
    theirs, their_greedy = llama_run(path, PROMPT, NEW_TOKENS)
    err = np.abs(theirs - ours).max()
    original = np.asarray(_apply(case.params, np.asarray([PROMPT]), config=case.cfg)[0][0], np.float32)
    quant_effect = np.abs(ours - original).max()
    print(f"{case.name} {quant}: max |llama.cpp - jax(dequant)| = {err:.2e}; quantization effect {quant_effect:.2e}")
    assert err <= QUANT_TOL[quant]
    if quant == "q4_0":
        # llama.cpp computed with the 4-bit weights we wrote, not with anything closer to the originals.
        assert err < quant_effect / 2
    _check_greedy(our_greedy, their_greedy, full, err, f"{case.name} {quant}")


@pytest.mark.slow
def test_file_contents(case, tokenizer_dir):
    import json

    cfg = case.cfg
    expected_shapes = {
        g: shape
        for leaf in param_spec.param_spec(cfg)
        if not leaf.unused
        for g, shape in zip(leaf.gguf, leaf.hf_shapes, strict=True)
    }
    expected_shapes[gguf_export.ROPE_FREQS] = (cfg.global_head_dim // 2,)
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    pieces = {i: p for p, i in tokenizer["model"]["vocab"].items()}
    for t in tokenizer["added_tokens"]:
        pieces[t["id"]] = t["content"]
    T = gguf.GGMLQuantizationType
    for quant in QUANTS:
        reader = gguf.GGUFReader(case.gguf(quant))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert fields["general.architecture"] == "gemma4"
        assert fields["general.file_type"] == int(gguf_export._file_type(quant))
        assert fields["gemma4.block_count"] == cfg.num_layers
        assert fields["gemma4.embedding_length"] == cfg.embed_dim
        ffw = [cfg.layer_ffw_hidden(i) for i in range(cfg.num_layers)]
        assert fields["gemma4.feed_forward_length"] == (ffw if len(set(ffw)) > 1 else ffw[0])
        kv = [cfg.layer_kv_heads(i) for i in range(cfg.num_layers)]
        assert fields["gemma4.attention.head_count_kv"] == (kv if len(set(kv)) > 1 else kv[0])
        assert fields["gemma4.attention.sliding_window_pattern"] == [t == "local" for t in cfg.layer_types]
        assert fields["gemma4.attention.shared_kv_layers"] == cfg.num_kv_shared_layers
        assert fields["gemma4.embedding_length_per_layer_input"] == cfg.per_layer_input_dim
        assert fields["gemma4.attention.key_length"] == cfg.global_head_dim
        assert fields["gemma4.attention.key_length_swa"] == cfg.head_dim
        assert fields["gemma4.rope.dimension_count"] == cfg.global_head_dim
        assert fields["gemma4.rope.dimension_count_swa"] == cfg.head_dim
        assert fields["gemma4.rope.freq_base"] == cfg.global_rope_base
        assert fields["gemma4.rope.freq_base_swa"] == cfg.local_rope_base
        assert fields["gemma4.attention.sliding_window"] == cfg.sliding_window
        assert fields["gemma4.final_logit_softcapping"] == cfg.final_logit_softcap
        if cfg.num_experts:
            assert fields["gemma4.expert_count"] == cfg.num_experts
            assert fields["gemma4.expert_used_count"] == cfg.num_experts_per_token
            assert fields["gemma4.expert_feed_forward_length"] == cfg.expert_hidden
        assert fields["tokenizer.ggml.model"] == "gemma4"
        assert fields["tokenizer.ggml.tokens"] == [pieces[i] for i in range(len(pieces))]
        assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in tokenizer["model"]["merges"]]
        types = fields["tokenizer.ggml.token_type"]
        assert types[2] == gguf.TokenType.CONTROL and types[105] == gguf.TokenType.CONTROL  # <bos>, <|turn>
        assert types[50] == gguf.TokenType.USER_DEFINED  # <|tool_response>: rendered, as llama.cpp's converter does
        assert types[pieces_id(pieces, "<0x41>")] == gguf.TokenType.BYTE
        assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (2, 1)
        assert fields["tokenizer.ggml.padding_token_id"] == 0
        assert fields["tokenizer.ggml.add_bos_token"] is True
        with open(os.path.join(tokenizer_dir, "chat_template.jinja")) as f:
            assert fields["tokenizer.chat_template"] == f.read()

        tensors = {t.name: t for t in reader.tensors}
        assert set(tensors) == set(expected_shapes)
        for name, tensor in tensors.items():
            assert tuple(int(n) for n in reversed(tensor.shape)) == expected_shapes[name], name
            one_d = len(expected_shapes[name]) == 1
            if quant == "f32" or one_d or ".ffn_gate_inp.weight" in name:
                assert tensor.tensor_type == T.F32, name
        rope = gguf.quants.dequantize(tensors["rope_freqs.weight"].data, T.F32)
        rotated = int(cfg.global_rope_proportion * cfg.global_head_dim / 2)
        want = np.array([1.0] * rotated + [1e30] * (cfg.global_head_dim // 2 - rotated), np.float32)
        np.testing.assert_array_equal(rope, want)
        if quant == "q4_0":
            assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q4_0
            assert tensors["token_embd.weight"].tensor_type == T.Q8_0
            if cfg.per_layer_input_dim:
                # tiny: L*P = 144 elements per PLE row, not a whole number of 32-element blocks -> f16
                ple_row = cfg.num_layers * cfg.per_layer_input_dim
                assert tensors["per_layer_token_embd.weight"].tensor_type == (T.F16 if ple_row % 32 else T.Q8_0)
                assert tensors["per_layer_model_proj.weight"].tensor_type == T.F16
        if quant == "q8_0":
            assert tensors["blk.0.ffn_up.weight"].tensor_type == T.Q8_0
        if cfg.num_experts and quant in ("q8_0", "q4_0"):
            # Expert rows of 24 elements do not fill a 32-element block: stored as f16, as llama.cpp's tools do.
            assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == T.F16


def pieces_id(pieces: dict[int, str], piece: str) -> int:
    return next(i for i, p in pieces.items() if p == piece)


def test_kv_sharing_llama_cpp_cannot_express(tmp_path, capsys, tokenizer_dir):
    """llama.cpp reads shared K/V from the last two owner layers; a config whose readers use others is refused."""
    cfg = config.get_config("tiny").replace(num_kv_shared_layers=4)  # owners 0-4 end L, L: no global owner last
    ckpt = str(tmp_path / "ckpt")
    hf_format.save_hf_checkpoint(ckpt, cfg, model.init_params(cfg, 0, jnp.float32))
    out = str(tmp_path / "out.gguf")
    code, _, err = _cli(capsys, "export", "gguf", "--checkpoint", ckpt, "--tokenizer", tokenizer_dir, "-o", out)
    assert code == 2 and "llama.cpp" in err and "KV-shared layer" in err
    assert os.listdir(tmp_path) == ["ckpt"]


def test_bad_input_writes_nothing(tmp_path, capsys, tokenizer_dir):
    out = str(tmp_path / "x.gguf")
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "gguf", "--variant", "tiny_keqv", "--tokenizer", tokenizer_dir, "--quant", "q5", "-o", out])
    assert e.value.code == 2 and "invalid choice: 'q5'" in capsys.readouterr().err

    code, _, err = _cli(capsys, "export", "gguf", "--checkpoint", str(tmp_path / "nope"), "-o", out)
    assert code == 2 and err.strip() == f"gemma4-jax: error: checkpoint directory not found: {tmp_path / 'nope'}"

    code, _, err = _cli(capsys, "export", "gguf", "--variant", "tiny_keqv", "-o", out)
    assert code == 2 and "--tokenizer" in err  # random weights come without a vocabulary

    code, _, err = _cli(capsys, "export", "gguf", "--variant", "tiny_keqv", "--tokenizer", str(tmp_path), "-o", out)
    assert code == 2 and "no tokenizer.json" in err

    missing_dir = str(tmp_path / "no" / "x.gguf")
    code, _, err = _cli(
        capsys, "export", "gguf", "--variant", "tiny_keqv", "--tokenizer", tokenizer_dir, "-o", missing_dir
    )
    assert code == 2 and "output directory does not exist" in err
    assert os.listdir(tmp_path) == []


def test_random_weights_export(tmp_path, capsys, tokenizer_dir):
    out = str(tmp_path / "demo.gguf")
    code, stdout, _ = _cli(
        capsys, "export", "gguf", "--variant", "tiny_moe", "--tokenizer", tokenizer_dir, "--quant", "q8_0", "-o", out
    )
    assert code == 0 and stdout.startswith(f"wrote {out}: gemma4 GGUF q8_0")
    assert os.listdir(tmp_path) == ["demo.gguf"]
    reader = gguf.GGUFReader(out)
    assert len(reader.tensors) == len(gguf_names(CASES["tiny_moe"])) + 1  # + rope_freqs


# Runs the real CLI in a child process that pauses (and announces it) after writing part of the tensor data.
_PAUSING_EXPORT = """
import os, sys, time
from gemma4_jax.export import gguf
tofile, count = gguf._StreamedTensor.tofile, [0]
def pausing(self, f):
    tofile(self, f)
    count[0] += 1
    if count[0] == 40:
        f.flush()
        open(sys.argv[1], "w").close()
        time.sleep(600)
gguf._StreamedTensor.tofile = pausing
from gemma4_jax import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def test_killed_export_leaves_no_file(tmp_path, tokenizer_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, marker = out_dir / "model.gguf", tmp_path / "paused"
    argv = ["export", "gguf", "--variant", "tiny_keqv", "--tokenizer", tokenizer_dir, "--quant", "f32", "-o", str(out)]
    child = subprocess.Popen([sys.executable, "-c", _PAUSING_EXPORT, str(marker), *argv], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "the export never reached the pause"
            time.sleep(0.05)
        partial = list(out_dir.iterdir())
        assert len(partial) == 1 and partial[0].name.startswith(".model.gguf.gemma4-jax-tmp-")
        assert partial[0].stat().st_size > 0 and not out.exists()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert not out.exists() and partial[0].exists()  # the partial file never takes the destination's name
    assert cli.main(argv) == 0  # the next run of the same export removes the killed run's temporary
    assert [p.name for p in out_dir.iterdir()] == ["model.gguf"]


def test_bf16_checkpoint_exports_exact_values(tmp_path, capsys, tokenizer_dir):
    """Real checkpoints are bf16: bf16 and f32 files hold exactly the checkpoint's values."""
    import ml_dtypes

    cfg = CASES["tiny_keqv"]
    ckpt = str(tmp_path / "ckpt")
    params = model.init_params(cfg, 5, jnp.bfloat16)
    hf_format.save_hf_checkpoint(ckpt, cfg, params)
    hf = dict(hf_format.params_to_hf(cfg, params, text_prefix=""))
    for quant in ("bf16", "f32"):
        out = str(tmp_path / f"{quant}.gguf")
        code, _, err = _cli(
            capsys, "export", "gguf", "--checkpoint", ckpt, "--tokenizer", tokenizer_dir, "--quant", quant, "-o", out
        )
        assert code == 0, err
        tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
        for hf_name, value in hf.items():
            t = tensors[gguf_names(cfg)[hf_name]]
            stored = np.asarray(t.data)
            if t.tensor_type == gguf.GGMLQuantizationType.BF16:
                stored = stored.view(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(stored.astype(np.float32).reshape(value.shape), value.astype(np.float32))


@pytest.mark.slow
def test_merged_lora_checkpoint_runs_in_llama_cpp(tmp_path, tokenizer_dir, capsys):
    """A LoRA fine-tune ships: adapters saved in PEFT layout, `gemma4-jax merge` into a normal checkpoint,
    `export gguf`, and llama.cpp's logits equal our adapted (unmerged) forward within the f32 tolerance."""
    from gemma4_jax.train import lora

    case = Case("tiny_keqv", str(tmp_path / "base"), tokenizer_dir)
    lora_cfg = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = lora.init_adapters(case.cfg, lora_cfg, seed=3)
    rng = np.random.default_rng(4)  # B = 0 at init would make the merge a no-op: give it a real update
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32) if path[-1].key == "b" else x,
        adapters,
    )
    lora.save_peft(str(tmp_path / "adapter"), case.cfg, adapters, lora_cfg)
    merged_dir, gguf_file = str(tmp_path / "merged"), str(tmp_path / "merged.gguf")
    argv = ["merge", "--checkpoint", case.ckpt, "--adapter", str(tmp_path / "adapter"), "--dtype", "f32"]
    assert _cli(capsys, *argv, "-o", merged_dir)[0] == 0
    assert _cli(capsys, "export", "gguf", "--checkpoint", merged_dir, "--quant", "f32", "-o", gguf_file)[0] == 0

    adapted = lora.attach(case.params, adapters, case.cfg, lora_cfg)
    ours, our_greedy, full = jax_run(case.cfg, adapted, PROMPT, NEW_TOKENS)
    base_logits = np.asarray(_apply(case.params, np.asarray([PROMPT]), config=case.cfg)[0][0], np.float32)
    assert np.abs(ours - base_logits).max() > 20 * F32_TOL  # the adapters really change the model
    theirs, their_greedy = llama_run(gguf_file, PROMPT, NEW_TOKENS)
    err = np.abs(theirs - ours).max()
    print(f"merged LoRA f32: max |llama.cpp - jax adapted| = {err:.2e}")
    assert err <= F32_TOL
    _check_greedy(our_greedy, their_greedy, full, err, "merged LoRA f32")
