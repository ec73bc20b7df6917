"""LoRA fine-tuning (installed as `gemma4_jax.train`). Not implemented yet: see the open training issue."""
