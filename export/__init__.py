"""Export to other runtimes (installed as `gemma4_jax.export`): `gguf.export_gguf` writes a GGUF file that llama.cpp
runs; `litert.export_litert` writes LiteRT .tflite models and a .litertlm bundle for the LiteRT-LM engine."""
