"""GGUF mmproj export: the vision and audio encoders as the projector file llama.cpp's multimodal library (mtmd)
reads, checked against two things nobody here wrote.

- llama.cpp's own converter (`convert_hf_to_gguf.py --mmproj`, vendored in the llama-cpp-python 0.3.36 sdist) on
  the HF checkpoint of the same random `Gemma4ForConditionalGeneration`: at f32, f16, bf16 and q8_0 our file has
  the same tensors (names, ggml types, shapes, bytes) and the same metadata, except (a) the audio attention's
  per-dim scale, stored as softplus(x), which we round once from float64 and torch computes in float32 (<= 1 ulp
  apart), and (b) two keys we add: `clip.use_gelu` (without it mtmd runs the vision MLP with x·sigmoid(1.702x)
  instead of Gemma's tanh GELU — the converter leaves it so; see MTMD_EMBEDDING_TOL) and the pooling kernel.
- mtmd itself (llama-cpp-python built with its multimodal library): a decisive tiny E2B-style model (vision +
  audio) exported as GGUF + mmproj. For photographs and espeak-ng speech, mtmd's encoder output equals our
  encoders' soft tokens, its logits after the image/audio prompt equal `model.apply`'s, and its greedy
  continuation equals ours. The model is trained so that two different images (and two different clips) lead to
  two different continuations, so the agreement says that mtmd saw our encoders' outputs, not that the model
  ignores them.

The images are sized to a fixed point of both preprocessors (multiples of 48 px within the token budget), so
neither resizes and both see the same pixels; mtmd computes its own log-mel features from the samples
(`mtmd-audio.cpp`), which is part of what is compared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import decisive
import jax
import numpy as np
import pytest
from mm_reference import hf_mm_model
from references import SDIST

from gemma4_jax import api, cli, config, hf_format, image, model, multimodal

skimage_data = pytest.importorskip("skimage.data")

# llama.cpp takes shared K/V from the last two owner layers (local, then global); 3 shared layers fit (test_gguf).
# mtmd tells E2B/E4B (causal attention over an image's tokens, as transformers) from 31B/26B-A4B (bidirectional) by
# the text width alone (1536 or 2560: `mtmd_decode_use_non_causal`), so this E2B-style model is 1536 wide.
CFG = config.get_config("tiny_mm").replace(name="tiny_mm_llama", num_kv_shared_layers=3, embed_dim=1536)
MARKER = "<__media__>"
BUDGET = 70
SIZES = {"astronaut": (336, 432), "coffee": (384, 384)}  # (height, width): fixed points at 70 soft tokens
SPEECH = ("Hello from Gemma.", "The sea is wide and blue.")
NEW_TOKENS = 6
_forward = jax.jit(model.apply, static_argnames="config")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _llama_cpp_tree(root: str) -> str:
    """The vendored llama.cpp's converter, conversion package and gguf-py, extracted from the sdist."""
    base = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    keep = (base + "convert_hf_to_gguf.py", base + "conversion/", base + "gguf-py/")
    with tarfile.open(SDIST) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(keep)]
        tar.extractall(root, members=members, filter="data")
    return os.path.join(root, base)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """transformers' random Gemma4ForConditionalGeneration (clip bounds that clamp), saved as an HF checkpoint with
    the image processor's config (the converter reads its mean/std) and the fixture tokenizer."""
    from tokenizer_fixture import write_tokenizer
    from transformers import Gemma4ImageProcessor

    path = str(tmp_path_factory.mktemp("hf"))
    hf_mm_model(CFG, seed=3).save_pretrained(path)
    Gemma4ImageProcessor().save_pretrained(path)
    write_tokenizer(path)
    return path


def _read(path: str):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_mmproj_equals_llama_cpp_converter(quant, hf_checkpoint, tmp_path, capsys):
    tree = _llama_cpp_tree(str(tmp_path / "llama.cpp"))
    theirs = str(tmp_path / "theirs.gguf")
    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "gguf-py")}
    run = subprocess.run(
        [sys.executable, "convert_hf_to_gguf.py", hf_checkpoint, "--mmproj", "--outtype", quant, "--outfile", theirs],
        cwd=tree, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ours = str(tmp_path / "ours.gguf")
    code, out, err = _cli(capsys, "export", "gguf", "--checkpoint", hf_checkpoint, "--quant", "f32",
                          "-o", str(tmp_path / "text.gguf"), "--mmproj", ours, "--mmproj-quant", quant)  # fmt: skip
    assert code == 0, err
    assert "mmproj (gemma4v, gemma4a)" in out

    our_fields, our_tensors = _read(ours)
    their_fields, their_tensors = _read(theirs)
    added = {"clip.use_gelu": True, "clip.vision.projector.scale_factor": CFG.vision.pooling_kernel}
    for key in sorted(set(our_fields) | set(their_fields) - {"general.name", "general.size_label"}):
        if key in added:
            assert our_fields[key] == added[key] and key not in their_fields, key
        elif key not in ("general.name", "general.size_label"):
            assert our_fields.get(key) == their_fields.get(key), key
    assert sorted(our_tensors) == sorted(their_tensors)
    assert len(our_tensors) > 200
    for name, a in our_tensors.items():
        b = their_tensors[name]
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), name
        if name.endswith("per_dim_scale.weight"):
            np.testing.assert_allclose(np.asarray(a.data), np.asarray(b.data), rtol=2.5e-7, err_msg=name)
        else:
            assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), name


# ----- mtmd runs our files ---------------------------------------------------------------------------------------

# max |mtmd - ours| over a medium's soft tokens, relative to their largest magnitude (f32 files). Measured on the
# inputs below: images 1.0e-3 .. 2.1e-3; audio 1.7e-2 .. 2.2e-2.
# The audio gap starts in mtmd's front end: it computes its own log-mel from the samples (`mtmd-audio.cpp`), and
# its HTK triangles, evaluated at the FFT bins' frequencies, leave several of the lowest ~20 mel bands without
# energy where transformers' filter bank (ours) has some: dumped from its graph on espeak speech, its features
# differ from ours by up to 0.69 on the log scale (mean 0.03), mostly log(0 + 0.001) against small energies.
# The image gap is mtmd's rounding, found by dumping its graph: its patch embedding (`ggml_conv_2d`, an f16
# im2col) rounds the scaled pixels and the kernel to f16 even in an f32 file (its output equals ours on f16-rounded
# pixels and kernel to 1.9e-7), and the vision attention amplifies that entry error. With the same rounding in our
# encoder the gap is MTMD_IMAGE_TOL_SAME_ROUNDING (measured 1.7e-4 .. 2.5e-4; the rest: ggml's f16 GELU table).
# Our f32 encoder itself is 8e-7 from our f64 one (= transformers' to 5e-13). Without `clip.use_gelu` (the
# converter's file) the image gap is 9.4e-3.
MTMD_EMBEDDING_TOL = {"image": 5e-3, "audio": 5e-2}
MTMD_IMAGE_TOL_SAME_ROUNDING = 1e-3
# max |logit difference| after the prompt (logit std ~3 on the trained model). Measured with the f32 mmproj:
# images 2.4e-4 .. 3.0e-4, audio 7.8e-4 .. 2.9e-3; with the q8_0 mmproj (mtmd rounds activations to Q8_0 blocks
# in its matmuls too) 3.1e-3 .. 1.7e-2.
MTMD_LOGIT_TOL = {"f32": 1e-2, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two photographs cropped and resized (PIL bicubic) to fixed points of both preprocessors, two espeak-ng
    utterances at 16 kHz."""
    import shutil

    from real_media import fixed_point_photo, speak

    from gemma4_jax import audio_features

    photos = {}
    for name, (h, w) in SIZES.items():
        photos[name] = np.asarray(fixed_point_photo(name, h, w))
        assert image.resized_size(h, w, BUDGET) == (h, w)
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng)")
    clips = [audio_features.load_audio(path) for path in speak(tmp_path_factory.mktemp("speech"), SPEECH)]
    return photos, clips


def _prompt(kind: str, placeholder: str) -> str:
    return f"Look{' and listen' if kind == 'audio' else ''}: {placeholder} What is it?"


@pytest.fixture(scope="module")
def decisive_export(hf_checkpoint, media, tmp_path_factory):
    """The HF checkpoint's weights (towers as transformers made them), the text decoder trained so that each of the
    four media prompts has its own continuation: params, media, prompts, the checkpoint and its f32 text GGUF."""
    photos, clips = media
    loaded = api.load(hf_checkpoint, dtype="float32", progress=False, layout="checkpoint")  # trained below
    params, tok = loaded.params, loaded.tokenizer
    for i in range(CFG.num_layers):  # as decisive.conditioned_init: attention out of saturation
        attn = params[f"layer_{i}"]["attn"]
        for norm in ("query_norm", "key_norm"):
            attn[norm]["scale"] = attn[norm]["scale"] * 0.3
    items = [("image", multimodal.load_image(photos[name], BUDGET)) for name in SIZES]
    items += [("audio", multimodal.load_audio(clip)) for clip in clips]
    targets = np.random.default_rng(9).integers(107, 512, size=(len(items), NEW_TOKENS)).tolist()
    examples = []
    for (kind, medium), target in zip(items, targets, strict=True):
        placeholder = "<|image|>" if kind == "image" else "<|audio|>"
        ids = multimodal.expand(tok.encode(_prompt(kind, placeholder), add_bos=True), [medium], CFG)
        examples.append((ids, target, multimodal.embed(params, CFG, ids, [medium])))
    params = decisive.train_decisive_media(CFG, params, examples)
    root = tmp_path_factory.mktemp("decisive")
    ckpt = str(root / "ckpt")
    hf_format.save_hf_checkpoint(ckpt, CFG, params)
    for name in os.listdir(hf_checkpoint):
        if name.startswith("tokenizer"):
            with open(os.path.join(hf_checkpoint, name), "rb") as src, open(os.path.join(ckpt, name), "wb") as dst:
                dst.write(src.read())
    text = str(root / "text.gguf")
    assert cli.main(["export", "gguf", "--checkpoint", ckpt, "--quant", "f32", "-o", text]) == 0
    return params, items, examples, ckpt, text


def _f16_patch_embedding(params, medium):
    """(params, config, image) for our encoder with mtmd's patch-embedding rounding: the pixels (scaled to [-1, 1])
    and the patch kernel rounded to f16."""

    params = jax.tree_util.tree_map(lambda x: x, jax.device_get(params))  # a new tree; leaves shared
    entry = dict(params["vision_encoder"]["entry"])
    entry["input_projection"] = {"w": np.asarray(entry["input_projection"]["w"]).astype(np.float16).astype(np.float32)}
    params["vision_encoder"] = {**params["vision_encoder"], "entry": entry}
    scaled = (2 * (medium.patches - 0.5)).astype(np.float16).astype(np.float32)
    return params, CFG, multimodal.Image(scaled / 2 + 0.5, medium.positions, medium.num_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("mmproj_quant", ["f32", "q8_0"])
def test_mtmd_image_and_audio_prompts_match_jax(mmproj_quant, decisive_export, media, tmp_path, capsys):
    params, items, examples, ckpt, text = decisive_export
    mmproj = str(tmp_path / "mmproj.gguf")
    argv = ["export", "gguf", "--checkpoint", ckpt, "--quant", "f32", "-o", str(tmp_path / "t.gguf")]
    code, _, err = _cli(capsys, *argv, "--mmproj", mmproj, "--mmproj-quant", mmproj_quant)
    assert code == 0, err
    from mtmd_runner import Mtmd

    photos, clips = media
    raw = [photos[name] for name in SIZES] + list(clips)
    runner = Mtmd(text, mmproj, image_tokens=(1, BUDGET))
    try:
        for (kind, medium), (ids, target, soft), data in zip(items, examples, raw, strict=True):
            bitmap = runner.image(data) if kind == "image" else runner.audio(data)
            chunks, parts = runner.tokenize(_prompt(kind, MARKER), [bitmap])
            # mtmd's chunks spell our expanded prompt: the same text ids around as many soft tokens
            media_parts = [p for p in parts if p.kind != "text"]
            assert [p.kind for p in media_parts] == [kind] and media_parts[0].n_tokens == medium.num_tokens
            slot = CFG.image_token_id if kind == "image" else CFG.audio_token_id
            assert [t for p in parts for t in (p.tokens or [slot] * p.n_tokens)] == ids, kind

            theirs = runner.embeddings(media_parts[0])
            ours = multimodal.encode(params, CFG, medium)
            err = np.abs(theirs - ours).max() / np.abs(ours).max()
            logits, greedy = runner.generate(chunks, NEW_TOKENS)
            extra = dict(soft_tokens=soft.embeddings[None], soft_mask=soft.mask[None], blocks=soft.blocks[None])
            reference = np.asarray(_forward(params, np.asarray([ids]), config=CFG, **extra)[0][0, -1], np.float32)
            diff = np.abs(logits - reference).max()
            print(f"mmproj {mmproj_quant} {kind} ({medium.num_tokens} soft tokens): soft tokens max rel diff "
                  f"{err:.2e}, logits after the prompt max diff {diff:.2e} (std {reference.std():.2f})")  # fmt: skip
            if mmproj_quant == "f32":
                assert err <= MTMD_EMBEDDING_TOL[kind], (kind, err)
                if kind == "image":
                    same = multimodal.encode(*_f16_patch_embedding(params, medium))
                    err_same = np.abs(theirs - same).max() / np.abs(ours).max()
                    print(f"  with mtmd's f16 patch embedding in ours: {err_same:.2e}")
                    assert err_same <= MTMD_IMAGE_TOL_SAME_ROUNDING, err_same
            assert diff <= MTMD_LOGIT_TOL[mmproj_quant], (kind, diff)
            assert greedy == target, kind
    finally:
        runner.close()
    # the continuations depend on the medium: each image and each clip has its own
    assert len({tuple(t) for _, t, _ in examples}) == len(examples)


def _tensor_bytes(path: str) -> dict[str, bytes]:
    return {name: np.asarray(t.data).tobytes() for name, t in _read(path)[1].items()}


@pytest.mark.slow
def test_mmproj_of_merged_lora_and_quantized_checkpoints(hf_checkpoint, tmp_path, capsys):
    """A merged LoRA fine-tune and a quantized checkpoint carry the encoders over unchanged: their mmproj files
    hold the base checkpoint's bytes, while the text GGUF of the merge does change."""
    import jax.numpy as jnp

    from gemma4_jax.train import lora

    def export(checkpoint: str, name: str) -> tuple[str, str]:
        text, mmproj = str(tmp_path / f"{name}.gguf"), str(tmp_path / f"{name}-mmproj.gguf")
        code, _out, err = _cli(capsys, "export", "gguf", "--checkpoint", checkpoint, "--quant", "f32", "-o", text,
                              "--mmproj", mmproj, "--mmproj-quant", "f32")  # fmt: skip
        assert code == 0, err
        return text, mmproj

    base_text, base_mmproj = export(hf_checkpoint, "base")
    lora_cfg = lora.LoraConfig(rank=4, alpha=8.0)
    rng = np.random.default_rng(4)  # B = 0 at init would make the merge a no-op
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32) if path[-1].key == "b" else x,
        lora.init_adapters(CFG, lora_cfg, seed=3),
    )
    lora.save_peft(str(tmp_path / "adapter"), CFG, adapters, lora_cfg)
    merged = str(tmp_path / "merged")
    argv = ["merge", "--checkpoint", hf_checkpoint, "--adapter", str(tmp_path / "adapter"), "--dtype", "f32"]
    assert _cli(capsys, *argv, "-o", merged)[0] == 0
    quantized = str(tmp_path / "q4_0")
    assert _cli(capsys, "quantize", "--checkpoint", hf_checkpoint, "--format", "q4_0", "-o", quantized)[0] == 0

    merged_text, merged_mmproj = export(merged, "merged")
    _, quantized_mmproj = export(quantized, "quantized")
    base = _tensor_bytes(base_mmproj)
    assert _tensor_bytes(merged_mmproj) == base
    assert _tensor_bytes(quantized_mmproj) == base
    assert _tensor_bytes(merged_text) != _tensor_bytes(base_text)


def test_mmproj_bad_input_is_one_line(hf_checkpoint, tmp_path, capsys):
    text = str(tmp_path / "text.gguf")
    cases = [
        (["--variant", "tiny", "--tokenizer", hf_checkpoint], "f16", "has no vision or audio encoder"),
        (["--checkpoint", hf_checkpoint, "--text-only"], "f16", "--text-only left them out"),
    ]
    for args, quant, message in cases:
        mmproj = str(tmp_path / "mmproj.gguf")
        code, _out, err = _cli(capsys, "export", "gguf", *args, "-o", text, "--mmproj", mmproj, "--mmproj-quant", quant)
        assert code != 0 and message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(mmproj) and not os.path.exists(text)
    # a 4-bit mmproj: argparse refuses the choice; the library says why
    with pytest.raises(SystemExit):
        cli.main(["export", "gguf", "--checkpoint", hf_checkpoint, "-o", text, "--mmproj", mmproj, "--mmproj-quant",
                  "q4_0"])  # fmt: skip
    assert "invalid choice: 'q4_0'" in capsys.readouterr().err
    from gemma4_jax import sources
    from gemma4_jax.errors import Gemma4Error
    from gemma4_jax.export.gguf import export_gguf

    with pytest.raises(Gemma4Error, match="no 4-bit encoder weights"):
        export_gguf(sources.open_source(hf_checkpoint), text, mmproj=str(tmp_path / "m.gguf"), mmproj_quant="q4_0")
    assert not os.path.exists(text)


def test_tokenizer_json_alone_names_bos(hf_checkpoint, tmp_path, capsys):
    """A tokenizer.json without tokenizer_config.json (e.g. the real vocabulary rebuilt from llama.cpp's) still gives
    llama.cpp its BOS: it forces add_bos for gemma4, and an unnamed BOS made mtmd abort on token id -1."""
    import shutil

    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(os.path.join(hf_checkpoint, "tokenizer.json"), tok / "tokenizer.json")
    path = str(tmp_path / "t.gguf")
    code, _, err = _cli(capsys, "export", "gguf", "--variant", "tiny_keqv", "--tokenizer", str(tok), "-o", path)
    assert code == 0, err
    fields, _ = _read(path)
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (2, 1)
