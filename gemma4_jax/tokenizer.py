"""The Gemma tokenizer and the Gemma 4 chat template (spec §4.3, §5.5).

Two backends read the same vocabulary: SentencePiece `tokenizer.model` (official Kaggle checkpoints) and HF
`tokenizer.json` (HF checkpoints, via the `tokenizers` library). Special tokens are split out of the text here,
before either backend sees it, so `"<|turn>user"` encodes to the `<|turn>` id with both.

Chat: when the checkpoint ships a chat template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) it is rendered with jinja2 the way transformers renders it; otherwise a built-in
renderer writes the Gemma 4 turn format. Every encoded chat starts with exactly one `<bos>` (a double BOS is a
known failure mode of Gemma runtimes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from gemma4_jax.errors import Gemma4Error

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
TURN_START, TURN_END = "<|turn>", "<turn|>"

Message = dict[str, Any]


class Tokenizer:
    """Text <-> token ids for one vocabulary, plus the checkpoint's chat template."""

    def __init__(self, backend, specials: dict[str, int], chat_template: str | None, source: str):
        self._backend = backend
        self.specials = dict(specials)  # piece -> id of every token matched verbatim in text
        self._special_ids = {i: p for p, i in self.specials.items()}
        self.chat_template = chat_template
        self.source = source
        # Longest first, so a special that contains another one wins.
        pattern = "|".join(re.escape(p) for p in sorted(self.specials, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None
        for piece in (PAD, EOS, BOS):
            if piece not in self.specials:
                raise Gemma4Error(f"{source}: the vocabulary has no {piece} token")
        self.pad_id, self.eos_id, self.bos_id = self.specials[PAD], self.specials[EOS], self.specials[BOS]

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def token_id(self, piece: str) -> int:
        if piece in self.specials:
            return self.specials[piece]
        i = self._backend.piece_to_id(piece)
        if i is None:
            raise Gemma4Error(f"{self.source}: no token {piece!r} in the vocabulary")
        return i

    def id_to_piece(self, token: int) -> str:
        return self._special_ids.get(token) or self._backend.id_to_piece(token)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. `add_bos` prepends one <bos>
        unless the text already starts with it."""
        ids: list[int] = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self._backend.encode(part))
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise Gemma4Error(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
            if token in self._special_ids:
                out.append(self._backend.decode(run))
                run = []
                if not skip_special:
                    out.append(self._special_ids[token])
            else:
                run.append(token)
        out.append(self._backend.decode(run))
        return "".join(out)

    # ----- chat --------------------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        enable_thinking: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> str:
        """The conversation as prompt text (starting with <bos>), through the checkpoint's template if any."""
        _check_messages(messages)
        if self.chat_template is not None:
            return render_jinja(
                self.chat_template,
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=BOS,
                eos_token=EOS,
            )
        return render_gemma4(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, tools=tools
        )

    def encode_chat(self, messages: Sequence[Message], **kwargs) -> list[int]:
        """`render_chat` tokenized, with exactly one leading <bos>."""
        ids = self.encode(self.render_chat(messages, **kwargs), add_bos=True)
        if ids.count(self.bos_id) != 1:
            raise Gemma4Error("the rendered chat contains <bos> more than once (is it in a message's text?)")
        return ids


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise Gemma4Error("a chat needs at least one message")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise Gemma4Error(f"message {k}: expected an object with 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "developer", "user", "assistant", "model", "tool"):
            raise Gemma4Error(f"message {k}: unknown role {m['role']!r}")


# ----- backends ----------------------------------------------------------------------------------------------


class _SentencePiece:
    def __init__(self, path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise Gemma4Error(f"{path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self._sp.GetPieceSize()

    def specials(self) -> dict[str, int]:
        """Control, unknown and user-defined pieces (the processor API cannot tell user-defined ones apart,
        so read the piece types from the model proto)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        kinds = {proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN, proto.SentencePiece.USER_DEFINED}
        return {piece.piece: i for i, piece in enumerate(proto.pieces) if piece.type in kinds}

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(ids) if ids else ""

    def piece_to_id(self, piece: str) -> int | None:
        i = self._sp.PieceToId(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i) else i

    def id_to_piece(self, token: int) -> str:
        return self._sp.IdToPiece(token)


class _HFTokenizers:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises plain Exceptions on bad JSON
            raise Gemma4Error(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def specials(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False) if ids else ""

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def id_to_piece(self, token: int) -> str:
        return self._tok.id_to_token(token)


def find_chat_template(directory: str) -> str | None:
    """The checkpoint's own template: chat_template.jinja, else tokenizer_config.json's `chat_template`."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except json.JSONDecodeError as e:
            raise Gemma4Error(f"{path}: not valid JSON ({e})") from None
        if isinstance(template, list):  # the older list-of-named-templates form
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def load_tokenizer(path: str, *, prefer: str = "auto") -> Tokenizer:
    """The tokenizer of a checkpoint directory (or a tokenizer.model / tokenizer.json file).

    `prefer`: "auto" (tokenizer.json if present, else tokenizer.model), "sentencepiece" or "json".
    """
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    candidates = (
        [path]
        if os.path.isfile(path)
        else [os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")]
    )
    if prefer == "sentencepiece":
        candidates.reverse()
    elif prefer not in ("auto", "json"):
        raise ValueError(f"prefer must be auto, sentencepiece or json, got {prefer!r}")
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
        raise Gemma4Error(f"{path}: no tokenizer (expected tokenizer.model or tokenizer.json)")
    file = found[0]
    backend = _HFTokenizers(file) if file.endswith(".json") else _SentencePiece(file)
    return Tokenizer(backend, backend.specials(), find_chat_template(directory), file)


# ----- chat templates ------------------------------------------------------------------------------------------


def render_jinja(template: str, messages: Sequence[Message], **context) -> str:
    """Renders an HF chat template as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks, the
    `tojson` filter without HTML escaping, `raise_exception`)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise Gemma4Error(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), **context)
    except jinja2.TemplateError as e:
        raise Gemma4Error(f"chat template: {e}") from None


def render_gemma4(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    tools: Sequence[dict] | None = None,
    empty_thought_when_not_thinking: bool = False,
) -> str:
    """The Gemma 4 turn format (spec §5.5) for checkpoints that ship no template (e.g. Kaggle's).

    `<bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{text}<turn|>\\n<|turn>model\\n...`. The system turn
    appears when there is a system/developer message, tools, or thinking. `assistant` is rendered `model`;
    earlier answers lose their `<|channel>...<channel|>` thoughts. Tool declarations, calls and responses use
    the `<|tool>declaration:NAME{...}<tool|>` / `<|tool_call>call:NAME{...}<tool_call|>` /
    `<|tool_response>response:NAME{...}<tool_response|>` forms with strings in `<|"|>`.
    `empty_thought_when_not_thinking` adds the empty `<|channel>thought\\n<channel|>` that the 31B/26B
    templates put after the generation prompt when thinking is off.
    """
    out = [BOS]
    rest = list(messages)
    after = None  # what the last rendered item was: None, "tool_call", "tool_response"
    if enable_thinking or tools or rest[0]["role"] in ("system", "developer"):
        out.append(f"{TURN_START}system\n")
        if enable_thinking:
            out.append("<|think|>\n")
        if rest[0]["role"] in ("system", "developer"):
            out.append(_content(rest.pop(0)["content"], "system"))
        for tool in tools or ():
            out.append(f"<|tool>{_declaration(tool).strip()}<tool|>")
        out.append(f"{TURN_END}\n")

    previous_role = None
    for k, message in enumerate(rest):
        role = message["role"]
        if role == "tool":
            continue  # rendered with the assistant message that called the tool
        after = None
        turn_role = "model" if role in ("assistant", "model") else role
        # Consecutive assistant messages (e.g. after tool results) continue one model turn.
        if not (turn_role == "model" and previous_role in ("assistant", "model")):
            out.append(f"{TURN_START}{turn_role}\n")
        previous_role = role
        for call in message.get("tool_calls") or ():
            function = call["function"]
            arguments = function.get("arguments")
            body = (
                ",".join(f"{key}:{_argument(arguments[key], escape_keys=False)}" for key in sorted(arguments))
                if isinstance(arguments, dict)
                else (arguments or "")
            )
            out.append(f"<|tool_call>call:{function['name']}{{{body}}}<tool_call|>")
            after = "tool_call"
        responded = False
        if message.get("tool_calls"):
            names = {c.get("id"): c["function"]["name"] for c in message["tool_calls"]}
            for follow in rest[k + 1 :]:
                if follow["role"] != "tool":
                    break
                name = names.get(follow.get("tool_call_id"), follow.get("name", "unknown"))
                out.append(_tool_response(name, _content(follow.get("content"), "raw")))
                responded = True
                after = "tool_response"
        content = message.get("content")
        if content:
            out.append(_content(content, turn_role))
        if after == "tool_call" and not responded:
            out.append("<|tool_response>")
        elif not (responded and not content):
            out.append(f"{TURN_END}\n")

    if add_generation_prompt and after not in ("tool_call", "tool_response"):
        out.append(f"{TURN_START}model\n")
        if empty_thought_when_not_thinking and not enable_thinking:
            out.append("<|channel>thought\n<channel|>")
    return "".join(out)


_PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}


def _content(content, role: str) -> str:
    """Message content (a string or a list of parts) as text. Each text part is trimmed, and for the model
    stripped of thoughts; media parts become their placeholder tokens; role "raw" keeps text as is."""

    def text(t: str) -> str:
        return t if role == "raw" else _strip_thinking(t) if role == "model" else t.strip()

    if content is None:
        return ""
    if isinstance(content, str):
        return text(content)
    if role == "raw":  # tool results given as parts: their text parts, concatenated
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return "".join(text(part["text"]) if part["type"] == "text" else _PLACEHOLDERS[part["type"]] for part in content)


def _strip_thinking(text: str) -> str:
    """Earlier model answers are shown without their thoughts."""
    kept = [part.split("<|channel>")[0] if "<|channel>" in part else part for part in text.split("<channel|>")]
    return "".join(kept).strip()


def _quote(s: str) -> str:
    return f'<|"|>{s}<|"|>'


def _argument(value, escape_keys: bool = True) -> str:
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        items = (f"{_quote(key) if escape_keys else key}:{_argument(value[key], escape_keys)}" for key in sorted(value))
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_argument(v, escape_keys) for v in value) + "]"
    if value is None:
        return "None"  # jinja renders Python's None as "None"
    return str(value)


def _tool_response(name: str, response) -> str:
    if isinstance(response, dict):
        body = ",".join(f"{key}:{_argument(response[key], escape_keys=False)}" for key in sorted(response))
        return f"<|tool_response>response:{name}{{{body}}}<tool_response|>"
    return f"<|tool_response>response:{name}{{value:{_argument(response, escape_keys=False)}}}<tool_response|>"


_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _parameters(properties: dict) -> str:
    """A JSON-schema `properties` object in the Gemma 4 declaration syntax."""
    fields = []
    for key in sorted(properties):
        if key in _STANDARD_KEYS:
            continue
        value = properties[key]
        parts = []
        if value.get("description"):
            parts.append(f"description:{_quote(value['description'])}")
        kind = str(value.get("type", "")).upper()
        if kind == "STRING" and value.get("enum"):
            parts.append(f"enum:{_argument(value['enum'])}")
        elif kind == "ARRAY" and isinstance(value.get("items"), dict) and value["items"]:
            parts.append(f"items:{{{_items(value['items'])}}}")
        if value.get("nullable"):
            parts.append("nullable:true")
        if kind == "OBJECT":
            nested = value.get("properties") if isinstance(value.get("properties"), dict) else value
            parts.append(f"properties:{{{_parameters(nested)}}}")
            if value.get("required"):
                parts.append("required:[" + ",".join(_quote(r) for r in value["required"]) + "]")
        parts.append(f"type:{_quote(kind)}}}")
        fields.append(f"{key}:{{" + ",".join(parts))
    return ",".join(fields)


def _items(items: dict) -> str:
    parts = []
    for key in sorted(items):
        value = items[key]
        if value is None:
            continue
        if key == "properties":
            parts.append(f"properties:{{{_parameters(value) if isinstance(value, dict) else ''}}}")
        elif key == "required":
            parts.append("required:[" + ",".join(_quote(r) for r in value) + "]")
        elif key == "type":
            kind = value.upper() if isinstance(value, str) else [v.upper() for v in value]
            parts.append(f"type:{_argument(kind)}")
        else:
            parts.append(f"{key}:{_argument(value)}")
    return ",".join(parts)


def _declaration(tool: dict) -> str:
    function = tool["function"]
    out = f"declaration:{function['name']}{{description:{_quote(function.get('description', ''))}"
    params = function.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += f"properties:{{{_parameters(params['properties'])}}},"
        if params.get("required"):
            out += "required:[" + ",".join(_quote(r) for r in params["required"]) + "],"
        if params.get("type"):
            out += f"type:{_quote(params['type'].upper())}}}"
    if "response" in function:
        response = function["response"]
        out += ",response:{"
        if response.get("description"):
            out += f"description:{_quote(response['description'])},"
        if str(response.get("type", "")).upper() == "OBJECT":
            out += f"type:{_quote(response['type'].upper())}}}"
    return out + "}"
