"""gemma4-jax: Gemma 4 in JAX/Flax.

import gemma4_jax as g4
model = g4.load("hf:google/gemma-4-E2B-it")
print(model.generate("Why is the sky blue?", chat=True, max_new_tokens=64).text)
"""

from gemma4_jax.api import Completion, Model, load
from gemma4_jax.config import PRESETS, Gemma4Config, get_config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import apply, cache_bytes, count_params, init_cache, init_params, param_shapes
from gemma4_jax.sampler import SamplingConfig

__all__ = [
    "PRESETS",
    "Completion",
    "Gemma4Config",
    "Gemma4Error",
    "Model",
    "SamplingConfig",
    "apply",
    "cache_bytes",
    "count_params",
    "get_config",
    "init_cache",
    "init_params",
    "load",
    "param_shapes",
]
