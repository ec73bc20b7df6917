"""llama.cpp's multimodal library (tools/mtmd, through llama-cpp-python's `mtmd_cpp` bindings) driven by hand:
a text GGUF + an mmproj GGUF, a prompt with media markers, and the pieces the tests compare with our JAX model —
the token chunks mtmd makes, each medium's embeddings from its encoder, the logits after the prompt, and the greedy
continuation (argmax of llama.cpp's logits, one token at a time).

llama.cpp runs with f32 K/V caches and without flash attention, as in tests/test_gguf.py.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np

from gemma4_jax.export import runtimes

MARKER = "<__media__>"


@dataclasses.dataclass
class Chunk:
    kind: str  # "text", "image" or "audio"
    tokens: list[int]  # text chunks: the ids; media chunks: empty
    n_tokens: int
    handle: int


class Mtmd:
    def __init__(self, model_path: str, mmproj_path: str, n_ctx: int = 512, image_tokens: tuple[int, int] = (0, 0)):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.lib, self.mtmd = llama_cpp, mtmd_cpp
        self.llm = runtimes.llama(model_path, n_ctx, logits_all=False)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = 2
        params.print_timings = False
        params.warmup = False
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED: the encoders' attention in f32, not f16 K/V
        params.media_marker = MARKER.encode()
        params.image_min_tokens, params.image_max_tokens = image_tokens
        self.ctx = mtmd_cpp.mtmd_init_from_file(mmproj_path.encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"mtmd could not load {mmproj_path}")
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm.model))

    def close(self) -> None:
        self.mtmd.mtmd_free(self.ctx)
        self.llm.close()

    # ----- inputs -------------------------------------------------------------------------------------------

    def image(self, rgb: np.ndarray):
        rgb = np.ascontiguousarray(rgb, np.uint8)
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        return self.mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)

    def audio(self, samples: np.ndarray):
        samples = np.ascontiguousarray(samples, np.float32)
        return self.mtmd.mtmd_bitmap_init_from_audio(
            len(samples), samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        )

    def tokenize(self, text: str, bitmaps: list) -> tuple[int, list[Chunk]]:
        """mtmd's chunks of `text` (media markers replaced by `bitmaps`, BOS added)."""
        m = self.mtmd
        chunks = m.mtmd_input_chunks_init()
        inp = m.mtmd_input_text()
        encoded = text.encode()
        inp.text, inp.text_len = encoded, len(encoded)
        inp.add_special = True
        inp.parse_special = True
        array = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        code = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), array, len(bitmaps))
        if code != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({code})")
        out = []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            kind = {0: "text", 1: "image", 2: "audio"}[m.mtmd_input_chunk_get_type(chunk)]
            tokens = []
            if kind == "text":
                n = ctypes.c_size_t()
                ids = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens = [ids[k] for k in range(n.value)]
            out.append(Chunk(kind, tokens, m.mtmd_input_chunk_get_n_tokens(chunk), chunk))
        return chunks, out

    # ----- outputs ------------------------------------------------------------------------------------------

    def embeddings(self, chunk: Chunk) -> np.ndarray:
        """The encoder's output for a media chunk: [n_tokens, n_embd] (what llama.cpp feeds the decoder)."""
        if self.mtmd.mtmd_encode_chunk(self.ctx, chunk.handle) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        values = self.mtmd.mtmd_get_output_embd(self.ctx)
        flat = np.ctypeslib.as_array(values, shape=(chunk.n_tokens * self.n_embd,))
        return flat.reshape(chunk.n_tokens, self.n_embd).copy()

    def _logits(self) -> np.ndarray:
        values = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(values, shape=(self.n_vocab,)).astype(np.float32)

    def generate(self, chunks, new_tokens: int) -> tuple[np.ndarray, list[int]]:
        """(logits after the prompt, greedy continuation): mtmd evaluates the chunks, then one token at a time."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.llm.ctx), True)
        n_past = lib.llama_pos(0)
        code = self.mtmd.mtmd_helper_eval_chunks(self.ctx, self.llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past))
        if code != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks failed ({code})")
        first = self._logits()
        logits, out = first, []
        for _ in range(new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            ids = (lib.llama_token * 1)(token)  # kept alive while llama_decode reads it
            batch = lib.llama_batch_get_one(ids, 1)
            if lib.llama_decode(self.llm.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = self._logits()
        return first, out
