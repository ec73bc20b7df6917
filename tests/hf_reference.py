"""The independent reference: Hugging Face transformers' `Gemma4ForCausalLM` on CPU torch.

Weights are random (every tensor, norms and scalars included, so a swapped or offset norm cannot hide) and are
handed to our code only through `save_pretrained` files, so the HF loader path is part of every comparison.
"""

from __future__ import annotations

import contextlib
import math

import torch
import transformers
from transformers.models.gemma4 import modeling_gemma4

from gemma4_jax.config import Gemma4Config


def hf_model(config: Gemma4Config, seed: int = 0) -> transformers.Gemma4ForCausalLM:
    hf_config = transformers.Gemma4TextConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"  # the loop over experts as written in modeling_gemma4
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name != "lm_head.weight":  # tied to embed_tokens
                randomize_text_tensor(name, tensor, generator)
    model.tie_weights()
    return model


def randomize_text_tensor(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    if tensor.ndim <= 1 or name.endswith("layer_scalar"):
        # norm scales, layer scalars, router scales: positive, clearly away from 1 and from each other
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    else:
        fan_in = tensor.shape[-1]
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))


@contextlib.contextmanager
def full_float64():
    """Run the HF reference entirely in float64.

    transformers hard-codes float32 in four places of Gemma 4 (RMSNorm's `.float()`, the RoPE tables, the eager
    attention softmax and the router softmax). With those rounding to float32 a float64 comparison could not go
    below ~1e-7; here each computes the same expression in the input's float64 instead, so the comparison
    measures semantics down to ~1e-13.
    """
    original_float = torch.Tensor.float
    original_softmax = torch.nn.functional.softmax
    original_rope_forward = modeling_gemma4.Gemma4TextRotaryEmbedding.forward

    def float_keep_f64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original_float(self, *args, **kwargs)

    def softmax_keep_f64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64:
            dtype = None
        return original_softmax(input, dim=dim, dtype=dtype)

    def rope_forward_f64(self, x, position_ids, layer_type):
        rope_config = self.config.per_layer_config[layer_type]
        inv_freq, scaling = self.rope_init_fns[layer_type](rope_config, None, layer_type=layer_type)
        if x.dtype == torch.float64:
            # the init functions compute 1 / base**(2j/H) in float32; redo the same formula in float64
            head_dim = rope_config.head_dim
            base = self.config.rope_parameters[layer_type]["rope_theta"]
            j = torch.arange(inv_freq.shape[0], dtype=torch.float64)
            exact = base ** (-2 * j / head_dim)
            inv_freq = torch.where(inv_freq == 0, torch.zeros_like(exact), exact)
            freqs = position_ids[..., None].to(torch.float64) * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos() * scaling, emb.sin() * scaling
        return original_rope_forward(self, x, position_ids, layer_type)

    torch.Tensor.float = float_keep_f64
    torch.nn.functional.softmax = softmax_keep_f64
    modeling_gemma4.Gemma4TextRotaryEmbedding.forward = rope_forward_f64
    try:
        yield
    finally:
        torch.Tensor.float = original_float
        torch.nn.functional.softmax = original_softmax
        modeling_gemma4.Gemma4TextRotaryEmbedding.forward = original_rope_forward
