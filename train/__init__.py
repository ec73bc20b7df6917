"""LoRA / QLoRA fine-tuning (installed as `gemma4_jax.train`).

`lora`: adapters as weight objects, Hugging Face PEFT export/import; `data`: chat/text data, loss masks, packing;
`loop`: the jitted optax training loop with orbax checkpoints; `finetune` and `merge`: the two tasks.
"""
