"""Driving the runtimes our exports are made for, as a user's program would: llama.cpp (through llama-cpp-python)
on a GGUF file, and the LiteRT-LM engine on a .litertlm bundle. (The LiteRT interpreter is driven by
`litert.LiteRTRunner`.) Used by `gemma4-jax ship` to verify its artifacts and by the export tests.
"""

from __future__ import annotations

import itertools
import time

import numpy as np


def llama(path: str, n_ctx: int = 64):
    """A llama.cpp context on the GGUF at `path` keeping every position's logits, with f32 K/V caches and without
    flash attention (so comparisons with our f32 forward are not limited by cache rounding), 2 threads."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )


def llama_run(path: str, tokens: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `tokens` and its greedy continuation of `tokens` (llama.cpp's own greedy sampler)."""
    llm = llama(path)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], np.float32)
    llm.reset()
    greedy = list(itertools.islice(llm.generate(tokens, temp=0.0, repeat_penalty=1.0), new_tokens))
    llm.close()
    return logits, greedy


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """[len(tokens), n_vocab] logits of `tokens` from a fresh sequence in the context `llm`."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], np.float32)


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy continuation through llama.cpp's `eval` (one llama_decode per token, argmax over its logits) and the
    decode rate in tokens/s (the `new_tokens - 1` single-token steps after the prefill)."""
    llm.reset()
    llm.eval(prompt)
    tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tokens[-1]])
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    seconds = time.perf_counter() - start
    return tokens, (new_tokens - 1) / seconds if new_tokens > 1 and seconds > 0 else float("nan")


def engine_greedy(bundle: str, text: str, new_tokens: int, cache_len: int, cache_dir: str, detokenize=()) -> dict:
    """The LiteRT-LM engine's greedy continuation of the raw `text` (no chat template): {"prompt_ids": the
    engine's tokenization of `text` (without BOS), "text": what it generated, "seconds": its decode time,
    "detokenized": each id list of `detokenize` as text by the engine's own detokenizer} (the engine streams
    text, not ids, so reference ids are compared as the engine writes them)."""
    import litert_lm

    engine = litert_lm.Engine(bundle, max_num_tokens=cache_len, cache_dir=cache_dir)
    try:
        prompt_ids = list(engine.tokenize(text))
        session = engine.create_session(
            apply_prompt_template=False,
            sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0),
            max_output_tokens=new_tokens,
        )
        session.run_prefill([text])
        start = time.perf_counter()
        generated = "".join(chunk.texts[0] for chunk in session.run_decode_async())
        seconds = time.perf_counter() - start
        session.close()
        detokenized = [engine.detokenize(list(ids)) for ids in detokenize]
        return {"prompt_ids": prompt_ids, "text": generated, "seconds": seconds, "detokenized": detokenized}
    finally:
        engine.close()
