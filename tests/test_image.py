"""Image preprocessing against transformers' `Gemma4ImageProcessorPil` (what `AutoImageProcessor` loads without
torchvision), on the photographs shipped with scikit-image and on synthetic edge cases: patches must be
bit-identical, positions and soft-token counts equal. Plus the spec §7.5 token table and bad inputs.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import transformers
from transformers.models.gemma4 import image_processing_pil_gemma4 as hf_image

from gemma4_jax import image
from gemma4_jax.errors import Gemma4Error

PIL_Image = pytest.importorskip("PIL.Image")
skimage_data = pytest.importorskip("skimage.data")


def _photo(name):
    return os.path.join(skimage_data.data_dir, name)


def hf_preprocess(img, budget, **kwargs):
    out = hf_image.Gemma4ImageProcessorPil(max_soft_tokens=budget)(img, return_tensors="np", **kwargs)
    return out["pixel_values"][0], out["image_position_ids"][0], out["num_soft_tokens_per_image"][0]


def assert_same(ours_input, hf_input, budget, **hf_kwargs):
    patches, positions, count = hf_preprocess(hf_input, budget, **hf_kwargs)
    got = image.preprocess(ours_input, budget)
    assert got.patches.dtype == np.float32 and got.patches.shape == patches.shape == (9 * budget, 768)
    assert np.array_equal(got.patches, patches), f"max diff {np.abs(got.patches - patches).max()}"
    assert np.array_equal(got.positions, positions)
    assert got.num_soft_tokens == count
    assert (got.positions[:, 0] >= 0).sum() == 9 * count  # real patches first, then (-1, -1) padding
    assert (got.positions[9 * count :] == -1).all() and not got.patches[9 * count :].any()
    return got


# Real photographs: RGB PNG/JPEG, a grayscale PNG (camera), an RGBA PNG (logo), a palette GIF.
PHOTOS = ["astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "camera.png", "logo.png"]
PHOTOS += ["no_time_for_that_tiny.gif", "retina.jpg"]


@pytest.mark.parametrize("budget", image.SOFT_TOKEN_BUDGETS)
@pytest.mark.parametrize("name", PHOTOS)
def test_photo_files_match_hf(name, budget):
    assert_same(_photo(name), _photo(name), budget)


@pytest.mark.parametrize("budget", [70, 280])
@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "logo.png", "no_time_for_that_tiny.gif"])
def test_pil_images_and_arrays_match_hf(name, budget):
    with PIL_Image.open(_photo(name)) as pil:
        pil.load()
        assert_same(pil, pil, budget)
        if pil.mode in ("RGB", "RGBA", "L"):
            array = np.asarray(pil)
            hf_array = array[..., None] if array.ndim == 2 else array
            assert_same(array, hf_array, budget, input_data_format="channels_last")


@pytest.mark.parametrize("budget", [70, 1120])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (7, 5), (1, 2000), (2000, 1), (48, 48), (432, 336), (3, 4000)])
def test_extreme_and_tiny_sizes_match_hf(shape, budget):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = assert_same(pixels, PIL_Image.fromarray(pixels), budget)
    assert got.size == image.resized_size(*shape, budget)


def test_one_side_rounding_to_zero():
    """A 1x2000 strip: the short side becomes 48 px, the long one floor(2000/1) * 48 capped at budget * 48."""
    assert image.resized_size(1, 2000, 70) == (48, 3360)
    assert image.resized_size(2000, 1, 70) == (3360, 48)
    assert image.num_soft_tokens(1, 2000, 70) == 70
    # A side rounds to 0 only when the aspect ratio exceeds the budget, so the cap always decides the long side.
    assert image.resized_size(20, 1500, 70) == (48, 3360)
    assert image.resized_size(10, 500, 70) == (48, 2832)  # ratio 50: no side rounds to 0


def test_resized_size_matches_hf_everywhere():
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(1, 64, (200, 2)), rng.integers(1, 8000, (800, 2))])
    for (h, w), budget in zip(sizes.tolist(), rng.choice(image.SOFT_TOKEN_BUDGETS, len(sizes)), strict=True):
        expected = hf_image.get_aspect_ratio_preserving_size(h, w, 16, int(budget) * 9, 3)
        assert image.resized_size(h, w, int(budget)) == expected, (h, w, budget)


def _rgba_with_hidden_colour():
    """RGBA whose transparent pixels hide saturated colours: compositing onto white and dropping alpha differ."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (97, 131, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((97, 131)) < 0.5, 0, rgba[..., 3])
    return rgba


def test_transparency_is_handled_as_in_transformers(tmp_path):
    """Given as a PIL image or array, alpha is composited onto white; given as a path, it is dropped (transformers'
    `load_image` converts to RGB first). A palette's transparent index is composited either way (as a colour key
    after `load_image`'s conversion)."""
    rgba = _rgba_with_hidden_colour()
    path = str(tmp_path / "rgba.png")
    PIL_Image.fromarray(rgba, "RGBA").save(path)
    from_path = assert_same(path, path, 70)
    from_pil = assert_same(PIL_Image.fromarray(rgba, "RGBA"), PIL_Image.fromarray(rgba, "RGBA"), 70)
    assert_same(rgba, rgba, 70, input_data_format="channels_last")
    assert not np.array_equal(from_path.patches, from_pil.patches)

    palette = PIL_Image.fromarray(rgba[..., :3]).convert("P", palette=PIL_Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    palette_path = str(tmp_path / "palette.png")
    palette.save(palette_path, transparency=3)
    assert_same(palette, palette, 140)
    with PIL_Image.open(palette_path) as reopened:
        assert reopened.mode == "P"
        assert_same(reopened, reopened, 140)
    assert_same(palette_path, palette_path, 140)

    la = PIL_Image.fromarray(rgba[..., [0, 3]], "LA")
    assert_same(la, la, 70)


def test_exif_orientation_applies_to_files_only(tmp_path):
    """transformers applies the EXIF orientation when it opens a file, not to a PIL image it is handed."""
    pixels = np.asarray(PIL_Image.open(_photo("rocket.jpg")))[:200, :300]
    exif = PIL_Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = str(tmp_path / "rotated.jpg")
    PIL_Image.fromarray(pixels).save(path, exif=exif, quality=90)
    upright = assert_same(path, path, 140)
    with PIL_Image.open(path) as raw:
        raw.load()
        stored = assert_same(raw, raw, 140)
    assert upright.size == image.resized_size(300, 200, 140)  # portrait after rotation
    assert stored.size == image.resized_size(200, 300, 140)


def test_other_modes_match_hf(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    cmyk_path = str(tmp_path / "cmyk.jpg")
    PIL_Image.fromarray(rgb).convert("CMYK").save(cmyk_path)
    assert_same(cmyk_path, cmyk_path, 70)
    with PIL_Image.open(cmyk_path) as cmyk:
        assert cmyk.mode == "CMYK"
        cmyk.load()
        assert_same(cmyk, cmyk, 70)
    gray16 = PIL_Image.fromarray(rng.integers(0, 65536, (64, 80), dtype=np.uint16))
    assert_same(gray16, gray16, 70)


def test_auto_image_processor_here_is_the_pil_one(tmp_path):
    """What this module matches: with the project's dependencies (no torchvision), `AutoImageProcessor` loads
    `Gemma4ImageProcessorPil` (bicubic, no normalization)."""
    pytest.importorskip("PIL")
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed: AutoImageProcessor picks the torchvision backend")
    except ImportError:
        pass
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Gemma4ImageProcessor"}))
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    assert type(processor).__name__ == "Gemma4ImageProcessorPil"
    assert processor.resample == PIL_Image.Resampling.BICUBIC and not processor.do_normalize
    assert processor.max_soft_tokens == image.DEFAULT_BUDGET


# Spec §7.5: (input H, W) -> per budget (H', W', tokens).
SPEC_TABLE = {
    (1024, 1024): [(384, 384, 64), (528, 528, 121), (768, 768, 256), (1104, 1104, 529), (1584, 1584, 1089)],
    (768, 1024): [(336, 432, 63), (480, 624, 130), (672, 912, 266), (960, 1296, 540), (1344, 1824, 1064)],
    (1080, 1920): [(288, 528, 66), (384, 720, 120), (576, 1056, 264), (816, 1488, 527), (1200, 2112, 1100)],
    (176, 272): [(288, 480, 60), (432, 672, 126), (624, 960, 260), (912, 1392, 551), (1248, 1968, 1066)],
    (100, 2000): [(48, 1776, 37), (96, 2496, 104), (144, 3552, 222), (240, 5040, 525), (336, 7152, 1043)],
}


@pytest.mark.parametrize("size", list(SPEC_TABLE))
def test_spec_token_table(size):
    for budget, (h, w, tokens) in zip(image.SOFT_TOKEN_BUDGETS, SPEC_TABLE[size], strict=True):
        assert image.resized_size(*size, budget) == (h, w)
        assert image.num_soft_tokens(*size, budget) == tokens == (h // 16) * (w // 16) // 9
        assert tokens <= budget


def test_spec_table_row_end_to_end():
    """One §7.5 row through the whole preprocessing (a 768x1024 image at budget 280: 672x912, 266 tokens)."""
    got = image.preprocess(np.zeros((768, 1024, 3), np.uint8), 280)
    assert got.size == (672, 912) and got.num_soft_tokens == 266
    assert got.positions[: 266 * 9].max(axis=0).tolist() == [912 // 16 - 1, 672 // 16 - 1]


def test_patch_layout():
    """Patch k is row k // W_p, column k % W_p; its 768 values are (row, col, channel), channel fastest."""
    assert image.resized_size(384, 384, 70) == (384, 384)  # already the target size: no resampling
    pixels = np.random.default_rng(3).integers(0, 256, (384, 384, 3), dtype=np.uint8)
    got = image.preprocess(pixels, 70)
    cols = 384 // 16
    for k in (0, 1, cols, 5 * cols + 3, 24 * 24 - 1):
        row, col = divmod(k, cols)
        block = pixels[16 * row : 16 * row + 16, 16 * col : 16 * col + 16].astype(np.float64) / 255
        np.testing.assert_allclose(got.patches[k], block.reshape(-1), rtol=1e-7)
        assert got.positions[k].tolist() == [col, row]


def test_batch():
    patches, positions, counts = image.preprocess_batch([_photo("astronaut.png"), _photo("rocket.jpg")], 70)
    assert patches.shape == (2, 630, 768) and positions.shape == (2, 630, 2)
    assert counts == [64, 60]


def test_bad_inputs(tmp_path):
    with pytest.raises(Gemma4Error, match="budget 100 is not one of 70, 140, 280, 560, 1120"):
        image.preprocess(np.zeros((8, 8, 3), np.uint8), 100)
    with pytest.raises(Gemma4Error, match="not found"):
        image.preprocess(str(tmp_path / "missing.png"))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(Gemma4Error, match="cannot read image"):
        image.preprocess(str(garbage))
    with open(_photo("rocket.jpg"), "rb") as f:
        data = f.read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(Gemma4Error, match="cannot read image"):
        image.preprocess(str(truncated))
    with pytest.raises(Gemma4Error, match="uint8"):
        image.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(Gemma4Error, match="shape"):
        image.preprocess(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(Gemma4Error, match="no pixels"):
        image.preprocess(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(Gemma4Error, match="unsupported image input"):
        image.preprocess([[1, 2], [3, 4]])
    with pytest.raises(Gemma4Error, match="no images"):
        image.preprocess_batch([])
