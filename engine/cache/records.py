"""Instruction records: which format a source's records are in, checking them, and turning each into
text segments that train or not.

The format is found from the columns, first match wins:

- `messages` (chat: a list of {role, content}) -> `chat`, rendered with the tokenizer's chat
  template (transformers' renderer behind apply_chat_template); the assistant turns train. A tokenizer without a
  chat template is refused (there is no generic fallback that a chat model would expect);
- `prompt` and `response` -> `prompt_response`;
- `instruction` and `output` (optional `input`, Alpaca) -> `instruction`;
- anything else is plain text from --text-column, trained on every token as before.

`prompt_response` and `instruction` go through the chat template as one user/assistant exchange
when the tokenizer has one, else they are plain text: the prompt (or the Alpaca prompt) as is,
then the response, which trains. Each segment is tokenized on its own, as a prompt is at inference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.cache.metadata import TEXT_FORMAT
from engine.errors import UserError, shown

REQUIRED = {"chat": ("messages",), "prompt_response": ("prompt", "response"), "instruction": ("instruction", "output")}
OPTIONAL = {"instruction": ("input",)}
ROLES = ("system", "user", "assistant", "tool")
ALPACA = ("Below is an instruction that describes a task{context}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
ALPACA_CONTEXT = ", paired with an input that provides further context"

Segments = list[tuple[str, bool]]  # (text, trains)


def detect_format(columns: Sequence[str]) -> str:
    have = set(columns)
    return next((fmt for fmt, need in REQUIRED.items() if have.issuperset(need)), TEXT_FORMAT)


def format_columns(fmt: str, columns: Sequence[str], text_column: str) -> list[str]:
    """The columns a cache of format `fmt` reads."""
    if fmt == TEXT_FORMAT:
        return [text_column]
    return [*REQUIRED[fmt], *(c for c in OPTIONAL.get(fmt, ()) if c in columns)]


def check_record(record: Mapping[str, Any], fmt: str, where: str) -> dict[str, Any]:
    """The record with only its format's fields, or one UserError line saying what is wrong."""
    if fmt == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got "
                            f"{shown(json.dumps(messages, default=str), 80)}")
        for m in messages:
            if not (isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: each message needs a role ({', '.join(ROLES)}) and text content, got "
                                f"{shown(json.dumps(m, default=str), 80)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: no assistant message, so nothing would train")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    out = {}
    for key in (*REQUIRED[fmt], *OPTIONAL.get(fmt, ())):
        value = record.get(key)
        if key in REQUIRED[fmt] and not isinstance(value, str):
            raise UserError(f"{where}: {key!r} must be text, got {shown(json.dumps(value, default=str), 80)}")
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: {key!r} must be text or empty, got {type(value).__name__}")
        out[key] = value or ""
    return out


def record_text(record: Mapping[str, Any]) -> str:
    """All of a record's text, for training a BPE tokenizer and sizing chunks."""
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"])
    return "\n".join(v for v in record.values() if v)


def as_messages(record: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return list(record["messages"])
    if fmt == "prompt_response":
        prompt, answer = record["prompt"], record["response"]
    else:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        answer = record["output"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def plain_segments(record: Mapping[str, Any], fmt: str) -> Segments:
    """Without a chat template: the prompt as it is (Alpaca's for `instruction`), then the response."""
    if fmt == "prompt_response":
        return [(record["prompt"], False), (record["response"], True)]
    context = record.get("input") or ""
    prompt = ALPACA.format(context=ALPACA_CONTEXT if context else "", instruction=record["instruction"],
                           input=f"### Input:\n{context}\n\n" if context else "")
    return [(prompt, False), (record["output"], True)]


def chat_template(tokenizer_dir: Path) -> str | None:
    """The template a tokenizer folder carries (chat_template.jinja or tokenizer_config.json), if any."""
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template else None


def named_special_tokens(tokenizer_dir: Path) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as the folder's special_tokens_map.json and tokenizer_config.json
    name them (the later file wins, as in transformers); chat templates refer to them by these names."""
    named: dict[str, str] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            data = json.loads((tokenizer_dir / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key, value in (data.items() if isinstance(data, dict) else ()):
            token = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(token, str):
                named[key] = token
    return named


class Renderer:
    """Records of one format -> segments, through the tokenizer's chat template when it has one
    (transformers' own renderer, the one apply_chat_template runs, fed the same special tokens)."""

    def __init__(self, fmt: str, tokenizer_dir: Path) -> None:
        self.fmt = fmt
        self.template = require_template(fmt, chat_template(tokenizer_dir), tokenizer_dir)
        self.specials = named_special_tokens(tokenizer_dir) if self.template else {}

    @property
    def templated(self) -> bool:
        """Template text names special tokens (`<|im_start|>`) that must encode as such."""
        return self.template is not None

    def segments(self, record: Mapping[str, Any]) -> Segments:
        if self.template is None:
            return plain_segments(record, self.fmt)
        messages = as_messages(record, self.fmt)
        out: Segments = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True)
            full = self._render(messages[:i + 1], generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise UserError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                "continuation, so the assistant turns cannot be masked")
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self._render(messages, generation_prompt=False)[len(done):]
        return out + ([(rest, False)] if rest else [])

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        if not messages:
            return ""
        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.template,
                                                add_generation_prompt=generation_prompt, **self.specials)
        except Exception as e:  # noqa: BLE001 - jinja raises whatever the template raises
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"the tokenizer's chat template failed on a record: {shown(first, 120)}") from None
        return rendered[0]


def require_template(fmt: str, template: str | None, tokenizer: Path | str) -> str | None:
    """The template, or one UserError line when chat records meet a tokenizer without one."""
    if fmt == "chat" and not template:
        raise UserError(f"chat records (`messages`) need a tokenizer with a chat template, and {tokenizer} has none; "
                        "use the tokenizer of a chat model (a folder or hub name), or prompt/response records")
    return template
