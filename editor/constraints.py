"""`as=` value classes as vocabulary masks.

Each canvas position gets a rule (class, where in the span it is, whether padding may go there);
each rule is a boolean row over the vocabulary, computed once per tokenizer from the decoded text
of every token. Tokens that decode to U+FFFD are pieces of a multi-byte character: fine inside a
line or a JSON string, never a digit or a letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from editor.document import ValueClass

Place = Literal[
    "body",
    "first",
    "first_spaced",
    "whole",
    "whole_spaced",
    "slot",  # an `as=number` position where a lone separator may stand (see `number_slot`)
    # A number that becomes a JSON value (`json_number_place`): "." only, no leading zero.
    "json_space",
    "json_lead",
    "json_lead_spaced",
    "json_digits",
    "json_point",
]

_PATTERNS: dict[tuple[str, Place], re.Pattern[str]] = {
    ("int", "body"): re.compile(r"\d+"),
    ("int", "first"): re.compile(r"-?\d+|-"),
    # A number token starts and ends with a digit and holds one separator at most, except at a
    # slot, where a separator may also stand alone or at a token's edge: a slot's neighbours always
    # hold digits, so no fill reads "1,,2", ",5", "5," or "-", whatever order the positions are
    # committed in and whichever optional positions are dropped.
    ("number", "body"): re.compile(r"\d+(?:[.,]\d+)?"),
    ("number", "slot"): re.compile(r"(?=.)\d*[.,]?\d*"),
    ("number", "first"): re.compile(r"-?\d+(?:[.,]\d+)?|-"),
    # JSON values: no leading zero, so no lone minus (a "-" then "0" would read "-0..."), and one
    # "." at most, which only the one "json_point" position may hold.
    ("int", "json_lead"): re.compile(r"-?[1-9]\d*"),
    ("int", "json_digits"): re.compile(r"\d+"),
    ("number", "json_lead"): re.compile(r"-?[1-9]\d*"),
    ("number", "json_digits"): re.compile(r"\d+"),
    ("number", "json_point"): re.compile(r"(?=.)\d*\.?\d*"),
    ("word", "body"): re.compile(r"[^\W\d_]+"),
    ("word", "first"): re.compile(r"[^\W\d_]+"),
    # A token that may be the span's only kept token must be a whole value on its own.
    ("int", "whole"): re.compile(r"-?\d+"),
    ("number", "whole"): re.compile(r"-?\d+(?:[.,]\d+)?"),
    ("word", "whole"): re.compile(r"[^\W\d_]+"),
}
_PARTIAL_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class PositionRule:
    """What may be generated at one canvas position."""

    value_class: ValueClass | None = None
    place: Place = "body"
    droppable: bool = False  # in the optional tail of `[MASK a-b]`: the pad/end token is allowed
    after_word: bool = False  # right after a pinned must word: no token that would extend the word
    single_line: bool = False  # the span shares its line (or paragraph) with text: no newline in it
    line_start: bool = False  # the span's first position at the start of a line: no blank or line break first


def token_allowed(text: str, value_class: ValueClass | None, place: Place) -> bool:
    """Whether a token that decodes to `text` may stand at a position of this class and place.

    "first_spaced" is the first position of a span whose literal ended in a space: the token must
    bring that space itself (the user wrote a space, so a word follows, not punctuation).
    "whole" is a first position whose token may be the span's only kept token (`[MASK 1]`, or a
    range whose later positions may all be dropped): it must be a complete value, never a lone
    minus or a lone space; "whole_spaced" may bring the literal's space or not (then the literal
    keeps it)."""
    if place == "whole_spaced":
        text, place = text.removeprefix(" "), "whole"
    if place == "json_lead_spaced":
        text, place = text.removeprefix(" "), "json_lead"
    if place == "json_space":
        return text == " "  # the literal's space, alone: the next position starts the digits
    if place == "first_spaced":
        if not text.startswith(" "):
            return False
        text, place = text[1:], "first"
        if not text:
            return True  # a lone space token (digit-splitting tokenizers put one before a number)
    if value_class is None:
        return True
    if value_class == "line":
        return "\n" not in text and "\r" not in text
    if value_class == "json":
        return not any(ch in '"\\' or ord(ch) < 0x20 for ch in text)
    if _PARTIAL_CHARACTER in text:
        return False
    return _PATTERNS[(value_class, place)].fullmatch(text) is not None


def number_slot(offset: int, min_tokens: int) -> bool:
    """Whether a lone separator may stand at this `as=number` offset: both neighbours must always
    hold digits (the one before is past the first position, which may be a lone minus or space;
    the one after is required, so never dropped), and slots are never adjacent. Every second
    offset counted back from the third-last required one, from offset 2 on: [MASK 5 as=number]
    can write "12.50" and, after a space, [MASK 9 as=number] " 1,250.00" (one token a character)."""
    return 2 <= offset <= min_tokens - 3 and (min_tokens - 3 - offset) % 2 == 0


def json_number_place(offset: int, min_tokens: int, joins_space: bool, value_class: ValueClass) -> Place:
    """The place of a span position whose fill becomes a JSON number (`int` or `number`, at least
    one required token): an optional lone space, then a lead digit 1-9 (or a token such as "-5"),
    then digits; a `number` may hold one "." at the third-last required offset, so that it is
    always followed by a kept digit. Any tokens allowed here, committed in any order with any
    optional positions dropped, read as a JSON number."""
    lead = 1 if joins_space and min_tokens >= 2 else 0  # a required first token must bring the space
    if offset < lead:
        return "json_space"
    if offset == lead:
        return "json_lead_spaced" if joins_space and lead == 0 else "json_lead"
    if value_class == "number" and offset == min_tokens - 3:
        return "json_point"
    return "json_digits"


def _opens_blank(text: str) -> bool:
    """Whether a token would start a line with nothing or a line break (a space alone is dropped
    there by the renderer, so a line-start fill would lose a token)."""
    return not text.strip() or text.lstrip(" \t")[:1] in ("\n", "\r")


MAX_SPELLINGS = 16  # tokens per word class a repetition penalty touches ("the", " the", "The", ...)


class VocabularyRules:
    """Boolean vocabulary masks for position rules, cached per rule. Rows are [V] over the
    model's logit width, which may be wider than the tokenizer (the extra ids are never allowed)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, banned: set[int], end_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        self.banned = banned
        self.end_ids = end_ids
        size = min(len(tokenizer), vocab_size)
        self.texts = [tokenizer.decode([token_id], clean_up_tokenization_spaces=False) for token_id in range(size)]
        self._rows: dict[PositionRule, torch.Tensor] = {}
        self._space_edges: tuple[torch.Tensor, torch.Tensor] | None = None
        self._word_classes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lettered: torch.Tensor | None = None

    def mask(self, rule: PositionRule) -> torch.Tensor:
        """[V] bool, True where the token may be generated."""
        if rule not in self._rows:
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            for token_id, text in enumerate(self.texts):
                if token_id in self.banned or (rule.after_word and text[:1].isalnum()):
                    continue  # e.g. "ant" after must="refund" would make "refundant"
                if (rule.single_line and ("\n" in text or "\r" in text)) or (rule.line_start and _opens_blank(text)):
                    continue
                if token_allowed(text, rule.value_class, rule.place):
                    allowed[token_id] = True
            if rule.droppable:
                allowed[list(self.end_ids)] = True
            if not allowed.any():
                raise ValueError(f"no token of this vocabulary fits {rule}")
            self._rows[rule] = allowed
        return self._rows[rule]

    def space_edges(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([V], [V]) bool: the tokens whose text starts with a space, and those whose text ends with one."""
        if self._space_edges is None:
            starts = torch.zeros(self.vocab_size, dtype=torch.bool)
            ends = torch.zeros(self.vocab_size, dtype=torch.bool)
            starts[: len(self.texts)] = torch.tensor([text.startswith(" ") for text in self.texts])
            ends[: len(self.texts)] = torch.tensor([text.endswith(" ") for text in self.texts])
            self._space_edges = (starts, ends)
        starts, ends = self._space_edges
        return starts.to(device), ends.to(device)

    def lettered(self, device: torch.device) -> torch.Tensor:
        """[V] bool: tokens with a letter in them (the n-grams a no-repeat rule counts)."""
        if self._lettered is None:
            self._lettered = torch.zeros(self.vocab_size, dtype=torch.bool)
            self._lettered[: len(self.texts)] = torch.tensor([any(ch.isalpha() for ch in text) for text in self.texts])
        return self._lettered.to(device)

    def word_classes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens spelling the same word, case and edge spaces aside (" Book", "book", "BOOK"):
        each token's class [V] long (-1 for tokens with no letter or digit: punctuation, spaces),
        and each class's tokens [C, K] (rows padded by repeating their first token; at most
        MAX_SPELLINGS kept), so a penalty touches K logits per position, not the vocabulary."""
        if self._word_classes is None:
            class_of = [-1] * self.vocab_size
            spellings: dict[str, list[int]] = {}  # in class order
            for token_id, text in enumerate(self.texts):
                word = text.strip().lower()
                if any(ch.isalnum() for ch in word):
                    members = spellings.setdefault(word, [])
                    class_of[token_id] = class_of[members[0]] if members else len(spellings) - 1
                    members.append(token_id)
            width = min(MAX_SPELLINGS, max((len(m) for m in spellings.values()), default=1))
            rows = [(m + [m[0]] * width)[:width] for m in spellings.values()] or [[0] * width]
            self._word_classes = (torch.tensor(class_of, dtype=torch.long), torch.tensor(rows, dtype=torch.long))
        classes, spelled = self._word_classes
        return classes.to(device), spelled.to(device)

    def table(self, rules: list[PositionRule], device: torch.device) -> torch.Tensor:
        """[R, V] bool for a list of distinct rules."""
        return torch.stack([self.mask(rule) for rule in rules]).to(device)
