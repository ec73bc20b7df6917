"""Real inputs for the multimodal tests: photographs shipped with scikit-image and speech spoken by espeak-ng."""

from __future__ import annotations

import os
import subprocess


def fixed_point_photo(name: str, height: int, width: int):
    """scikit-image's `name`.png as an RGB PIL image of exactly `height` x `width`: scaled (bicubic) to cover that
    size, then center-cropped. Pick a size our preprocessing keeps (`image.resized_size(h, w, budget) == (h, w)`)
    and a runtime with its own resize gets the same pixels."""
    from PIL import Image
    from skimage import data

    img = Image.open(os.path.join(data.data_dir, f"{name}.png")).convert("RGB")
    scale = max(height / img.height, width / img.width)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def speak(directory, texts, stem: str = "speech") -> list[str]:
    """`texts` spoken by espeak-ng as WAV files (its native 22.05 kHz) in `directory`: their paths."""
    paths = []
    for i, text in enumerate(texts):
        path = os.path.join(str(directory), f"{stem}{i}.wav")
        subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
        paths.append(path)
    return paths
