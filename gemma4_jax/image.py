"""Image preprocessing for the vision encoder: image -> padded patches, patch positions, soft-token count.

Equal to transformers' PIL-backend image processor `Gemma4ImageProcessorPil` (transformers 5.23.0), which is
what `AutoImageProcessor` / `Gemma4Processor` load when torchvision is not installed (this project does not
depend on torchvision). With torchvision installed they load the torchvision-backend `Gemma4ImageProcessor`
instead: identical except for the resize kernel (torch's antialiased bicubic instead of Pillow's), which
differs from Pillow by one or two levels of 255 on a small fraction of pixels.

Steps (spec §4.1 steps 1-2): RGB as transformers converts it; aspect-preserving bicubic resize (Pillow
`Image.resize(..., BICUBIC)`) to sides that are multiples of 48 px with at most 9 x budget patches, small images
enlarged; pixels / 255 in [0, 1]; 16x16 patches row-major, each flattened in (row, col, channel) order;
positions (x = column, y = row); padding to 9 x budget patches with zero patches at position (-1, -1).

Needs Pillow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gemma4_jax.errors import Gemma4Error

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280  # transformers' default (`max_soft_tokens`); the official JAX sampler uses 1120
PATCH_SIZE = 16
POOLING_KERNEL = 3


class ProcessedImage(NamedTuple):
    patches: np.ndarray  # [9 * budget, 768] float32 in [0, 1]; padding rows are 0
    positions: np.ndarray  # [9 * budget, 2] int32 (x, y); padding rows are (-1, -1)
    num_soft_tokens: int  # (H'/48) (W'/48): the number of placeholder tokens this image takes
    size: tuple[int, int]  # (H', W') after the resize


def _check_budget(budget: int) -> int:
    if budget not in SOFT_TOKEN_BUDGETS:
        raise Gemma4Error(f"soft-token budget {budget!r} is not one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}")
    return budget


def resized_size(height: int, width: int, budget: int = DEFAULT_BUDGET) -> tuple[int, int]:
    """(H', W'): the largest multiples of 48 px with the image's aspect ratio and at most 9 x budget patches.

    If one side rounds to 0 it becomes 48 and the other `floor(ratio) * 48`, at most `budget * 48` (the rule of
    transformers' `get_aspect_ratio_preserving_size`, in the same floating-point operations)."""
    _check_budget(budget)
    if height < 1 or width < 1:
        raise Gemma4Error(f"image of size {height}x{width} has no pixels")
    side = POOLING_KERNEL * PATCH_SIZE
    max_patches = budget * POOLING_KERNEL**2
    target_px = max_patches * PATCH_SIZE**2
    factor = math.sqrt(target_px / (height * width))
    new_h = math.floor(factor * height / side) * side
    new_w = math.floor(factor * width / side) * side
    longest = budget * side
    if new_h == 0:
        new_h, new_w = side, min(math.floor(width / height) * side, longest)
    elif new_w == 0:
        new_h, new_w = min(math.floor(height / width) * side, longest), side
    return new_h, new_w


def num_soft_tokens(height: int, width: int, budget: int = DEFAULT_BUDGET) -> int:
    """Soft tokens an image of this size becomes (spec §7.5)."""
    new_h, new_w = resized_size(height, width, budget)
    return (new_h // PATCH_SIZE) * (new_w // PATCH_SIZE) // POOLING_KERNEL**2


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise Gemma4Error("image preprocessing needs Pillow: pip install pillow") from None
    return PIL


def load_rgb(image) -> np.ndarray:
    """A path, PIL image or uint8 array -> [H, W, 3] uint8 RGB, converted exactly as transformers does:

    - path: opened with Pillow, EXIF orientation applied (`ImageOps.exif_transpose`), `convert("RGB")`
      (transformers' `load_image`: an alpha channel is dropped, a palette's transparent index becomes a colour
      key), then as a PIL image;
    - PIL image: taken as is (no EXIF rotation); with an alpha channel or a transparency key it is composited
      onto white, otherwise `convert("RGB")` (grayscale, palette, CMYK, ...);
    - numpy array, channels last: [H, W] or [H, W, 1] gray (repeated), [H, W, 3] RGB, [H, W, 4] RGBA
      (composited onto white, rounded); uint8 only.
    """
    PIL = _pil()
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise Gemma4Error(f"image file not found: {path}")
        try:
            with PIL.Image.open(path) as opened:
                # `convert("RGB")` keeps a palette's transparency as a colour key, composited below.
                image = PIL.ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise Gemma4Error(f"cannot read image {path}: {e}") from None
    if isinstance(image, PIL.Image.Image):
        try:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
                return np.asarray(PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
            return np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as e:
            raise Gemma4Error(f"cannot convert the {image.mode} image to RGB: {e}") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise Gemma4Error(f"image arrays must be uint8 (0-255), got {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise Gemma4Error(f"image array of shape {image.shape}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.shape[-1] == 4:
            alpha = image[..., 3:4] / 255
            return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return image
    raise Gemma4Error(f"unsupported image input {type(image).__name__}: pass a path, a PIL image or a uint8 array")


def preprocess(image, budget: int = DEFAULT_BUDGET) -> ProcessedImage:
    """One image -> patches, positions and soft-token count for the vision encoder (see the module docstring)."""
    _check_budget(budget)
    PIL = _pil()
    rgb = load_rgb(image)
    height, width = rgb.shape[:2]
    new_h, new_w = resized_size(height, width, budget)
    if (new_h, new_w) != (height, width):
        rgb = np.asarray(PIL.Image.fromarray(rgb).resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC))
    # transformers rescales in float64 and rounds to float32.
    pixels = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    rows, cols = new_h // PATCH_SIZE, new_w // PATCH_SIZE
    patches = pixels.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    x, y = np.meshgrid(np.arange(cols, dtype=np.int32), np.arange(rows, dtype=np.int32), indexing="xy")
    positions = np.stack([x, y], axis=-1).reshape(rows * cols, 2)

    max_patches = budget * POOLING_KERNEL**2
    padded = np.zeros((max_patches, patches.shape[1]), np.float32)
    padded[: len(patches)] = patches
    padded_positions = np.full((max_patches, 2), -1, np.int32)
    padded_positions[: len(positions)] = positions
    return ProcessedImage(padded, padded_positions, len(patches) // POOLING_KERNEL**2, (new_h, new_w))


def preprocess_batch(images: Sequence, budget: int = DEFAULT_BUDGET) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Images -> (patches [B, 9 * budget, 768], positions [B, 9 * budget, 2], soft tokens per image), the
    `pixel_values`, `image_position_ids` and `num_soft_tokens_per_image` of transformers' processor."""
    done = [preprocess(image, budget) for image in images]
    if not done:
        raise Gemma4Error("no images to preprocess")
    return (
        np.stack([d.patches for d in done]),
        np.stack([d.positions for d in done]),
        [d.num_soft_tokens for d in done],
    )
