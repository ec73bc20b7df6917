"""Driving the runtimes our exports are made for, as a user's program would: llama.cpp (through llama-cpp-python)
on a GGUF file, and the LiteRT-LM engine on a .litertlm bundle. (The LiteRT interpreter is driven by
`litert.LiteRTRunner`.) Used by `gemma4-jax ship` to verify its artifacts and by the export tests.
"""

from __future__ import annotations

import itertools
import time

import numpy as np


def llama(path: str, n_ctx: int = 64, logits_all: bool = True):
    """A llama.cpp context on the GGUF at `path` for comparisons: every position's logits (`logits_all`), f32 K/V
    caches and no flash attention (so comparisons with our f32 forward are not limited by cache rounding), 2
    threads."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=logits_all,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )


def llama_run(path: str, tokens: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `tokens` and its greedy continuation of `tokens` (llama.cpp's own greedy sampler)."""
    llm = llama(path)
    logits = llama_logits(llm, tokens)
    llm.reset()
    greedy = list(itertools.islice(llm.generate(tokens, temp=0.0, repeat_penalty=1.0), new_tokens))
    llm.close()
    return logits, greedy


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """[len(tokens), n_vocab] logits of `tokens` from a fresh sequence in the context `llm`."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], np.float32)


def _greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy through llama.cpp's `eval` (one llama_decode per call), argmax over llama.cpp's own buffer of the
    last position's logits, from a fresh sequence. Returns (tokens, stamps): stamps[0] is the start, stamps[1] the
    end of the prompt's prefill (its first token), each later stamp one decode step."""
    import llama_cpp

    vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (vocab,))))

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    tokens, stamps = [last_argmax()], [start, time.perf_counter()]
    while len(tokens) < new_tokens:
        llm.eval([tokens[-1]])
        tokens.append(last_argmax())
        stamps.append(time.perf_counter())
    return tokens, stamps


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` in the context `llm` (timing: `llama_decode`)."""
    return _greedy(llm, prompt, new_tokens)[0]


def llama_decode(path: str, prompt: list[int], new_tokens: int, threads: int = 2, llm=None):
    """What a llama.cpp decode costs, as a user's context runs it (default caches, logits of the last position
    only; `llm` given: that context): a 2-token warm-up (pages the weights in, builds the graphs), then `_greedy`'s
    (tokens, stamps). (`Llama.generate` runs llama-cpp-python's Python sampling chain over the 262 144 logits as
    well, and a `logits_all` context copies them every step: 20-45x slower than llama.cpp's decode on E2B.)"""
    import llama_cpp

    own = llm is None
    if own:
        llm = llama_cpp.Llama(
            model_path=path, n_ctx=len(prompt) + new_tokens + 16, n_batch=max(len(prompt), 8),
            n_ubatch=max(len(prompt), 8), n_threads=threads, n_threads_batch=threads, verbose=False,
        )  # fmt: skip
    try:
        _greedy(llm, prompt, 2)
        return _greedy(llm, prompt, new_tokens)
    finally:
        if own:
            llm.close()


def decode_rate(stamps: list[float]) -> float:
    """Tokens/s of the single-token steps after the prefill (`llama_decode`'s stamps)."""
    steps = len(stamps) - 2
    return steps / (stamps[-1] - stamps[1]) if steps > 0 and stamps[-1] > stamps[1] else float("nan")


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
