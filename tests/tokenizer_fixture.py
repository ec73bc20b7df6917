"""A small Gemma 4-style tokenizer, trained in the test run (no downloads).

`write_tokenizer(directory)` writes the files a Gemma 4 checkpoint ships:
- `tokenizer.model`: a SentencePiece BPE model with byte fallback, trained here on a fixed text, whose special
  tokens sit at the real Gemma 4 ids (pad 0, eos 1, bos 2, unk 3, mask 4, <|tool> 46 ... <|"|> 52, <|think|> 98,
  <|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106; the ids were read from llama.cpp's Gemma 4 vocab), and
  the image/audio markers at the ids of the tiny multimodal presets (60-66),
- `tokenizer.json` + `tokenizer_config.json`: transformers' own conversion of that model (GemmaTokenizer), i.e.
  what an HF checkpoint ships,
- optionally `chat_template.jinja`.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile

# id -> piece, for the Gemma 4 specials this fixture reproduces; other low ids are <unusedN> fillers.
GEMMA4_SPECIAL_IDS = {
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
# The image/audio markers at the ids of the tiny multimodal presets (the real ones are 255 999 and up, which a
# 512-token fixture cannot hold).
TINY_MEDIA_IDS = {
    60: "<|image>",
    61: "<|audio>",
    62: "<|image|>",
    63: "<|audio|>",
    64: "<image|>",
    65: "<audio|>",
    66: "<|video|>",
}
_FIXTURE_SPECIAL_IDS = GEMMA4_SPECIAL_IDS | TINY_MEDIA_IDS
_FIRST_NORMAL_ID = 107
# The tokenizer attributes transformers' Gemma4Processor reads (`tokenizer.image_token`, ...).
NAMED_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}

_TEXT = """\
The quick brown fox jumps over the lazy dog. A model answers questions about the weather, maths and cooking.
What is the capital of France? The capital of France is Paris. How many legs does a spider have? Eight.
Please write a short poem about the sea. The sea is wide and blue, the waves roll in and out again.
Tell me a joke. Why did the chicken cross the road? To get to the other side!
Translate "good morning" into German: Guten Morgen. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024 2026.
The function get_weather takes a location string and returns the temperature in degrees Celsius.
Thinking step by step: first compute the sum, then divide by the count to get the average value.
"""


def _symbols() -> list[str]:
    """User-defined symbols in id order starting at 4 (SentencePiece places them right after unk)."""
    return [_FIXTURE_SPECIAL_IDS.get(i, f"<unused{i}>") for i in range(4, _FIRST_NORMAL_ID)]


@functools.cache
def _trained(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TEXT.splitlines() * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=_symbols(),
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(directory: str, vocab_size: int = 512, chat_template: str | None = None) -> None:
    """Writes tokenizer.model, tokenizer.json, tokenizer_config.json (+ chat_template.jinja) into `directory`."""
    from transformers import GemmaTokenizer

    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(_trained(vocab_size))
        specials = [p for i, p in sorted(_FIXTURE_SPECIAL_IDS.items()) if p != "<mask>"]
        hf = GemmaTokenizer.from_pretrained(tmp, extra_special_tokens=NAMED_TOKENS)
        hf.add_special_tokens({"additional_special_tokens": [p for p in specials if p not in NAMED_TOKENS.values()]})
        if chat_template is not None:
            hf.chat_template = chat_template
        hf.save_pretrained(tmp)
        for name in os.listdir(tmp):
            shutil.copy(os.path.join(tmp, name), os.path.join(directory, name))
