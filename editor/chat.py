"""A conversation as the model's frame: the chat messages that come before a fill (the OpenAI
API's chat completions, docs/openai.md). Pure Python: no torch import.

A model with a chat template puts the messages through it (with the generation prompt), and the
fill is the assistant's turn. A model without one gets the plain framing below, so that the same
conversation reads the same way on every model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

Role = Literal["system", "user", "assistant"]
PLAIN_LABELS: dict[Role, str] = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """The messages before the assistant's answer (the fill)."""

    messages: tuple[ChatMessage, ...]

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as a tokenizer's `apply_chat_template` takes them."""
        return [{"role": message.role, "content": message.content} for message in self.messages]

    @property
    def chars(self) -> int:
        return sum(len(message.content) for message in self.messages)


# What goes to `DiffusionModel.frame`: an instruction (one user turn), or a whole conversation.
Instruction: TypeAlias = "str | Conversation"


def plain_framing(messages: Sequence[ChatMessage]) -> str:
    """The conversation as plain text for a model without a chat template: one paragraph per
    message, "Role: content", then "Assistant:" (the fill brings its own leading space)."""
    turns = [f"{PLAIN_LABELS[message.role]}: {message.content}" for message in messages]
    return "\n\n".join([*turns, f"{PLAIN_LABELS['assistant']}:"])


__all__ = ["PLAIN_LABELS", "ChatMessage", "Conversation", "Instruction", "Role", "plain_framing"]
