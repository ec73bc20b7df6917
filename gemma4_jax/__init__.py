"""gemma4-jax: Gemma 4 in JAX/Flax."""

from gemma4_jax.config import PRESETS, Gemma4Config, get_config
from gemma4_jax.errors import Gemma4Error
from gemma4_jax.model import apply, cache_bytes, count_params, init_cache, init_params, param_shapes

__all__ = [
    "PRESETS",
    "Gemma4Config",
    "Gemma4Error",
    "apply",
    "cache_bytes",
    "count_params",
    "get_config",
    "init_cache",
    "init_params",
    "param_shapes",
]
