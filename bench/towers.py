"""What `bench/vision.py` and `bench/audio.py` share: one encoder's random weights for both implementations, the
transformers modules that run them, and alternating best-of-N timing.

The encoders are small (E2B: 167 M vision, 305 M audio parameters, float32 as the checkpoints keep them), so both
implementations live in one process and take turns: one call of ours, one of theirs, `rounds` times, the best of
each kept (the machine is shared and noisy; the best is the least disturbed run).
"""

from __future__ import annotations

import time

import numpy as np


def random_encoder(config, part: str, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(our tree of the `part` ("vision" / "audio") leaves, the same values by HF name), float32, drawn leaf by
    leaf as `model.init_params` draws them. Clip bounds are the checkpoints' "no clipping" +-inf."""
    import jax.numpy as jnp

    from gemma4_jax import model, param_spec

    tree: dict = {}
    hf: dict[str, np.ndarray] = {}
    for leaf in param_spec.param_spec(config):
        if leaf.part != part:
            continue
        value = model.random_leaf(seed, leaf, np.dtype(np.float32))
        model.tree_set(tree, leaf.path, jnp.asarray(value))
        hf.update(zip(leaf.hf, (np.ascontiguousarray(a) for a in leaf.to_hf(value)), strict=True))
    return tree, hf


def hf_encoder(config, part: str, hf_state: dict[str, np.ndarray]):
    """(transformers' encoder module, its multimodal embedder) for `part`, holding `hf_state`, in eval mode, with
    transformers' default attention implementation (what `from_pretrained` picks)."""
    import torch
    import transformers
    from transformers.models.gemma4 import modeling_gemma4 as m

    hf_config = transformers.Gemma4Config(**config.to_hf_dict())
    sub = hf_config.vision_config if part == "vision" else hf_config.audio_config
    tower = (m.Gemma4VisionModel if part == "vision" else m.Gemma4AudioModel)(sub).eval()
    embedder = m.Gemma4MultimodalEmbedder(sub, hf_config.text_config).eval()
    tower_prefix, embedder_prefix = (
        ("vision_tower.", "embed_vision.") if part == "vision" else ("audio_tower.", "embed_audio.")
    )
    for module, prefix in ((tower, tower_prefix), (embedder, embedder_prefix)):
        state = {k[len(prefix) :]: torch.from_numpy(v) for k, v in hf_state.items() if k.startswith(prefix)}
        buffers = {k for k, _ in module.named_buffers()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in buffers or k in state]
        if missing or unexpected:
            raise SystemExit(f"HF {part} weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return tower, embedder


def best_of(rounds: int, ours, theirs) -> tuple[float, float]:
    """Best wall seconds of `ours()` and `theirs()` (each returns when its work is done), alternating."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, call in enumerate((ours, theirs)):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def print_table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    print(title)
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{x:>{w}}" for x, w in zip(row, widths, strict=True)))
