"""LoRA / QLoRA fine-tuning (installed as `gemma4_jax.train`).

`lora`: adapters as weight objects, merge, Hugging Face PEFT export/import; `data`: chat/text data, loss masks,
packing; `loop`: the jitted optax training loop with orbax checkpoints; `cli`: `gemma4-jax finetune` and `merge`.
"""
