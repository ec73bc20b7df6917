"""`gemma4-jax ship`: a checkpoint and a chat set to GGUF and LiteRT artifacts, each verified in its own runtime.

The model is `tiny` (PLE, KV sharing as llama.cpp expresses it, double-wide MLP) trained to be decisive
(tests/decisive.py: its greedy continuation of PROMPT is TARGET with top-1/top-2 margins >= 6, as a real model's),
so that llama.cpp, the LiteRT interpreter and the LiteRT-LM engine must reproduce our greedy tokens exactly; ship's
own verdicts are checked against those runtimes here, never against recorded numbers.

- One uninterrupted `gemma4-jax ship` (a subprocess, as a user runs it) with a small chat set and all three targets
  is shared by the slow tests: exit 0, every artifact verified, report.md/json and the PNGs written; independently
  of ship, llama.cpp and the engine are run on its artifacts here and give TARGET.
- The same run SIGKILLed during the fine-tune, rerun and SIGKILLed during the LiteRT export, rerun to the end: no
  finished stage is redone (the manifest says which run did each stage; the log shows the fine-tune resumed from
  its checkpoint), the killed export's temporary is gone, and every artifact is byte-identical to the
  uninterrupted run's (SOURCE_DATE_EPOCH fixes the .litertlm's creation time, as for any reproducible build).
- A copy of the finished run with its q4_0 GGUF re-exported corrupted: that row fails, the others stay verified,
  exit status 1.
- Bad inputs (unknown target, malformed chats, unusable -o): one error line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gemma4_jax import cli, config, ship

PROMPT_TEXT = "The quick brown fox"
NEW_TOKENS = 8
TARGET = np.random.default_rng(11).integers(107, 512, size=NEW_TOKENS).tolist()
TARGETS = "gguf:q4_0,gguf:q8_0,litert:int4"
# llama.cpp takes shared K/V from the last two owner layers; with 3 shared layers tiny's owners are layers 4 and 5.
CFG = config.get_config("tiny").replace(num_kv_shared_layers=3)
CHATS = [
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("Name a fruit.", "An apple is a fruit."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What do bees make?", "Bees make honey."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("Say hello.", "Hello there!"),
    ("What is the sun?", "The sun is a star."),
    ("What do cows eat?", "Cows eat grass."),
    ("What is snow?", "Snow is cold and white."),
]
# Small fine-tune: the LoRA update stays small next to the decisive margins.
SHIP_ARGS = ["--steps", "8", "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--batch", "2", "--seq-len", "48"]
SHIP_ARGS += ["--prompt", PROMPT_TEXT, "--new-tokens", str(NEW_TOKENS), "--eval-tokens", "64"]
COMPARED = (  # every artifact (and intermediate) that must not depend on the run being interrupted
    "finetune/adapter_model.safetensors",
    "merged/model.safetensors",
    "model-q4_0.gguf",
    "model-q8_0.gguf",
    "litert-int4/model.tflite",
    "litert-int4/embedder.tflite",
    "litert-int4/per_layer_embedder.tflite",
    "litert-int4/model.litertlm",
)


def _write_checkpoint(root: str, params) -> str:
    from tokenizer_fixture import write_tokenizer

    from gemma4_jax.hf_format import save_hf_checkpoint

    ckpt = os.path.join(root, "ckpt")
    save_hf_checkpoint(ckpt, CFG, params)
    write_tokenizer(ckpt)
    return ckpt


def _write_chats(path: str) -> str:
    with open(path, "w") as f:
        for question, answer in CHATS:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(decisive checkpoint, chats file, prompt ids)."""
    import decisive
    from tokenizer_fixture import write_tokenizer

    from gemma4_jax.tokenizer import load_tokenizer

    root = str(tmp_path_factory.mktemp("ship_inputs"))
    write_tokenizer(os.path.join(root, "tok"))
    prompt = [CFG.bos_id, *load_tokenizer(os.path.join(root, "tok")).encode(PROMPT_TEXT)]
    params = decisive.train_decisive(CFG, decisive.conditioned_init(CFG, 0), prompt, TARGET)
    return _write_checkpoint(root, params), _write_chats(os.path.join(root, "chats.jsonl")), prompt


def _argv(ckpt: str, chats: str, out: str) -> list[str]:
    return ["ship", "--checkpoint", ckpt, "--data", chats, "--targets", TARGETS, "-o", out, *SHIP_ARGS]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """The CLI's compilation cache (on for users, off for the tests) in a directory of this module's own: the
    killed and resumed runs load what the uninterrupted run compiled, as a user's second run would."""
    return str(tmp_path_factory.mktemp("ship_xla_cache"))


def _spawn(argv: list[str], cache: str) -> subprocess.Popen:
    # SOURCE_DATE_EPOCH: the .litertlm's creation time (reproducible builds; its uuid derives from its contents)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SOURCE_DATE_EPOCH="1767225600", GEMMA4_JAX_CACHE=cache)
    return subprocess.Popen(
        [sys.executable, "-m", "gemma4_jax.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _run(argv: list[str], cache: str, kill_when=None, timeout: float = 400) -> tuple[int, str]:
    """Runs the CLI in a subprocess (compiled programs kept in `cache`); with `kill_when(line)` SIGKILLs it at the
    first output line it accepts. Returns (exit status, output)."""
    proc = _spawn(argv, cache)
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if kill_when is not None and kill_when(line):
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(lines[-30:])
    rest = proc.communicate(timeout=timeout)[0] or ""
    return proc.returncode, "".join(lines) + rest


def _manifest(out: str) -> dict:
    with open(os.path.join(out, ship.MANIFEST)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(inputs, compile_cache, tmp_path_factory):
    ckpt, chats, _ = inputs
    out = str(tmp_path_factory.mktemp("ship_runs") / "full")
    code, log = _run(_argv(ckpt, chats, out), compile_cache)
    print(log[-4000:])
    return code, log, out


# ----- must-show 1 -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ship_verifies_every_target_and_writes_the_report(uninterrupted, inputs):
    code, log, out = uninterrupted
    assert code == 0, log[-3000:]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["ok"] is True
    rows = {a["target"]: a for a in report["artifacts"]}
    assert set(rows) == set(TARGETS.split(","))
    for name, row in rows.items():
        assert row["status"] == "verified", (name, row["error"])
        assert row["jax_greedy"] == row["runtime_greedy"], name  # decisive: no near-ties to excuse
        assert row["greedy_agreement"] == 1.0
        assert row["max_abs_logit_diff"] <= row["tolerance"]
        assert row["size"] == (os.path.getsize(row["path"]) if name.startswith("gguf") else os.path.getsize(
            os.path.join(row["path"], "model.litertlm")))  # fmt: skip
        assert row["tokens_per_s"] > 0 and row["tokens_scored"] > 0
        assert 0.0 <= row["kl_per_token"] and 0.0 <= row["top1_agreement"] <= 1.0
    assert rows["litert:int4"]["engine"]["equal"] is True
    for file in ("report.md", "loss.png", "quality.png"):
        with open(os.path.join(out, file), "rb") as f:
            head = f.read(8)
        assert head[:4] == b"\x89PNG" if file.endswith(".png") else head
    markdown = open(os.path.join(out, "report.md")).read()
    assert all(name in markdown for name in rows) and "FAILED" not in markdown
    assert "3/3 artifacts verified" in log.splitlines()[-1] or "3/3 artifacts verified" in log
    # The fine-tune ran and changed the model; the targets were made from the merged checkpoint.
    assert report["finetune"]["final_loss"] < report["finetune"]["first_loss"]
    assert report["model"].endswith("merged")


@pytest.mark.slow
def test_artifacts_run_as_ship_says_in_the_runtimes(uninterrupted, inputs, tmp_path):
    """Independently of ship's verdicts: llama.cpp's own greedy sampler on each GGUF and the LiteRT-LM engine on the
    bundle continue PROMPT with what JAX's greedy decoding of the merged checkpoint gives."""
    from gemma4_jax import api
    from gemma4_jax.export import runtimes

    _, _, out = uninterrupted
    _, _, prompt = inputs
    merged = api.load(os.path.join(out, "merged"), dtype="float32", layout="checkpoint")
    from gemma4_jax.export.litert import jax_reference

    expected = jax_reference(merged.config, merged.params, prompt, NEW_TOKENS, 64)[2]
    for quant in ("q4_0", "q8_0"):
        _, greedy = runtimes.llama_run(os.path.join(out, f"model-{quant}.gguf"), prompt, NEW_TOKENS)
        assert greedy == expected, quant
    bundle = os.path.join(out, "litert-int4", "model.litertlm")
    got = runtimes.engine_greedy(bundle, PROMPT_TEXT, NEW_TOKENS, 128, str(tmp_path), [expected])
    assert got["prompt_ids"] == prompt[1:]
    assert got["text"] == got["detokenized"][0]


@pytest.mark.slow
def test_corrupted_artifact_fails_its_row(uninterrupted, inputs, tmp_path, monkeypatch, capsys):
    """A finished run copied; its q4_0 GGUF removed, so the rerun re-exports it, through an exporter that damages
    the file's last tensor bytes (the token embedding, the tied LM head). Only that row fails; exit status 1."""
    from gemma4_jax.export import gguf as gguf_export

    ckpt, chats, _ = inputs
    out = str(tmp_path / "copy")
    shutil.copytree(uninterrupted[2], out)
    os.remove(os.path.join(out, "model-q4_0.gguf"))
    real = gguf_export.export_gguf

    def damaged(source, path, **kwargs):
        summary = real(source, path, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size - size // 8)
            f.write(np.random.default_rng(0).integers(0, 256, size // 8, dtype=np.uint8).tobytes())
        return summary

    monkeypatch.setattr(gguf_export, "export_gguf", damaged)
    code = cli.main(_argv(ckpt, chats, out))
    summary, err = capsys.readouterr()
    assert code == 1, err[-3000:]
    with open(os.path.join(out, "report.json")) as f:
        rows = {a["target"]: a for a in json.load(f)["artifacts"]}
    assert rows["gguf:q4_0"]["status"] == "failed" and rows["gguf:q4_0"]["error"]
    assert rows["gguf:q8_0"]["status"] == "verified" and rows["litert:int4"]["status"] == "verified"
    assert "FAILED" in open(os.path.join(out, "report.md")).read()
    assert "FAILED: gguf:q4_0" in summary and "ship [4/9] verify gguf:q4_0: FAILED" in err
    print(rows["gguf:q4_0"]["error"])
    # Only the removed artifact was redone (run 2 of this directory).
    stages = _manifest(out)["stages"]
    assert {k for k, v in stages.items() if v["run"] == 2} == {"export gguf:q4_0", "verify gguf:q4_0"}


# ----- must-show 2 -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_ship_resumes_without_redoing_and_matches_bytes(uninterrupted, inputs, compile_cache, tmp_path):
    ckpt, chats, _ = inputs
    out = str(tmp_path / "killed")
    argv = _argv(ckpt, chats, out)

    # Run 1: killed during the fine-tune, after some training steps.
    code, log1 = _run(argv, compile_cache, kill_when=lambda line: line.startswith("training:") and "(4 / 8)" in line)
    assert code == -signal.SIGKILL, log1[-2000:]
    assert "export" not in _manifest(out)["stages"] and "finetune" not in _manifest(out)["stages"]
    # Run 2: resumes the fine-tune from its checkpoint; killed during the LiteRT export (its temporary is there).
    code, log2 = _run(argv, compile_cache, kill_when=lambda line: line.startswith("[litert] weights bound"))
    assert code == -signal.SIGKILL, log2[-2000:]
    assert "resuming from step" in log2
    stale = [n for n in os.listdir(out) if n.startswith(".litert-int4.gemma4-jax-tmp-")]
    assert stale, os.listdir(out)
    # Run 3: finishes; nothing finished before is redone, the stale temporary is removed.
    code, log3 = _run(argv, compile_cache)
    assert code == 0, log3[-3000:]
    runs = {stage: record["run"] for stage, record in _manifest(out)["stages"].items()}
    assert runs == {
        "finetune": 2,
        "merge": 2,
        "export gguf:q4_0": 2,
        "verify gguf:q4_0": 2,
        "export gguf:q8_0": 2,
        "verify gguf:q8_0": 2,
        "export litert:int4": 3,
        "verify litert:int4": 3,
    }
    for stage in ("finetune", "merge", "export gguf:q4_0", "verify gguf:q8_0"):
        assert f"{stage}: done in run 2, skipped" in log3
    assert "training:" not in log3
    assert f"removed {stale[0]}" in log3 and not any(".gemma4-jax-tmp-" in n for n in os.listdir(out))
    for rel in COMPARED:
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(uninterrupted[2], rel), "rb") as b:
            assert a.read() == b.read(), rel


# ----- bad inputs and the verdict (default tier) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    from gemma4_jax import model

    root = str(tmp_path_factory.mktemp("ship_random"))
    return _write_checkpoint(root, model.init_params(CFG, 0, np.float32))


def _bad(capsys, *argv) -> str:
    code = cli.main(["ship", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma4-jax: error: "), err
    return lines[0]


def test_bad_inputs_are_one_error_line(random_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["--checkpoint", random_checkpoint, "-o", out]
    assert "unknown target 'gguf:q3_k'" in _bad(capsys, *base, "--targets", "gguf:q4_0,gguf:q3_k")
    assert "unknown target 'onnx:int8'" in _bad(capsys, *base, "--targets", "onnx:int8")
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": ')
    assert f"{chats}:1: no assistant/model message" in _bad(
        capsys, *base, "--targets", "gguf:q8_0", "--data", str(chats)
    )
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{')
    assert f"{chats}:2: invalid JSON" in _bad(capsys, *base, "--targets", "gguf:q8_0", "--data", str(chats))
    missing = str(tmp_path / "none.jsonl")
    assert "data file not found" in _bad(capsys, *base, "--targets", "gguf:q8_0", "--data", missing)
    assert not os.path.exists(out)
    # -o: a non-empty directory that is no ship run, a file, a missing parent, an unwritable place.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    line = _bad(capsys, "--checkpoint", random_checkpoint, "--targets", "gguf:q8_0", "-o", str(tmp_path / "mine"))
    assert "exists and is not an empty directory" in line
    assert os.listdir(tmp_path / "mine") == ["keep.txt"]
    line = _bad(capsys, "--checkpoint", random_checkpoint, "--targets", "gguf:q8_0", "-o", str(chats))
    assert "exists and is not an empty directory" in line
    line = _bad(capsys, "--checkpoint", random_checkpoint, "--targets", "gguf:q8_0", "-o", str(tmp_path / "a" / "b"))
    assert "output directory does not exist" in line
    line = _bad(capsys, "--checkpoint", random_checkpoint, "--targets", "gguf:q8_0", "-o", "/proc/gemma4-jax-ship")
    assert "cannot write /proc/gemma4-jax-ship" in line


def test_judge_allows_only_near_ties():
    """The verdict: a token may differ only where our top-1/top-2 margin is within twice the logit difference."""
    rng = np.random.default_rng(0)
    ours = rng.normal(0, 1, (4, 32))
    ours[:, 5] += 10.0  # decisive steps: token 5 by a margin of ~8
    ours[2, 7] = ours[2, 5] - 0.01  # step 2: a near-tie between 5 and 7
    theirs = ours + rng.uniform(-0.05, 0.05, ours.shape)
    greedy = [5, 5, 5, 5]
    verdict = ship.judge(ours, theirs, greedy, greedy, tol=0.05)
    assert verdict["error"] is None and verdict["greedy_agreement"] == 1.0
    tipped = [5, 5, 7, 5]  # the runtime tipped the near-tie
    verdict = ship.judge(ours, theirs, greedy, tipped, tol=0.05)
    assert verdict["error"] is None and verdict["greedy_agreement"] == 0.75
    wrong = [5, 9, 5, 5]  # a decisive step differs
    assert "greedy step 1" in ship.judge(ours, theirs, greedy, wrong, tol=0.05)["error"]
    far = ours.copy()
    far[0, 3] += 3.0  # within the greedy but off in the logits
    assert "max |logit diff|" in ship.judge(ours, far, greedy, greedy, tol=0.05)["error"]
    assert "not finite" in ship.judge(ours, np.full_like(ours, np.nan), greedy, greedy, tol=0.05)["error"]


def test_parse_targets():
    assert [t.artifact for t in ship.parse_targets("gguf:q4_0, litert:int4")] == ["model-q4_0.gguf", "litert-int4"]
    with pytest.raises(ship.Gemma4Error, match="given twice"):
        ship.parse_targets("gguf:q4_0,gguf:q4_0")
    with pytest.raises(ship.Gemma4Error, match="empty"):
        ship.parse_targets(" , ")
