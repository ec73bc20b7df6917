"""Tokenizer and chat template against transformers (GemmaTokenizer, apply_chat_template) and Google's template.

The vocabulary is a SentencePiece model trained in the test (tests/tokenizer_fixture.py); transformers'
converter turns it into the tokenizer.json that HF checkpoints ship. The chat template is Google's Gemma 4
31B template as vendored by llama.cpp (tests/references.py), i.e. code nobody on this project wrote.
"""

import os

import pytest
from references import gemma4_chat_template, gguf_metadata, llama_cpp_file
from tokenizer_fixture import GEMMA4_SPECIAL_IDS, TINY_MEDIA_IDS, write_tokenizer

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.tokenizer import load_tokenizer, render_gemma4

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nafter blank lines\ttab",
    "Ünïcödé, 日本語 and an emoji 😀 fall back to bytes",
    "<bos><|turn>user\nWhat is the capital of France?<turn|>\n<|turn>model\n",
    'call:get_weather{location:<|"|>Paris<|"|>}<|tool_response>',
    "<bos> inside text, and <|turn> twice <|turn>",
    "numbers 1234567890 and 3.14159",
    "",
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
                    "days": {"type": "array", "items": {"type": "integer"}, "description": "Days ahead"},
                    "options": {
                        "type": "object",
                        "description": "Extras",
                        "properties": {"wind": {"type": "boolean", "description": "Include wind"}},
                        "required": ["wind"],
                    },
                },
                "required": ["location"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {}}},
]
CONVERSATIONS = {
    "single_user": ([{"role": "user", "content": "Hello there!"}], {}),
    "system_multi_turn": (
        [
            SYSTEM,
            {"role": "user", "content": "  What is 2+2?  "},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        {},
    ),
    "thinking": (
        [
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "<|channel>thought\nRayleigh...<channel|>Because of scattering."},
            {"role": "user", "content": "Thanks"},
        ],
        {"enable_thinking": True},
    ),
    "content_parts": (
        [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": " this"}]}],
        {},
    ),
    "tools": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"location": "Paris", "days": [1, 2]}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"},
            {"role": "assistant", "content": "It is 18 degrees in Paris."},
            {"role": "user", "content": "And the time?"},
        ],
        {"tools": TOOLS},
    ),
    "tool_call_pending": (
        [
            {"role": "user", "content": "Time?"},
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}],
                "content": None,
            },
        ],
        {"tools": TOOLS[1:]},
    ),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer(d, chat_template=gemma4_chat_template())
    return d


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.mark.parametrize("prefer", ["sentencepiece", "json"])
def test_encode_decode_equal_transformers(tok_dir, hf_tokenizer, prefer):
    tok = load_tokenizer(tok_dir, prefer=prefer)
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    for token_id, piece in (GEMMA4_SPECIAL_IDS | TINY_MEDIA_IDS).items():
        assert tok.token_id(piece) == token_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids) == text


def test_exactly_one_bos(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.encode("hi", add_bos=True)[:2] == [2, tok.encode("hi")[0]]
    assert tok.encode("<bos>hi", add_bos=True).count(2) == 1
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[0] == 2 and ids.count(2) == 1
    with pytest.raises(Gemma4Error, match="more than once"):
        tok.encode_chat([{"role": "user", "content": "<bos>hi"}])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_equals_apply_chat_template(tok_dir, hf_tokenizer, name, add_generation_prompt):
    """Our jinja rendering of the checkpoint's template, and the built-in renderer (used when a checkpoint has
    no template), both equal transformers' apply_chat_template with Google's template, as text and ids."""
    messages, kwargs = CONVERSATIONS[name]
    kwargs = {"add_generation_prompt": add_generation_prompt, **kwargs}
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    expected_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template is not None
    assert tok.render_chat(messages, **kwargs) == expected
    assert tok.encode_chat(messages, **kwargs) == list(expected_ids)
    # The 31B template adds an empty thought after the generation prompt when thinking is off.
    assert render_gemma4(messages, empty_thought_when_not_thinking=True, **kwargs) == expected


def test_builtin_template_without_checkpoint_template(tmp_path):
    write_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert tok.chat_template is None
    text = tok.render_chat([SYSTEM, {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == ("<bos><|turn>system\nYou are a helpful assistant.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")


def test_bad_input(tmp_path, tok_dir):
    with pytest.raises(Gemma4Error, match="no tokenizer"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(Gemma4Error, match="SentencePiece"):
        load_tokenizer(str(tmp_path))
    os.remove(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(Gemma4Error, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    tok = load_tokenizer(tok_dir)
    with pytest.raises(Gemma4Error, match="outside the vocabulary"):
        tok.decode([5, 512])
    with pytest.raises(Gemma4Error, match="role"):
        tok.render_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(Gemma4Error, match="at least one"):
        tok.render_chat([])


@pytest.mark.slow
def test_real_gemma4_vocabulary_matches_llama_cpp(tmp_path):
    """The real 262,144-token Gemma 4 vocabulary (llama.cpp's vocab-only GGUF) as an HF BPE tokenizer.json: our
    tokenizer reproduces llama.cpp's tokenization test vectors (.inp -> .out, written by llama.cpp's authors),
    and the special ids are the ones the spec (§4.3) and our fixture use."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    meta = gguf_metadata(llama_cpp_file("models/ggml-vocab-gemma-4.gguf"))
    pieces, kinds = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    bpe = models.BPE(
        vocab={p: i for i, p in enumerate(pieces)},
        merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
        unk_token="<unk>",
        byte_fallback=True,
    )
    hf = HFTokenizer(bpe)
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    control, user_defined = 3, 4  # llama.cpp token types
    specials = [p for p, k in zip(pieces, kinds, strict=True) if k in (control, user_defined)]
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))

    assert tok.vocab_size == 262_144 and (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    for token_id, piece in GEMMA4_SPECIAL_IDS.items():
        assert tok.token_id(piece) == token_id
    for piece, token_id in [("<|image>", 255_999), ("<|audio>", 256_000), ("<|image|>", 258_880), ("\n\n", 108)]:
        assert tok.token_id(piece) == token_id

    texts = llama_cpp_file("models/ggml-vocab-gemma-4.gguf.inp").decode().split("\n__ggml_vocab_test__\n")
    expected = llama_cpp_file("models/ggml-vocab-gemma-4.gguf.out").decode().removesuffix("\n").split("\n")
    assert len(texts) == len(expected) >= 40
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text) == [int(i) for i in ids.split()], repr(text)
        assert tok.decode(tok.encode(text)) == text
