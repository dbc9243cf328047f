"""A conversation with a checkpoint, as the prompt of its next turn.

A model whose tokenizer has a chat template gets the turns as user/assistant messages through it.
A base model has no notion of turns: it continues a transcript, the turns (each line as typed,
followed by the model's continuation) joined with newlines. Either way the prompt is fitted to the
context by engine.generate, which keeps the most recent tokens.
"""

from __future__ import annotations

from engine.generate import encode, encode_chat
from engine.inference import LoadedModel


class Chat:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.turns: list[tuple[str, str]] = []
        self.pending = ""

    def prompt_ids(self, line: str) -> list[int]:
        self.pending = line
        if self.loaded.has_chat_template:
            messages = [m for user, reply in self.turns
                        for m in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})]
            return encode_chat(self.loaded, messages + [{"role": "user", "content": line}])
        transcript = "\n".join(user + reply for user, reply in self.turns)
        return encode(self.loaded, f"{transcript}\n{line}" if transcript else line)

    def answered(self, reply: str) -> None:
        self.turns.append((self.pending, reply))

    def reset(self) -> None:
        self.turns.clear()
