"""Export to GGUF and LiteRT (installed as `gemma4_jax.export`). Not implemented yet: see the open export issues."""
