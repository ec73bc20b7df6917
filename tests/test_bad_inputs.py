"""Bad input as a new user would give it: every case ends in one `gemma4-jax: error: ...` line, exit status 2, and
nothing written (no output, no temporary). I/O faults (a full disk, a read-only file system, a permission error) are
made real where the test can (a 1 MiB tmpfs, a read-only bind mount: needs root and mount permission) and injected at
the writer otherwise."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizer_fixture import write_tokenizer

from gemma4_jax import api, cli, config, files, hf_format, model, orbax_format, param_spec
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.train import lora

CFG = config.get_config("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny HF checkpoint with its tokenizer."""
    path = str(tmp_path_factory.mktemp("base") / "tiny")
    hf_format.save_hf_checkpoint(path, CFG, model.init_params(CFG, 0, jnp.float32))
    write_tokenizer(path)
    return path


def error_line(err: str) -> str:
    """The one error line of a failed command's stderr: its last line, the only error line, no traceback (status
    lines of the work done before the failure, such as progress, may precede it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("gemma4-jax: error: "), err
    assert sum("error" in line.lower() for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def fails(capsys, *argv, match: str, leaves_empty=None) -> str:
    """Runs the CLI: exit 2, one error line containing `match`; `leaves_empty`: a directory that must hold nothing
    afterwards."""
    assert cli.main([str(a) for a in argv]) == 2
    line = error_line(capsys.readouterr().err)
    assert match in line, line
    if leaves_empty is not None:
        assert os.listdir(leaves_empty) == [], os.listdir(leaves_empty)
    return line


def run_cli(*argv, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """The installed entry point in a child process (argv may hold bytes that are not UTF-8)."""
    code = "import sys; from gemma4_jax.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], input=stdin, capture_output=True, timeout=300)


def one_line(result: subprocess.CompletedProcess, match: str) -> None:
    """A child's stderr is exactly one error line (nothing after it, not even at interpreter exit)."""
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma4-jax: error: ") and match in lines[0], err


def copy_ckpt(ckpt, tmp_path, name="copy") -> str:
    dest = str(tmp_path / name)
    shutil.copytree(ckpt, dest)
    return dest


# ----- weights and configs -----------------------------------------------------------------------------------


def test_non_finite_weights_name_the_tensor(ckpt, tmp_path, capsys):
    bad = copy_ckpt(ckpt, tmp_path)
    params = model.init_params(CFG, 0, jnp.float32)
    w = np.array(params["layer_1"]["attn"]["q_einsum"]["w"])
    w[0, 3, 2] = np.nan
    params["layer_1"]["attn"]["q_einsum"]["w"] = w
    shutil.rmtree(bad)
    hf_format.save_hf_checkpoint(bad, CFG, params)
    out = tmp_path / "out"
    out.mkdir()
    for argv in (["generate", "--prompt-ids", "2,5"], ["logits", "--tokens", "2,5", "--out", out / "x.npy"]):
        line = fails(capsys, *argv, "--checkpoint", bad, match="layer_1/attn/q_einsum/w", leaves_empty=out)
        assert "non-finite" in line


def test_non_finite_logits_stop_generation():
    """Finite weights that overflow: generate never prints tokens sampled from NaN logits."""
    params = model.init_params(CFG, 0, jnp.float32)
    params["layer_0"]["skip_scale"] = jnp.full((1,), jnp.inf)
    loaded = api.from_params(CFG, params)
    with pytest.raises(Gemma4Error, match="non-finite logits"):
        loaded.generate([2, 5], max_new_tokens=3)
    with pytest.raises(Gemma4Error, match="non-finite logits"):
        loaded.logits([2, 5])


@pytest.mark.parametrize(
    "edit, match",
    [
        ([1, 2, 3], "config.json must be a JSON object, got a list"),
        ({"hidden_size": 0}, "embed_dim must be a positive integer, got 0"),
        ({"num_attention_heads": -4}, "num_heads must be a positive integer"),
        ({"vocab_size": "many"}, "config.json has an invalid value"),
    ],
)
def test_bad_config_json(ckpt, tmp_path, capsys, edit, match):
    bad = copy_ckpt(ckpt, tmp_path)
    path = os.path.join(bad, "config.json")
    with open(path) as f:
        d = json.load(f)
    with open(path, "w") as f:
        json.dump(edit if isinstance(edit, list) else d | edit, f)
    fails(capsys, "generate", "--checkpoint", bad, "--prompt-ids", "2", match=match)
    fails(capsys, "generate", "--config", path, "--prompt-ids", "2", match=match)  # random weights of that config


def test_bad_numbers(capsys, tmp_path):
    fails(capsys, "generate", "--init-seed", "-1", match="seed of random weights must be >= 0")
    fails(capsys, "generate", "--temperature", "nan", match="temperature must be a finite number >= 0")
    fails(capsys, "generate", "--temperature", "inf", match="temperature must be a finite number >= 0")
    fails(capsys, "quantize", "--variant", "tiny", "--format", "int8", "--init-seed", "-3", "-o", tmp_path / "q",
          match="must be >= 0", leaves_empty=tmp_path)  # fmt: skip


def test_options_that_do_not_apply_are_refused(ckpt, tmp_path, capsys):
    qdir = tmp_path / "q"
    assert cli.main(["quantize", "--checkpoint", ckpt, "--format", "int8", "-o", str(qdir)]) == 0
    capsys.readouterr()
    fails(capsys, "generate", "--checkpoint", qdir, "--ple", "host", match="applies to float checkpoints")
    fails(capsys, "generate", "--checkpoint", qdir, "--variant", "tiny", match="drop --variant / --config")
    fails(capsys, "generate", "--checkpoint", ckpt, "--init-seed", "3", match="--init-seed applies to random weights")
    fails(capsys, "generate", "--variant", "tiny_keqv", "--ple", "host", match="has no Per-Layer Embeddings")
    fails(capsys, "convert", "--checkpoint", ckpt, "--to", "hf", "--layout", "flat", "-o", tmp_path / "c",
          match="--layout applies to --to orbax")  # fmt: skip
    fails(capsys, "export", "litert", "--variant", "tiny", "--ple-bits", "4", "-o", tmp_path / "l",
          match="--ple-bits applies to --quant int4")  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["q"]


@pytest.mark.parametrize("damage", ["truncated", "interrupted_copy"])
def test_damaged_orbax_prints_one_line_and_nothing_after(tmp_path, damage):
    tree = {}
    for leaf in param_spec.param_spec(CFG):
        model.tree_set(tree, leaf.path, np.random.default_rng(0).standard_normal(leaf.shape).astype(np.float32))
    path = str(tmp_path / "orbax")
    orbax_format.save_orbax(path, tree)
    if damage == "truncated":  # the largest data file cut in half: found when that tensor is read
        data = os.path.join(path, "ocdbt.process_0", "d")
        largest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    else:  # the metadata arrived, the data did not: found while the tensors are opened (orbax's own metadata reader
        # left opens running there, whose callbacks printed tracebacks after the error line)
        for entry in os.scandir(path):
            if entry.is_dir():
                shutil.rmtree(entry.path)
            elif entry.name not in ("_METADATA", "manifest.ocdbt"):
                os.remove(entry.path)
    result = run_cli("logits", "--checkpoint", path, "--tokens", "2,3", "--out", str(tmp_path / "x.npy"))
    one_line(result, "cannot read tensor")
    assert b"tensorstore_spec" not in result.stderr  # TensorStore's screenful of JSON is cut from the line
    assert result.stdout == b"" and not (tmp_path / "x.npy").exists()


# ----- memory --------------------------------------------------------------------------------------------------


def test_a_run_that_cannot_fit_says_what_would(ckpt, tmp_path, capsys, monkeypatch):
    source = hf_format.HFSource(ckpt)
    f32, bf16 = (api.plan_load(source, jnp.dtype(d), "device").peak for d in ("float32", "bfloat16"))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(api, "available_memory", lambda: bf16 - 1)  # neither fits
    line = fails(capsys, "logits", "--checkpoint", ckpt, "--tokens", "2,3", "--out", out / "x.npy", match="needs about",
                 leaves_empty=out)  # fmt: skip
    assert files.human_bytes(f32) in line and "a quantized checkpoint" in line and "--ple mmap" in line
    monkeypatch.setattr(api, "available_memory", lambda: (f32 + bf16) // 2)  # float32 does not fit, bfloat16 does
    fails(capsys, "logits", "--checkpoint", ckpt, "--dtype", "float32", "--tokens", "2,3", "--out", out / "x.npy",
          match="options that fit: --dtype bfloat16", leaves_empty=out)  # fmt: skip
    # without --dtype, logits' float32 default gives way to bfloat16, and says so
    assert cli.main(["logits", "--checkpoint", ckpt, "--tokens", "2,3", "--out", str(out / "x.npy")]) == 0
    assert "loading in bfloat16" in capsys.readouterr().err and (out / "x.npy").exists()


# ----- LoRA adapters and runs that do not fit the base -------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("adapter"))
    lora_cfg = lora.LoraConfig(rank=4, alpha=8)
    lora.save_peft(path, CFG, lora.init_adapters(CFG, lora_cfg, 0), lora_cfg)
    return path


def _edited_adapter(adapter, tmp_path, metadata=None, **changes) -> str:
    """A copy of `adapter` with keys of its adapter_config.json changed and, given `metadata`, the weights file's
    metadata replaced by it (without ours, it is an adapter as peft writes one)."""
    dest = copy_ckpt(adapter, tmp_path, "edited-" + "-".join([*changes, *(metadata or {})]))
    if metadata is not None:
        weights = os.path.join(dest, lora.PEFT_WEIGHTS)
        st = files.SafetensorsDir(weights)
        files.save_safetensors(weights, {name: st.read(name) for name in st.names()}, metadata)
    path = os.path.join(dest, lora.PEFT_CONFIG)
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)
    return dest


def test_adapters_that_do_not_fit(ckpt, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    cases = [
        (_edited_adapter(adapter, tmp_path, r=8), "adapter has shapes"),
        (_edited_adapter(adapter, tmp_path, {"format": "pt"}, target_modules=["c_attn"]), "match no module of"),
        (
            _edited_adapter(adapter, tmp_path, {lora.TARGETS_METADATA: json.dumps("q_proj")}),
            "is not a list of target names",
        ),
        (_edited_adapter(adapter, tmp_path, peft_type="IA3"), "is not LORA"),
    ]
    for path, match in cases:
        fails(capsys, "merge", "--checkpoint", ckpt, "--adapter", path, "-o", out, match=match)
        shutil.rmtree(path)
    # an adapter trained on another model (tiny_keqv: other K/V shapes) does not load onto tiny
    other = str(tmp_path / "other")
    keqv = config.get_config("tiny_keqv")
    lora_cfg = lora.LoraConfig(rank=4, alpha=8)
    lora.save_peft(other, keqv, lora.init_adapters(keqv, lora_cfg, 0), lora_cfg)
    fails(capsys, "merge", "--checkpoint", ckpt, "--adapter", other, "-o", out, match="adapter")
    with pytest.raises(Gemma4Error):  # the library's PEFT import refuses it the same way
        lora.load_peft(other, CFG)
    # a pickled adapter is never loaded
    pickled = copy_ckpt(adapter, tmp_path, "pickled")
    os.rename(os.path.join(pickled, lora.PEFT_WEIGHTS), os.path.join(pickled, "adapter_model.bin"))
    fails(capsys, "merge", "--checkpoint", ckpt, "--adapter", pickled, "-o", out, match="is a pickle")
    with open(os.path.join(pickled, lora.PEFT_CONFIG), "w") as f:
        f.write("[]")
    fails(capsys, "merge", "--checkpoint", ckpt, "--adapter", pickled, "-o", out, match="is a pickle")
    assert not out.exists()


def _chats(tmp_path) -> str:
    path = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]}
    path.write_text("\n".join(json.dumps(chat) for _ in range(8)) + "\n")
    return str(path)


def test_finetune_resume_must_fit_the_run(ckpt, tmp_path, capsys):
    data = _chats(tmp_path)
    run = tmp_path / "run"
    base = ["finetune", "--data", data, "--steps", "2", "--batch", "2", "--seq-len", "32", "--rank", "2",
            "--save-every", "1", "--eval-fraction", "0", "-o", run]  # fmt: skip
    assert cli.main([str(a) for a in [*base, "--checkpoint", ckpt]]) == 0
    capsys.readouterr()
    kept = sorted(os.listdir(run / "checkpoints"))
    other = copy_ckpt(ckpt, tmp_path, "other-model")
    config.get_config("tiny").replace(ffw_hidden=48).save_json(os.path.join(other, "config.json"))
    shutil.rmtree(other)
    hf_format.save_hf_checkpoint(other, CFG.replace(ffw_hidden=48), model.init_params(CFG.replace(ffw_hidden=48)))
    write_tokenizer(other)
    fails(capsys, *base, "--checkpoint", other, "--resume", match="base model differ")
    rank = [a if a != "2" or i != base.index("--rank") + 1 else "4" for i, a in enumerate(base)]
    fails(capsys, *rank, "--checkpoint", ckpt, "--resume", match="lora differ")
    assert sorted(os.listdir(run / "checkpoints")) == kept
    # -o naming a file
    (tmp_path / "afile").write_text("mine")
    out_file = [*base[:-1], tmp_path / "afile"]
    fails(capsys, *out_file, "--checkpoint", ckpt, match="is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_missing_optional_extras_say_how_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("optax", "ai_edge_litert") else find_spec(name)
    )
    fails(capsys, "finetune", "--variant", "tiny", "--tokenizer", tmp_path, "--data", tmp_path / "d.jsonl", "-o",
          tmp_path / "o", match="pip install 'gemma4-jax[train]'")  # fmt: skip
    fails(
        capsys, "export", "litert", "--variant", "tiny", "-o", tmp_path / "l", match="pip install 'gemma4-jax[litert]'"
    )
    assert os.listdir(tmp_path) == []


# ----- text that is not UTF-8 ----------------------------------------------------------------------------------


def test_non_utf8_text(ckpt, tmp_path, capsys):
    bad = b"caf\xe9 \xff\xfe"
    result = run_cli(b"generate", b"--checkpoint", ckpt.encode(), b"--prompt", bad)
    one_line(result, "--prompt is not valid UTF-8 text")
    result = run_cli("chat", "--checkpoint", ckpt, "--max-new-tokens", "2", stdin=b"\xff\xfe\n/quit\n")
    assert result.returncode == 0 and b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "' + bad + b'"}\n')
    out = tmp_path / "o"
    fails(capsys, "finetune", "--checkpoint", ckpt, "--data", data, "-o", out, match="not UTF-8 text (byte 0xe9")
    text = tmp_path / "eval.txt"
    text.write_bytes(bad)
    fails(capsys, "eval-quant", "--checkpoint", ckpt, "--format", "int8", "--text", text, match="not UTF-8 text")
    assert not out.exists()


# ----- I/O faults: full disk, read-only file system, permissions, existing outputs ------------------------------


@contextlib.contextmanager
def mounted(path, *options) -> bool:
    """Mounts (tmpfs, or a bind) at `path` when this process may; yields whether it did."""
    os.makedirs(path, exist_ok=True)
    done = os.geteuid() == 0 and subprocess.run(["mount", *options, str(path)], capture_output=True).returncode == 0
    try:
        yield done
    finally:
        if done:
            subprocess.run(["umount", str(path)], capture_output=True)


def _inject(monkeypatch, code: int) -> None:
    """Makes every safetensors write fail with OSError `code`, as the kernel reports it."""
    write = files.SafetensorsWriter.write

    def failing(self, name, array):
        write(self, name, array)
        raise OSError(code, os.strerror(code), self._file.name)

    monkeypatch.setattr(files.SafetensorsWriter, "write", failing)


def test_disk_full(ckpt, tmp_path, capsys, monkeypatch):
    disk = tmp_path / "small"
    with mounted(disk, "-t", "tmpfs", "-o", "size=256k", "tmpfs") as real:
        if not real:
            _inject(monkeypatch, errno.ENOSPC)
        fails(capsys, "quantize", "--checkpoint", ckpt, "--format", "int8", "-o", disk / "q",
              match="No space left on device", leaves_empty=disk)  # fmt: skip
        fails(capsys, "export", "gguf", "--variant", "tiny_keqv", "--tokenizer", ckpt, "--quant", "f32", "-o",
              disk / "x.gguf", match="No space left on device", leaves_empty=disk)  # fmt: skip


def test_read_only_file_system(ckpt, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    with mounted(ro, "-o", "bind,ro", str(tmp_path / "ro")) as real:
        if not real:
            _inject(monkeypatch, errno.EROFS)
        line = fails(capsys, "convert", "--checkpoint", ckpt, "--to", "hf", "-o", ro / "c", match="cannot write",
                     leaves_empty=ro)  # fmt: skip
        assert "Read-only file system" in line or "permission denied" in line


def test_permission_denied(ckpt, tmp_path, capsys, monkeypatch):
    """Root ignores file modes, so the kernel's EACCES is injected at the writer."""
    _inject(monkeypatch, errno.EACCES)
    line = fails(capsys, "quantize", "--checkpoint", ckpt, "--format", "int8", "-o", tmp_path / "q",
                 match="Permission denied", leaves_empty=tmp_path)  # fmt: skip
    assert f"cannot write {tmp_path / 'q'}" in line


def test_existing_outputs_are_never_overwritten(ckpt, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("mine")
    for argv in (
        ["quantize", "--checkpoint", ckpt, "--format", "int8", "-o", busy],
        ["convert", "--checkpoint", ckpt, "--to", "hf", "-o", busy],
        ["export", "litert", "--checkpoint", ckpt, "-o", busy],
    ):
        fails(capsys, *argv, match="exists and is not an empty directory")
    fails(capsys, "export", "gguf", "--checkpoint", ckpt, "-o", busy, match="is a directory")
    fails(capsys, "logits", "--checkpoint", ckpt, "--tokens", "2", "--out", tmp_path / "nodir" / "x.npy",
          match="output directory does not exist")  # fmt: skip
    assert os.listdir(busy) == ["mine.txt"]


def test_outputs_get_the_umask_mode_and_killed_runs_are_cleaned_up(ckpt, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        stale = tmp_path / ".q.gemma4-jax-tmp-999999999"  # what a killed run of `quantize -o q` leaves behind
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"partial")
        assert cli.main(["quantize", "--checkpoint", ckpt, "--format", "int8", "-o", str(tmp_path / "q")]) == 0
        assert cli.main(["logits", "--checkpoint", ckpt, "--tokens", "2,3", "--out", str(tmp_path / "x.npy")]) == 0
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["q", "x.npy"]  # the stale temporary is gone
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "x.npy").st_mode) == 0o644
    for name in os.listdir(tmp_path / "q"):
        assert stat.S_IMODE(os.stat(tmp_path / "q" / name).st_mode) == 0o644, name


# ----- images and audio ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory):
    """A tiny multimodal HF checkpoint (vision and audio encoders) with its tokenizer, and a folder of media."""
    root = tmp_path_factory.mktemp("mm")
    path = str(root / "tiny_mm")
    cfg = config.get_config("tiny_mm")
    hf_format.save_hf_checkpoint(path, cfg, model.init_params(cfg, 0, jnp.float32))
    write_tokenizer(path)
    media = root / "media"
    media.mkdir()
    (media / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    (media / "empty.wav").write_bytes(b"")
    (media / "notes.txt").write_text("not audio at all")
    (media / "voice.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A ")
    import soundfile

    soundfile.write(str(media / "silence.wav"), np.zeros(0, np.float32), 16_000)
    soundfile.write(str(media / "tone.wav"), np.sin(np.arange(8_000) / 5).astype(np.float32), 16_000)
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(media / "gray.png")
    return path, media


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--image", "{media}/corrupt.png"], "cannot read image {media}/corrupt.png"),
        (["--image", "{media}/missing.png"], "image file not found: {media}/missing.png"),
        (["--image", "{media}/gray.png", "--image-tokens", "300"], "budget 300 is not one of 70, 140, 280, 560, 1120"),
        (["--prompt-ids", "2,62,62", "--image", "{media}/gray.png"], "2 image placeholder(s) (<|image|>) but 1 image"),
        (["--prompt-ids", "2,62", "--image", "{media}/gray.png", "--image", "{media}/gray.png"], "but 2 image(s)"),
        (["--prompt-ids", "2,63"], "1 audio placeholder(s) (<|audio|>) but 0 audio"),
        (["--audio", "{media}/empty.wav"], "{media}/empty.wav: not a readable audio file"),
        (["--audio", "{media}/notes.txt"], "{media}/notes.txt: not a readable audio file"),
        (["--audio", "{media}/silence.wav"], "{media}/silence.wav: the file contains no audio samples"),
        (
            ["--audio", "{media}/voice.m4a"],
            ".m4a audio cannot be decoded by libsndfile; convert it first, e.g. `ffmpeg",
        ),
    ],
)
def test_bad_media(capsys, mm_ckpt, argv, match):
    path, media = mm_ckpt
    argv = [a.format(media=media) for a in argv]
    prompt = [] if "--prompt-ids" in argv else ["--prompt", "look"]
    fails(
        capsys,
        "generate",
        "--checkpoint",
        path,
        *prompt,
        *argv,
        "--max-new-tokens",
        "2",
        match=match.format(media=media),
    )


def test_media_to_a_model_without_that_encoder(capsys, ckpt, mm_ckpt, tmp_path):
    path, media = mm_ckpt
    image, clip = str(media / "gray.png"), str(media / "tone.wav")
    fails(capsys, "generate", "--checkpoint", ckpt, "--prompt", "look", "--image", image, match="tiny has no vision")
    fails(capsys, "generate", "--checkpoint", path, "--text-only", "--prompt-ids", "2,62", "--image", image,
          match="has no vision encoder: it cannot take images")  # fmt: skip
    # a 31B-style model has no audio tower
    fails(capsys, "generate", "--variant", "tiny_mm_bidi", "--prompt-ids", "2,63", "--audio", clip,
          match="tiny_mm_bidi has no audio encoder: audio needs E2B or E4B")  # fmt: skip
    with pytest.raises(Gemma4Error, match="tiny has no vision encoder"):
        api.load(ckpt).generate("look", images=[image])


@pytest.mark.slow
def test_chat_media_errors_keep_the_conversation(mm_ckpt):
    """A bad /image or /audio in chat is one error line; the chat goes on, and the next good turn answers."""
    path, media = mm_ckpt
    script = f"/image {media}/corrupt.png\n/audio {media}/notes.txt\n/image {media}/gray.png\nhello\n/quit\n"
    result = run_cli("chat", "--checkpoint", path, "--image-tokens", "70", "--max-new-tokens", "2",
                     stdin=script.encode())  # fmt: skip
    err, out = result.stderr.decode(), result.stdout.decode()
    assert result.returncode == 0, err
    errors = [line for line in err.splitlines() if "gemma4-jax:" in line]
    assert len(errors) == 2 and "cannot read image" in errors[0] and "not a readable audio file" in errors[1]
    assert "(image attached to your next message)" in err and "model> " in out
