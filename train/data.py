"""Training data: chats and plain text -> token rows packed to a fixed length, with per-token loss weights.

Inputs:
- JSONL, one example per line: `{"messages": [{"role": ..., "content": ...}, ...]}` (a chat, rendered with the
  checkpoint's Gemma 4 chat template; loss only on the model's answers and their `<turn|>`), or
  `{"text": "..."}` (continued pre-training: loss on every token). Blank lines are skipped; any other malformed
  line is an error naming the file and line (nothing is silently skipped).
- `.txt` files: each file is one document (continued pre-training).
- Images and audio: a user message's content may be a list of parts, `{"type": "text", "text": ...}`,
  `{"type": "image", "image": "photo.jpg"}`, `{"type": "audio", "audio": "clip.wav"}` (paths relative to the JSONL
  file). They are read when the data is loaded (a bad file is reported then), their placeholders widened to their
  soft-token slots, and `embed_media` fills those with the model's frozen encoders before training: the encoders
  run once per example, and the decoder learns from the embeddings they give.
Lengths: a chat longer than `seq_len + 1` tokens is dropped (cutting it would train on half an answer); the
count is reported, and a dataset with nothing left is an error. Documents are cut into `seq_len + 1`-token
windows that overlap by one token, so every token is a target exactly once.

Packing: examples are placed in order into rows of `seq_len` positions; each example keeps its own positions
from 0 and its own segment id, so packed examples never attend to each other (model.apply `segments`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from gemma4_jax.errors import Gemma4Error
from gemma4_jax.files import read_text

ANSWER_ROLES = ("assistant", "model")
END_OF_TURN = "<turn|>"


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # [n] int32, starting with <bos> (media placeholders widened to their slots)
    weights: np.ndarray  # [n] float32: 1 where token j is a target (predicted from tokens[:j])
    media: list = dataclasses.field(default_factory=list)  # multimodal.Image / Audio, in slot order
    soft: object = None  # multimodal.SoftTokens of `tokens`, once `embed_media` ran


def chat_example(tokenizer, messages: Sequence[dict]) -> Example:
    """A chat as tokens, with weight 1 on the model's answer tokens and the `<turn|>` that closes each answer.

    The answer spans come from the template itself: the conversation up to a model turn, rendered with the
    generation prompt, must be a token prefix of the conversation including that turn; what the turn adds up
    to its `<turn|>` is the answer. So any Gemma 4 template (thinking channels, tools) is masked correctly,
    and a template for which this does not hold is reported instead of masked wrongly.
    """
    tokens = tokenizer.encode_chat(messages)
    weights = np.zeros(len(tokens), np.float32)
    end_of_turn = tokenizer.token_id(END_OF_TURN)
    for j, message in enumerate(messages):
        if message.get("role") not in ANSWER_ROLES:
            continue
        prompt = tokenizer.encode_chat(messages[:j], add_generation_prompt=True) if j else [tokenizer.bos_id]
        upto = tokenizer.encode_chat(messages[: j + 1])
        if upto != tokens[: len(upto)] or prompt != upto[: len(prompt)]:
            raise Gemma4Error(
                f"message {j}: the chat template does not render earlier turns as a prefix of later ones, "
                "so the answer tokens cannot be located"
            )
        answer = upto[len(prompt) :]
        if end_of_turn not in answer:
            raise Gemma4Error(f"message {j}: the rendered answer has no {END_OF_TURN}")
        stop = len(answer) - answer[::-1].index(end_of_turn)  # through the last <turn|>, not the newline after
        weights[len(prompt) : len(prompt) + stop] = 1
    return Example(np.asarray(tokens, np.int32), weights)


def _media_example(example: Example, media: list, config) -> Example:
    """The example with each media placeholder widened to its slots (`multimodal.expand`); the slots are inputs,
    never targets."""
    from gemma4_jax import multimodal

    tokens = multimodal.expand(example.tokens.tolist(), media, config)
    weights = np.zeros(len(tokens), np.float32)
    placeholders = (config.image_token_id, config.audio_token_id)
    j = 0  # position in the widened tokens
    for token, weight in zip(example.tokens.tolist(), example.weights, strict=True):
        if token in placeholders:
            while tokens[j] != token:  # the opening marker
                j += 1
            while j < len(tokens) and tokens[j] == token:
                j += 1
            j += 1  # the closing marker
        else:
            weights[j] = weight
            j += 1
    return Example(np.asarray(tokens, np.int32), weights, media)


def _load_media(messages, root: str, config, image_tokens: int, where: str) -> list:
    from gemma4_jax import multimodal

    media = []
    for k, message in enumerate(messages):
        for part in message["content"] if isinstance(message["content"], list) else ():
            kind = part["type"]
            if kind not in ("image", "audio"):
                continue
            if config is None:
                raise Gemma4Error(f"{where}: message {k} has an {kind}, and no model config was given to expand it")
            path = part.get(kind, part.get("path"))
            if not isinstance(path, str):
                raise Gemma4Error(f"{where}: message {k}: an {kind} part needs a file path in {kind!r}")
            path = os.path.join(root, path)
            try:
                medium = multimodal.load_image(path, image_tokens) if kind == "image" else multimodal.load_audio(path)
                multimodal.check_support(config, [medium])
            except Gemma4Error as e:
                raise Gemma4Error(f"{where}: message {k}: {e}") from None
            media.append(medium)
    return media


def embed_media(examples: Sequence[Example], params, config) -> None:
    """Fills each media example's soft tokens with the (frozen) encoders of `params`."""
    from gemma4_jax import multimodal

    for example in examples:
        if example.media and example.soft is None:
            example.soft = multimodal.embed(params, config, example.tokens.tolist(), example.media)


def text_examples(tokenizer, text: str, seq_len: int) -> list[Example]:
    tokens = [*tokenizer.encode(text, add_bos=True), tokenizer.eos_id]
    out = []
    for start in range(0, max(1, len(tokens) - 1), seq_len):
        window = np.asarray(tokens[start : start + seq_len + 1], np.int32)
        weights = np.ones(len(window), np.float32)
        weights[0] = 0  # the first token of a window has no context in it
        out.append(Example(window, weights))
    return out


@dataclasses.dataclass
class Dataset:
    examples: list[Example]
    dropped: int  # chats longer than seq_len + 1 tokens
    sources: list[str]

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)


_PART_TYPES = ("text", "image", "audio")


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise Gemma4Error(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Gemma4Error(f"{where}: message {k} must be an object with string 'role' and 'content'")
        content = m.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict)
            and p.get("type") in _PART_TYPES
            and (p["type"] != "text" or isinstance(p.get("text"), str))
            for p in content
        )
        if not isinstance(content, str) and not parts_ok:
            raise Gemma4Error(f"{where}: message {k}: 'content' must be a string or a list of text/image/audio parts")
    if not any(m["role"] in ANSWER_ROLES for m in messages):
        raise Gemma4Error(f"{where}: no assistant/model message, so nothing to learn from")


def load_dataset(paths: Sequence[str], tokenizer, seq_len: int, config=None, image_tokens: int = 280) -> Dataset:
    """Reads every file; raises Gemma4Error on the first malformed line (with its file and line number). `config`
    (the model's) is needed for chats with images or audio, which are resized to `image_tokens` soft tokens."""
    if seq_len < 2:
        raise Gemma4Error(f"--seq-len must be >= 2, got {seq_len}")
    examples: list[Example] = []
    dropped = 0
    for path in paths:
        if not os.path.isfile(path):
            raise Gemma4Error(f"data file not found: {path}")
        text = read_text(path)  # UTF-8, or one error line naming the offset
        if not path.endswith(".jsonl"):
            if text.strip():
                examples += text_examples(tokenizer, text, seq_len)
            continue
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Gemma4Error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(record, dict) and "messages" in record:
                _check_messages(record["messages"], where)
                try:
                    example = chat_example(tokenizer, record["messages"])
                except Gemma4Error as e:
                    raise Gemma4Error(f"{where}: {e}") from None
                media = _load_media(record["messages"], os.path.dirname(path), config, image_tokens, where)
                if media:
                    try:
                        example = _media_example(example, media, config)
                    except Gemma4Error as e:
                        raise Gemma4Error(f"{where}: {e}") from None
                if len(example.tokens) > seq_len + 1:
                    dropped += 1
                else:
                    examples.append(example)
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                examples += text_examples(tokenizer, record["text"], seq_len)
            else:
                raise Gemma4Error(f'{where}: expected {{"messages": [...]}} or {{"text": "..."}}')
    if not examples:
        why = f" (all {dropped} chats are longer than --seq-len {seq_len}; they are dropped)" if dropped else ""
        raise Gemma4Error(f"no training examples in {', '.join(paths)}{why}")
    return Dataset(examples, dropped, list(paths))


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random `eval_fraction` of the examples is held out (at least one if > 0)."""
    if not 0 <= eval_fraction < 1:
        raise Gemma4Error(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n_eval = round(eval_fraction * len(examples))
    if eval_fraction > 0:
        n_eval = max(1, n_eval)
    if n_eval >= len(examples):
        raise Gemma4Error(f"{len(examples)} example(s) cannot be split into training and evaluation sets")
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


@dataclasses.dataclass
class Rows:
    """Packed rows, all [R, T]: the model reads `inputs` and is scored on `targets` where `weights` > 0.

    With media, `soft_index` [R, T] points each soft-token slot into `soft_table` [N, D] (-1 elsewhere) and
    `blocks` [R, T] numbers the images of a row (bidirectional attention among one image's slots where the model
    has it); `take` gathers the slots' embeddings, so a batch carries `soft_tokens`, `soft_mask` and `blocks`."""

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray  # -1 on padding
    segments: np.ndarray  # 0 on padding, 1.. per example in the row
    weights: np.ndarray
    soft_index: np.ndarray | None = None
    blocks: np.ndarray | None = None
    soft_table: np.ndarray | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        batch = {name: getattr(self, name)[index] for name in ("inputs", "targets", "positions", "segments", "weights")}
        if self.soft_table is not None:
            slots = self.soft_index[index]
            batch["soft_tokens"] = np.where(slots[..., None] >= 0, self.soft_table[np.maximum(slots, 0)], 0)
            batch["soft_mask"] = slots >= 0
            batch["blocks"] = self.blocks[index]
        return batch

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                h.update(np.ascontiguousarray(getattr(self, f.name)).tobytes())
        return h.hexdigest()[:16]


def pack(examples: list[Example], seq_len: int) -> Rows:
    """Next-fit packing in the given order; an example of n tokens takes n - 1 positions (input -> next token)."""
    rows: list[list[Example]] = [[]]
    used = 0
    for e in examples:
        need = len(e.tokens) - 1
        if need > seq_len:
            raise ValueError(f"example of {len(e.tokens)} tokens does not fit seq_len {seq_len}")
        if used + need > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += need
    n = len(rows)
    out = Rows(
        np.zeros((n, seq_len), np.int32),
        np.zeros((n, seq_len), np.int32),
        np.full((n, seq_len), -1, np.int32),
        np.zeros((n, seq_len), np.int32),
        np.zeros((n, seq_len), np.float32),
    )
    with_media = any(e.media for e in examples)
    if with_media:
        if any(e.media and e.soft is None for e in examples):
            raise ValueError("examples with media need `embed_media` before packing")
        out.soft_index = np.full((n, seq_len), -1, np.int32)
        out.blocks = np.full((n, seq_len), -1, np.int32)
    table: list[np.ndarray] = []
    filled = 0
    for r, members in enumerate(rows):
        start = images = 0
        for s, e in enumerate(members, 1):
            k = len(e.tokens) - 1
            span = slice(start, start + k)
            out.inputs[r, span] = e.tokens[:-1]
            out.targets[r, span] = e.tokens[1:]
            out.positions[r, span] = np.arange(k)
            out.segments[r, span] = s
            out.weights[r, span] = e.weights[1:]
            if e.soft is not None:
                where = np.flatnonzero(e.soft.mask[:-1])  # a slot is an input (the last token is only a target)
                out.soft_index[r, start + where] = filled + np.arange(len(where))
                table.append(e.soft.embeddings[where])
                filled += len(where)
                own = e.soft.blocks[:-1]
                out.blocks[r, span] = np.where(own >= 0, own + images, -1)  # image ids unique within the row
                images += int(own.max()) + 1 if (own >= 0).any() else 0
            start += k
    if with_media:
        width = next(e.soft.embeddings.shape[1] for e in examples if e.soft is not None)
        out.soft_table = np.concatenate(table) if table else np.zeros((0, width), np.float32)  # float32 (or 64)
    return out


class Batches:
    """Deterministic batches by step number: step s takes rows [s·k, (s+1)·k) of the endless sequence of
    seeded per-epoch permutations (k = rows per step), so a resumed run sees exactly the same data."""

    def __init__(self, rows: Rows, batch: int, accumulation: int, seed: int):
        self.rows, self.batch, self.accumulation, self.seed = rows, batch, accumulation, seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def rows_per_step(self) -> int:
        return self.batch * self.accumulation

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._perms[epoch]

    def epoch_of(self, step: int) -> float:
        return step * self.rows_per_step / len(self.rows)

    def at(self, step: int) -> dict[str, np.ndarray]:
        """Arrays of shape [accumulation, batch, T] ([..., T, D] for soft tokens) for optimizer step `step`."""
        n = len(self.rows)
        index = np.empty(self.rows_per_step, np.int64)
        for k in range(self.rows_per_step):
            g = step * self.rows_per_step + k
            index[k] = self._perm(g // n)[g % n]
        return {
            name: a.reshape(self.accumulation, self.batch, *a.shape[1:]) for name, a in self.rows.take(index).items()
        }
