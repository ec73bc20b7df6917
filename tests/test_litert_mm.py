"""LiteRT export with the vision and audio towers: our tower models run in the ai-edge-litert interpreter and our
.litertlm in the LiteRT-LM engine (Google's runtimes, not our code), compared with our JAX encoders and decoder.

- Interpreter: each tower section's signature on a photograph (skimage) and on espeak-ng speech equals our JAX
  encoder (`vision.encode`/`project`, `audio.encode`/`project`) on the same inputs: float max |diff| <=
  1e-4 x max(1, max |output|) (measured up to 5.3e-6 of it); the int8 weight-only twin (same int8 weights,
  float compute) vs JAX on the dequantized weights to the same bound; the dynamic-range int8 models (what a
  quantized export ships; activations quantized at run time too) within INT8_BOUND of the output scale.
  Models: `tiny_mm` (E2B-style, vision + audio, clipped linears) and `tiny_mm_bidi` (31B-style, standardizing
  vision encoder), trained to be decisive.
- Engine: a decisive `tiny_mm` (its continuation of each of two photos and two clips is a different target, with
  top-1/top-2 margins >= 6) exported through the CLI and run by litert_lm on CPU (vision and audio backends CPU,
  greedy): the answer to each media prompt equals our JAX greedy continuation. The engine computes its own
  resize (none here: the photos are fixed points of both preprocessors), its own log-mel from the WAV samples and
  one more mel frame than transformers (the clips are cut so the token count agrees; asserted through the
  engine's token count), and it feeds the PLE row of token 0 at `<image|>` / `<audio|>`. A decisive
  `tiny_mm_bidi` too, trained to answer each photo differently when its soft tokens attend causally: the engine
  (filling the masks the bundle's ExecutorMetadata asks for) gives the bidirectional answer.
- Bidirectional graph: the exported prefill fed the engine's masks equals `model.apply` with image blocks on a
  two-image prompt (<= 1e-4; measured 2.0e-5), and is off by 4.7 with causal masks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import decisive
import jax
import numpy as np
import pytest

from gemma4_jax import audio, audio_features, cli, config, image, model, multimodal, vision
from gemma4_jax.export import litert, litert_towers

skimage_data = pytest.importorskip("skimage.data")

BUDGET = 70  # soft tokens per image: MAXP = 630 patches
FRAMES = 400  # audio frames per encoder call (4 s, covers the clips)
SIZES = {"astronaut": (336, 432), "coffee": (384, 384)}  # (height, width): fixed points at 70 soft tokens
SPEECH = ("Hello from Gemma.", "The sea is wide and blue.")
NEW_TOKENS = 6
# Our side of each comparison, jitted as the library runs it (one program per shape; eager dispatch would compile
# every operation on its own).
_forward = jax.jit(model.apply, static_argnames="config")
_encoders = {
    "image": (jax.jit(vision.encode, static_argnums=3), jax.jit(vision.project, static_argnums=2)),
    "audio": (jax.jit(audio.encode, static_argnums=3), jax.jit(audio.project, static_argnums=2)),
}
PREFILL_LEN, CACHE_LEN = 64, 256
# Dynamic-range int8 towers vs JAX on the same int8 weights, max |diff| / max(1, max |output|): measured 0.005 ..
# 0.038 on these models and inputs (the largest: tiny_mm_bidi's vision encoder, whose standardization scales the
# rounding up); the bound is twice the largest.
INT8_BOUND = 0.08
# Float (and int8 weight-only twin) vs JAX, relative to max(1, max |output|): tighter than the export's own check
# (litert_towers.TOLERANCE, sized for random full-size weights).
FLOAT_TOL = 1e-4


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----- the default tier ------------------------------------------------------------------------------------------


def test_matrix_einsum_equals_jnp_einsum():
    """The converter-friendly weight: every contraction form the encoders use, as one 2-D matmul."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    cases = [  # (eqn, x shape, stored weight axes, shape, contracted axes)
        ("bpd,ndh->bpnh", (2, 5, 6), ("n", "d", "h"), (3, 6, 4), ("d",)),
        ("bpd,cndh->cbpnh", (2, 5, 6), ("c", "n", "d", "h"), (2, 3, 6, 4), ("d",)),
        ("bpnh,nhd->bpd", (2, 5, 3, 4), ("n", "h", "d"), (3, 4, 6), ("n", "h")),
        ("btfc,fcd->btd", (1, 7, 4, 3), ("f", "c", "d"), (4, 3, 5), ("f", "c")),
        ("...m,md->...d", (1, 7, 6), ("m", "d"), (6, 5), ("m",)),
    ]
    for eqn, x_shape, axes, shape, contracts in cases:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(shape).astype(np.float32)
        kept = [k for k, a in enumerate(axes) if a not in contracts]
        summed = [k for k, a in enumerate(axes) if a in contracts]
        view = np.transpose(w, kept + summed).reshape(int(np.prod([shape[k] for k in kept])), -1)
        got = litert_towers.Matrix(view, axes, shape, contracts).einsum(eqn, jnp.asarray(x))
        np.testing.assert_allclose(got, np.einsum(eqn, x, w), rtol=1e-5, atol=1e-5, err_msg=eqn)


def test_random_towers_check_themselves(tokenizer_dir, tmp_path):
    """The default tier's tower path: a float export of random tiny_mm weights with both towers, which the exporter
    runs in the interpreter against our JAX encoders before writing anything; the bundle lists all modalities."""
    import litert_lm

    out = str(tmp_path / "litert")
    argv = ["export", "litert", "--variant", "tiny_mm", "--tokenizer", tokenizer_dir, "--prefill-len", "16"]
    argv += ["--cache-len", "128", "--image-tokens", str(BUDGET), "--audio-frames", "200", "-o", out]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "export.json")) as f:
        summary = json.load(f)
    assert summary["modalities"] == ["text", "vision", "audio"]
    assert summary["max_num_patches"] == 9 * BUDGET
    towers = summary["check"]["towers"]
    for file in ("vision_encoder", "vision_adapter", "audio_encoder", "audio_adapter"):
        assert towers[f"{file}.tflite"]["max_abs_diff"] <= towers[f"{file}.tflite"]["tolerance"]
    info = litert_lm.ModelInfo(os.path.join(out, "model.litertlm"))
    assert (info.input_modalities.vision, info.input_modalities.audio) == (True, True)
    assert info.max_vision_token_budget == BUDGET


def test_bad_tower_options_write_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    base = ["export", "litert", "--prefill-len", "8", "--cache-len", "16", "-o", str(out)]
    code, _, err = _cli(capsys, *base, "--variant", "tiny", "--modalities", "text,vision")
    assert code == 2 and err.count("\n") == 1 and "has no vision tower" in err
    code, _, err = _cli(capsys, *base, "--variant", "tiny_mm", "--quant", "int4", "--tower-quant", "int4")
    assert code == 2 and err.count("\n") == 1 and "towers can be stored as float or int8" in err
    code, _, err = _cli(capsys, *base, "--variant", "tiny_mm_bidi", "--modalities", "text,audio")
    assert code == 2 and err.count("\n") == 1 and "has no audio tower" in err
    code, _, err = _cli(capsys, *base, "--variant", "tiny_mm", "--modalities", "vision")
    assert code == 2 and err.count("\n") == 1 and "text required" in err
    code, _, err = _cli(capsys, *base, "--variant", "tiny_mm", "--audio-frames", "30")
    assert code == 2 and err.count("\n") == 1 and "--audio-frames" in err
    code, _, err = _cli(capsys, *base, "--variant", "tiny_mm_bidi", "--image-tokens", "70")
    assert code == 2 and err.count("\n") == 1 and "--prefill-len 8 < 72" in err
    assert not out.exists()


# ----- decisive models, the interpreter and the engine ------------------------------------------------------------


def test_bidirectional_prefill_equals_jax(tmp_path):
    """31B-style (tiny_mm_bidi): the exported prefill, fed the masks the LiteRT-LM engine fills (causal, and on
    local layers each image's soft tokens both ways), equals `model.apply` with its image blocks on a prompt with
    two images — and with causal masks it does not (the check can fail)."""
    from ai_edge_litert.interpreter import Interpreter

    from gemma4_jax.export import litert_graph

    cfg = config.get_config("tiny_mm_bidi")
    params = model.init_params(cfg, seed=0, dtype=np.float32)
    weights = litert_graph.graph_weights(cfg, params)
    path = litert.write_models(litert.convert_models(cfg, weights, 32, 64, towers=True), str(tmp_path))["model.tflite"]
    prefill = Interpreter(model_path=path).get_signature_runner("prefill")
    assert set(litert_graph.MASK_INPUTS.values()) <= set(prefill.get_input_details())
    # <bos> 5 <|image> 8 soft <image|> 7 <|image> 6 soft <image|> 9, padded to 32
    ids = [cfg.bos_id, 5, cfg.boi_token_id, *[cfg.image_token_id] * 8, cfg.eoi_token_id, 7, cfg.boi_token_id]
    ids += [*[cfg.image_token_id] * 6, cfg.eoi_token_id, 9]
    t = len(ids)
    soft = np.asarray(ids) == cfg.image_token_id
    blocks = np.where(soft, np.cumsum(np.asarray(ids) == cfg.boi_token_id) - 1, -1)
    rng = np.random.default_rng(0)
    soft_tokens = np.where(soft[:, None], rng.normal(size=(t, cfg.embed_dim)), 0).astype(np.float32)
    want = np.asarray(
        _forward(
            params,
            np.asarray([ids]),
            config=cfg,
            soft_tokens=soft_tokens[None],
            soft_mask=soft[None],
            blocks=blocks[None],
        )[0][0]
    )
    embeddings = np.zeros((1, 32, cfg.embed_dim), np.float32)
    embeddings[0, :t] = np.where(
        soft[:, None], soft_tokens, litert_graph.embed(cfg, weights[litert_graph.EMBEDDING], np.asarray([ids]))[0]
    )
    pos = np.zeros(32, np.int32)
    pos[:t] = np.arange(t)
    caches = {n: np.zeros(s, np.float32) for n, s in litert_graph.cache_shapes(cfg, 64).items()}
    errors = {}
    for kind, rows in (("engine", np.pad(soft, (0, 32 - t))), ("causal", None)):
        masks = litert_graph.engine_masks(pos, 64, rows)
        got = prefill(embeddings=embeddings, input_pos=pos, **masks, **caches)["logits"][0, :t]
        errors[kind] = float(np.abs(got - want).max())
    print(f"prefill vs model.apply with image blocks: {errors}")
    assert errors["engine"] <= 1e-4
    assert errors["causal"] > 100 * max(errors["engine"], 1e-6)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizer_fixture import write_tokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two photographs cropped and resized to fixed points of our preprocessing and the engine's (multiples of 48
    px inside the budget: neither resizes) as PNGs, and two espeak-ng utterances as 16 kHz 16-bit WAVs (both sides
    read the same samples) cut so that the engine's one extra mel frame does not add a token."""
    import soundfile
    from real_media import fixed_point_photo, speak

    root = tmp_path_factory.mktemp("media")
    photos = {}
    for name, (h, w) in SIZES.items():
        path = str(root / f"{name}.png")
        fixed_point_photo(name, h, w).save(path)
        assert image.resized_size(h, w, BUDGET) == (h, w)
        photos[name] = path
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng)")
    clips = []
    for i, raw in enumerate(speak(root, SPEECH, stem="raw")):
        samples = audio_features.load_audio(raw)
        # Ours: (n - 161) // 160 + 1 frames; the engine's semicausal framing keeps the trailing partial frame,
        # one more. With ours = 4k + 1 both give k + 1 tokens.
        frames = audio_features.num_mel_frames(len(samples))
        frames -= (frames - 1) % 4
        n = (frames - 1) * audio_features.HOP_LENGTH + 161 + 40
        assert audio_features.num_mel_frames(n) == frames and frames <= FRAMES
        path = str(root / f"speech{i}.wav")
        soundfile.write(path, samples[:n], audio_features.SAMPLE_RATE, subtype="PCM_16")
        clips.append(path)
    return photos, clips


def _messages(kind: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What is it?"}]}]


def _decisive(name: str, media, tokenizer_dir):
    """(config, params, items, examples): `name`'s conditioned random weights, the decoder trained so that each
    media prompt (the chat the engine renders: <bos><|turn>user\\n<media>What is it?<turn|>\\n<|turn>model\\n)
    has its own continuation."""
    from gemma4_jax.tokenizer import load_tokenizer

    cfg = config.get_config(name)
    photos, clips = media
    tok = load_tokenizer(tokenizer_dir)
    params = decisive.conditioned_init(cfg, 3)
    items = [("image", multimodal.load_image(path, BUDGET)) for path in photos.values()]
    if cfg.audio is not None:
        items += [("audio", multimodal.load_audio(path)) for path in clips]
    targets = np.random.default_rng(9).integers(107, 512, size=(2 * len(items), NEW_TOKENS)).tolist()
    examples = []
    for (kind, medium), target in zip(items, targets, strict=False):
        ids = tok.encode_chat(_messages(kind), add_generation_prompt=True)
        ids = multimodal.expand(ids, [medium], cfg)
        examples.append((ids, target, multimodal.embed(params, cfg, ids, [medium])))
    if cfg.vision_bidirectional:
        # Each photo seen causally (blocks off) must answer differently, so an engine that ignored the
        # bidirectional mask would be caught.
        for (ids, _, soft), target in zip(list(examples), targets[len(items) :], strict=True):
            examples.append((ids, target, dataclasses.replace(soft, blocks=np.full_like(soft.blocks, -1))))
    return cfg, decisive.train_decisive_media(cfg, params, examples), items, examples


@pytest.fixture(scope="module")
def decisive_mm(media, tokenizer_dir):
    """decisive_mm(name) -> `_decisive(name, ...)`, trained once per module (both towers tests and both engine
    tests use each model)."""
    trained = {}

    def get(name: str):
        if name not in trained:
            trained[name] = _decisive(name, media, tokenizer_dir)
        return trained[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_mm", "tiny_mm_bidi"])
def test_towers_equal_jax(name, decisive_mm, tmp_path):
    """Each tower model in the interpreter vs our JAX encoder, float and int8, on the photos and the speech."""
    from gemma4_jax.sources import TreeSource

    cfg, params, items, _ = decisive_mm(name)
    source = TreeSource(cfg, params)
    parts = litert_towers.select_parts(cfg, None)
    assert parts == (["vision", "audio"] if name == "tiny_mm" else ["vision"])
    for bits in (None, 8):
        weights = {part: litert_towers.read_tower(source, part, bits) for part in parts}
        ends = np.zeros(cfg.embed_dim, np.float32)
        models = litert_towers.vision_models(cfg, weights["vision"], ends, BUDGET)
        if "audio" in parts:
            models += litert_towers.audio_models(cfg, weights["audio"], ends, FRAMES)
        converted = litert_towers.convert(models)
        paths = {}
        for kind, weight_only in (("model", False), ("twin", True)):
            os.makedirs(tmp_path / f"{bits}{kind}")
            paths[kind] = litert.write_models(converted, str(tmp_path / f"{bits}{kind}"), weight_only=weight_only)
        for kind, medium in items:
            refs = _references(cfg, weights, kind, medium)
            for file, (inputs, expected) in refs.items():
                err, scale = litert_towers.compare(paths["twin"][file], inputs, expected)
                print(f"{name} {bits or 'float'} {file} {kind}: max |diff| {err:.3g} of scale {scale:.3g}")
                assert err <= FLOAT_TOL * max(1.0, scale)
                if bits:
                    err, scale = litert_towers.compare(paths["model"][file], inputs, expected)
                    print(f"{name} dynamic int8 {file} {kind}: max |diff| {err / max(1.0, scale):.3g} of the scale")
                    assert err <= INT8_BOUND * max(1.0, scale)


def _references(cfg, weights, kind, medium):
    """Our JAX encoder on one medium padded to the exported shapes ({file: (inputs, outputs)})."""
    encode, project = _encoders[kind]
    if kind == "image":
        tree = litert_towers.plain_tree(weights["vision"])
        patches, positions = medium.patches[None], medium.positions[None]
        tokens, valid = encode(tree["vision_encoder"], patches, positions, cfg.vision)
        tokens, valid = np.asarray(tokens), np.asarray(valid)
        assert valid.sum() == medium.num_tokens
        embedded = np.asarray(project(tree["embedder"]["mm_input_projection"], tokens, cfg.vision))
        return {
            "vision_encoder.tflite": (
                {"images": patches, "positions_xy": positions},
                {"features": tokens, "mask": valid},
            ),
            "vision_adapter.tflite": ({"soft_tokens": tokens}, {"mm_embedding": embedded}),
        }
    tree = litert_towers.plain_tree(weights["audio"])
    features = np.zeros((1, FRAMES, medium.features.shape[-1]), np.float32)
    mask = np.zeros((1, FRAMES), bool)
    features[0, : len(medium.mask)], mask[0, : len(medium.mask)] = medium.features, medium.mask
    encoded, valid = encode(tree, features, mask, cfg.audio)
    encoded, valid = np.asarray(encoded), np.asarray(valid)
    assert valid.sum() == medium.num_tokens
    projected = np.asarray(project(tree, encoded, cfg.audio)) * valid[..., None]
    return {
        "audio_encoder.tflite": ({"src_inputs": features, "mask": mask[:, None]}, {"features": encoded, "mask": valid}),
        "audio_adapter.tflite": ({"features": encoded, "mask": valid}, {"features": projected}),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_mm", "tiny_mm_bidi"])
def test_engine_media_prompts_equal_jax(name, decisive_mm, media, tokenizer_dir, tmp_path):
    """A decisive tiny model exported through the CLI (float) and run by the LiteRT-LM engine: for each photo and
    clip, the engine's greedy answer is our JAX greedy continuation, and its prompt has the same token count.
    tiny_mm_bidi (31B-style): its images attend bidirectionally, which the engine does from the bundle's
    ExecutorMetadata; the model is trained to answer each photo differently when its soft tokens are causal,
    so an engine that attended causally would give that other answer."""
    import litert_lm

    from gemma4_jax.hf_format import save_hf_checkpoint

    cfg, params, items, examples = decisive_mm(name)
    photos, clips = media
    # tiny_mm_bidi: an image and its prompt in one prefill call; the causal answers (examples past the items).
    prefill = 2 * PREFILL_LEN if cfg.vision_bidirectional else PREFILL_LEN
    causal = {i: target for i, (_, target, _) in enumerate(examples[len(items) :])}
    ckpt = str(tmp_path / "ckpt")
    save_hf_checkpoint(ckpt, cfg, params)
    out = str(tmp_path / "litert")
    argv = ["export", "litert", "--checkpoint", ckpt, "--tokenizer", tokenizer_dir, "--prefill-len", str(prefill)]
    argv += ["--cache-len", str(CACHE_LEN), "--image-tokens", str(BUDGET), "--audio-frames", str(FRAMES), "-o", out]
    assert cli.main(argv) == 0
    paths = [*photos.values(), *clips][: len(items)]
    engine = litert_lm.Engine(
        os.path.join(out, "model.litertlm"),
        backend=litert_lm.Backend.CPU(),
        vision_backend=litert_lm.Backend.CPU(),
        audio_backend=litert_lm.Backend.CPU() if cfg.audio is not None else None,
        max_num_tokens=CACHE_LEN,
        cache_dir=str(tmp_path),
    )
    try:
        for i, ((kind, _), (ids, target, _), path) in enumerate(zip(items, examples, paths, strict=False)):
            content = litert_lm.Content.ImageFile(path) if kind == "image" else litert_lm.Content.AudioFile(path)
            conversation = engine.create_conversation(sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0))
            message = litert_lm.Message.user(litert_lm.Contents.of(content, litert_lm.Content.Text("What is it?")))
            reply = str(conversation.send_message(message, max_output_tokens=NEW_TOKENS))
            count = conversation.token_count
            conversation.close()
            expected = engine.detokenize(target)
            print(
                f"{os.path.basename(path)}: engine {reply!r}, JAX {expected!r}, "
                f"tokens {count} vs {len(ids)} + {NEW_TOKENS}"
            )
            assert count == len(ids) + NEW_TOKENS
            assert reply == expected
            if i in causal:
                assert causal[i] != target and reply != engine.detokenize(causal[i])
    finally:
        engine.close()


@pytest.mark.slow
def test_int4_export_of_quantized_checkpoint_keeps_int8_towers(tokenizer_dir, tmp_path):
    """From an int4 quantized checkpoint (towers stored float there): `--quant int4` writes the towers' matrices as
    int8 per-channel FULLY_CONNECTED weights, and its built-in check (int8 weight-only twin vs JAX, dynamic-range
    model bounded) passes."""
    from ai_edge_litert import schema_py_generated as schema

    ckpt, out = str(tmp_path / "q"), str(tmp_path / "litert")
    assert cli.main(["quantize", "--variant", "tiny_mm", "--format", "int4", "-o", ckpt]) == 0
    argv = ["export", "litert", "--checkpoint", ckpt, "--quant", "int4", "--tokenizer", tokenizer_dir]
    argv += ["--prefill-len", "16", "--cache-len", "128", "--image-tokens", str(BUDGET), "--audio-frames", "200"]
    assert cli.main([*argv, "-o", out]) == 0
    with open(os.path.join(out, "export.json")) as f:
        towers = json.load(f)["check"]["towers"]
    assert towers["tower_bits"] == 8
    cfg = config.get_config("tiny_mm")
    # q, kv, out, gate/up, down per vision layer; 4 FFN, q, k, v, post, 2 light-conv per audio layer + 2 projections.
    expected = {
        "vision_encoder": 5 * cfg.vision.num_layers,
        "vision_adapter": 1,
        "audio_encoder": 10 * cfg.audio.num_layers + 2,
        "audio_adapter": 1,
    }
    for name, count in expected.items():
        assert towers[f"{name}.tflite"]["max_abs_diff"] <= towers[f"{name}.tflite"]["tolerance"]
        with open(os.path.join(out, f"{name}.tflite"), "rb") as f:
            tflite = schema.ModelT.InitFromPackedBuf(f.read(), 0)
        int8 = [t for t in tflite.subgraphs[0].tensors if t.type == schema.TensorType.INT8]
        assert len(int8) == count, name
        assert all(len(t.quantization.scale) == t.shape[0] for t in int8)  # per output channel


@pytest.mark.slow
def test_merged_lora_export_keeps_the_towers(tokenizer_dir, tmp_path):
    """A merged LoRA fine-tune of tiny_mm exported with its towers: the tower models are byte-identical to the
    base checkpoint's, the main model is not, and the export's own checks (JAX vs interpreter) pass."""
    import jax
    import jax.numpy as jnp

    from gemma4_jax.hf_format import save_hf_checkpoint
    from gemma4_jax.model import init_params
    from gemma4_jax.train import lora

    cfg = config.get_config("tiny_mm")
    base = str(tmp_path / "base")
    save_hf_checkpoint(base, cfg, init_params(cfg, seed=0, dtype=np.float32))
    lora_cfg = lora.LoraConfig(rank=4, alpha=8.0)
    rng = np.random.default_rng(4)  # B = 0 at init would make the merge a no-op
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32) if path[-1].key == "b" else x,
        lora.init_adapters(cfg, lora_cfg, seed=3),
    )
    lora.save_peft(str(tmp_path / "adapter"), cfg, adapters, lora_cfg)
    merged = str(tmp_path / "merged")
    argv = ["merge", "--checkpoint", base, "--adapter", str(tmp_path / "adapter"), "--dtype", "f32", "-o", merged]
    assert cli.main(argv) == 0
    files = {}
    for name, checkpoint in (("base", base), ("merged", merged)):
        out = str(tmp_path / f"{name}-litert")
        argv = ["export", "litert", "--checkpoint", checkpoint, "--tokenizer", tokenizer_dir, "--prefill-len", "16"]
        argv += ["--cache-len", "64", "--image-tokens", str(BUDGET), "--audio-frames", "200", "-o", out]
        assert cli.main(argv) == 0
        files[name] = {}
        for file in sorted(os.listdir(out)):
            if file.endswith(".tflite"):
                with open(os.path.join(out, file), "rb") as f:
                    files[name][file] = f.read()
    towers = [f for f in files["base"] if f.startswith(("vision", "audio", "end_of"))]
    assert len(towers) == 6
    for file in towers:
        assert files["merged"][file] == files["base"][file], file
    assert files["merged"]["model.tflite"] != files["base"]["model.tflite"]
