"""The independent multimodal reference: transformers' `Gemma4ForConditionalGeneration` on CPU torch, with every
tensor random (text as in `hf_reference`; the encoders' norm scales and standardization away from 1, clip bounds
that clamp a good share of activations), and the float64 patches its encoders need.

Our side gets the weights only through the HF names and transforms of the parameter spec (`params_from_hf`).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from hf_reference import full_float64, randomize_text_tensor
from transformers.models.gemma4 import modeling_gemma4

from gemma4_jax import hf_format
from gemma4_jax.config import Gemma4Config

TEXT_PREFIX = "model.language_model."
VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.")
AUDIO_PREFIXES = ("model.audio_tower.", "model.embed_audio.")
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")
# The projections the official vision tree clips with one set of bounds (K and V share theirs, gate and up too).
_VISION_CLIP_GROUPS = (
    ("self_attn.q_proj",),
    ("self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def hf_mm_model(config: Gemma4Config, seed: int = 0) -> transformers.Gemma4ForConditionalGeneration:
    """A random `Gemma4ForConditionalGeneration` of `config` (eager attention, the experts' loop as written)."""
    hf_config = transformers.Gemma4Config(**config.to_hf_dict())
    for sub in (hf_config, hf_config.text_config, hf_config.vision_config, hf_config.audio_config):
        if sub is not None:
            sub._attn_implementation = "eager"
    hf_config.text_config._experts_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Gemma4ForConditionalGeneration(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    state = hf.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith(TEXT_PREFIX):
                randomize_text_tensor(name, tensor, generator)
            elif name.startswith(VISION_PREFIXES):
                _randomize_vision_tensor(name, tensor, generator)
            elif name.startswith(AUDIO_PREFIXES):
                _randomize_audio_tensor(name, tensor, generator)
        if config.vision is not None and config.vision.clipped_linears:
            for i in range(config.vision.num_layers):
                for group in _VISION_CLIP_GROUPS:
                    # |bounds| in [0.5, 2]: activations are O(1), so a good share is clamped on each side
                    low_in, high_in, low_out, high_out = (0.5 + 1.5 * torch.rand(4, generator=generator)).tolist()
                    for projection in group:
                        prefix = f"model.vision_tower.encoder.layers.{i}.{projection}."
                        state[prefix + "input_min"].fill_(-low_in)
                        state[prefix + "input_max"].fill_(high_in)
                        state[prefix + "output_min"].fill_(-low_out)
                        state[prefix + "output_max"].fill_(high_out)
    hf.tie_weights()
    return hf


def _randomize_vision_tensor(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    if name.endswith(_CLIP_BOUNDS):
        return  # set per clip group (hf_mm_model)
    if name.endswith("std_bias"):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    elif tensor.ndim <= 1:  # norm scales, std_scale: positive, away from 1 and from each other
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    else:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[-1]))


def _randomize_audio_tensor(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    def uniform(lo, hi, shape=()):
        return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

    if name.endswith(("input_min", "output_min")):  # +-(1.5..2.5): every clipped linear really clips
        tensor.copy_(-uniform(1.5, 2.5))
    elif name.endswith(("input_max", "output_max")):
        tensor.copy_(uniform(1.5, 2.5))
    elif name.endswith(("per_dim_scale", ".bias")):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    elif tensor.ndim == 1:  # norm scales
        tensor.copy_(uniform(0.5, 1.5, tensor.shape))
    else:
        taps = tensor.shape[-1] if name.endswith("depthwise_conv1d.weight") else tensor[0].numel()
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(taps))


def hf_state(hf) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in hf.state_dict().items()}


def params_of(config: Gemma4Config, state: dict[str, np.ndarray], dtype, parts=("text", "vision", "audio")):
    """Our parameter tree from the HF tensors, through the spec's names and transforms."""
    return hf_format.params_from_hf(config, state.get, dtype, text_prefix=TEXT_PREFIX, parts=parts)


@contextlib.contextmanager
def mm_float64(hf):
    """transformers entirely in float64: `full_float64` (RMSNorm, softmax, text RoPE), plus the encoders' own
    float32 spots — the vision tower's axial RoPE table and pooling weights (`one_hot(...).float()`, which would not
    even multiply a float64 tensor), and the audio tower's relative-position timescales (a float32 buffer made at
    construction; left so they move the soft tokens by ~1.5e-8). The model is in float64 inside."""
    rope_forward = modeling_gemma4.Gemma4VisionRotaryEmbedding.forward
    avg_pool = modeling_gemma4.Gemma4VisionPooler._avg_pool_by_positions

    def rope_forward_f64(self, x, position_ids):
        if x.dtype != torch.float64:
            return rope_forward(self, x, position_ids)
        spatial = self.config.head_dim // 2
        base = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / base ** (torch.arange(0, spatial, 2, dtype=torch.float64) / spatial)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq
        return self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())

    def avg_pool_f64(self, hidden_states, pixel_position_ids, length):
        if hidden_states.dtype != torch.float64:
            return avg_pool(self, hidden_states, pixel_position_ids, length)
        k = int((hidden_states.shape[1] // length) ** 0.5)
        clamped = pixel_position_ids.clamp(min=0)
        max_x = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
        idx = torch.div(clamped, k, rounding_mode="floor")
        idx = idx[..., 0] + (max_x // k) * idx[..., 1]
        weights = F.one_hot(idx.long(), length).to(torch.float64) / k**2
        return weights.transpose(1, 2) @ hidden_states, torch.logical_not((weights == 0).all(dim=1))

    audio = getattr(hf.model, "audio_tower", None)
    encoding = audio.rel_pos_enc if audio is not None else None
    saved = encoding.inv_timescales.clone() if encoding is not None else None
    modeling_gemma4.Gemma4VisionRotaryEmbedding.forward = rope_forward_f64
    modeling_gemma4.Gemma4VisionPooler._avg_pool_by_positions = avg_pool_f64
    try:
        with full_float64(), torch.no_grad():
            hf.to(torch.float64)
            if encoding is not None:
                half = encoding.hidden_size // 2
                increment = math.log(1e4) / max(half - 1, 1)
                exact = torch.exp(torch.arange(half, dtype=torch.float64) * -increment)[None, None]
                encoding.inv_timescales.copy_(exact)
            yield
    finally:  # outside full_float64, whose `Tensor.float` keeps float64
        modeling_gemma4.Gemma4VisionRotaryEmbedding.forward = rope_forward
        modeling_gemma4.Gemma4VisionPooler._avg_pool_by_positions = avg_pool
        with torch.no_grad():
            hf.to(torch.float32)
            if encoding is not None:
                encoding.inv_timescales.copy_(saved)


@contextlib.contextmanager
def one_torch_thread():
    """Small forwards run ~15x faster on one thread than on two contended ones (XLA's pool is idle meanwhile)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
