"""The `gemma4-jax` command: the demo default, logits/info outputs, one-line errors for bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import spec_numbers as spec
from references import gemma4_chat_template
from tokenizer_fixture import write_tokenizer

from gemma4_jax import cli, config, hf_format, model
from gemma4_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = config.TINY_KEQV
    hf_format.save_hf_checkpoint(str(path), cfg, model.init_params(cfg, 3, jnp.float32))
    write_tokenizer(str(path), chat_template=gemma4_chat_template())
    return path


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_generate_runs_offline(capsys):
    code, out, err = _run(capsys, "generate", "--max-new-tokens", "4")
    assert code == 0, err
    assert "random weights" in out and "--checkpoint DIR" in out
    assert "generated 4 tokens" in out


def test_generate_from_checkpoint(capsys, ckpt):
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt-ids", "2,17,33", "--temperature", "0", "--stop", ""]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    tokens_line = out.strip().splitlines()[-2]
    assert len(tokens_line.split()) == 32


def test_generate_text_prompt_streams_text(capsys, ckpt):
    """A text prompt is encoded with the checkpoint's tokenizer (one <bos>) and the answer streams as text:
    the printed text equals the decoded greedy tokens of the same prompt ids."""
    tok = load_tokenizer(str(ckpt))
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "The capital of France", "--temperature", "0"]
    code, out, err = _run(capsys, *argv, "--stop", "", "--max-new-tokens", "12")
    assert code == 0, err
    prompt = tok.encode("The capital of France", add_bos=True)
    assert prompt[0] == 2 and prompt.count(2) == 1
    cfg, params = hf_format.load_hf_checkpoint(str(ckpt))
    from gemma4_jax.sampler import Sampler, SamplingConfig

    expected = Sampler(cfg, params, SamplingConfig(), stop_tokens=()).generate([prompt], 12).tokens[0]
    assert tok.decode(expected) in out


def test_chat_multi_turn(capsys, ckpt, monkeypatch):
    lines = iter(["Hello!", "/reset", "What is 2+2?"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    argv = ["chat", "--checkpoint", str(ckpt), "--temperature", "0", "--max-new-tokens", "5", "--system", "Be brief"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert out.count("model> ") == 2


def test_logits_equal_a_full_forward(capsys, ckpt, tmp_path):
    out_file = tmp_path / "logits.npy"
    code, out, _ = _run(capsys, "logits", "--checkpoint", str(ckpt), "--tokens", "2,15,27", "--out", str(out_file))
    assert code == 0 and "wrote" in out
    logits = np.load(out_file)
    cfg, params = hf_format.load_hf_checkpoint(str(ckpt), dtype=jnp.float32)
    expected, _ = jax.jit(model.apply, static_argnames="config")(params, np.array([[2, 15, 27]]), config=cfg)
    assert logits.dtype == np.float32 and logits.shape == (3, cfg.vocab_size)
    np.testing.assert_array_equal(logits, np.asarray(expected[0]))


def test_info_reports_spec_counts(capsys):
    code, out, _ = _run(capsys, "info", "--variant", "e2b", "--json")
    info = json.loads(out)
    assert code == 0
    assert info["params (official tree)"] == f"{spec.TOTAL_JAX['e2b']:,}"
    assert info["text decoder (HF tree)"] == f"{spec.TEXT_HF['e2b']:,}"
    assert info["vision encoder + projection"] == f"{spec.VISION_WITH_PROJECTION['e2b']:,}"
    assert info["audio encoder + projection"] == f"{spec.AUDIO_WITH_PROJECTION['e2b']:,}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "--variant", "e3b"], "unknown variant 'e3b'"),
        (["generate", "--variant", "nope"], "unknown variant 'nope'"),
        (["generate", "--checkpoint", "/nonexistent/dir"], "checkpoint directory not found"),
        (["generate", "--prompt", "hello world"], "text needs a tokenizer"),
        (["generate", "--prompt-ids", "hello"], "--prompt-ids takes token ids"),
        (["generate", "--prompt-ids", "2,600"], "token id 600 is outside the vocabulary"),
        (["generate", "--prompt-ids", "2,3", "--max-new-tokens", "511"], "exceeds the 512-token context"),
        (["logits", "--tokens", "2,9999", "--out", "/tmp/x.npy"], "token id 9999"),
        (["generate", "--top-p", "0"], "top-p must be in"),
        (["generate", "--mesh", "fsdp=2"], "fsdp=2 is 2 devices, but there are 1"),
        (["generate", "--mesh", "fsdp=x"], "'fsdp=x' is not axis=size"),
        (["memory", "--variant", "e2b", "--mesh", "expert=2"], "e2b has no experts axis"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gemma4-jax: error: ") and message in err


def test_checkpoint_errors(capsys, ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "generate", "--checkpoint", str(empty))
    assert code == 2 and "missing config.json" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    d = json.loads((ckpt / "config.json").read_text()) | {"hidden_size": 96}
    (bad / "config.json").write_text(json.dumps(d))
    code, _, err = _run(capsys, "logits", "--checkpoint", str(bad), "--tokens", "2", "--out", str(tmp_path / "x"))
    assert code == 2 and "shape mismatch" in err
    assert not (tmp_path / "x.npy").exists()


def test_console_script_prints_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "gemma4_jax.cli", "info", "--variant", "x"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "gemma4-jax: error: unknown variant 'x'; choose one of: " + ", ".join(config.PRESETS)
    )


@pytest.mark.slow
def test_compilation_cache(tmp_path, capsys):
    """Compiled programs land in $GEMMA4_JAX_CACHE (a second run loads them: bench/decode.py times both runs);
    --no-compile-cache and GEMMA4_JAX_CACHE=off write none, also where $JAX_COMPILATION_CACHE_DIR names a
    directory; an unwritable cache directory is one note, not an error."""
    import os

    from gemma4_jax.api import use_compilation_cache

    def generate(cache, *flags):
        env = {**os.environ, "GEMMA4_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax-env")  # JAX's own variable: ours decides
        argv = [sys.executable, "-m", "gemma4_jax.cli", *flags, "generate", "--variant", "tiny"]
        argv += ["--max-new-tokens", "2"]
        done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    generate(tmp_path / "on")
    assert any(name.startswith("jit__step") for name in os.listdir(tmp_path / "on"))
    generate(tmp_path / "flag", "--no-compile-cache")
    generate("off")  # GEMMA4_JAX_CACHE=off: the flag for a whole environment, no directory named "off"
    assert sorted(os.listdir(tmp_path)) == ["on"]
    blocker = tmp_path / "a-file"  # a cache path under a file cannot be created, whoever runs the test
    blocker.write_text("")
    assert use_compilation_cache(str(blocker / "xla")) is None
    assert capsys.readouterr().err.count("\n") == 1
