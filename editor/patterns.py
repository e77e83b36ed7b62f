"""Pattern spans: a regular expression compiled to a character automaton (interegular), indexed
against the model's vocabulary, and the exact per-step masks that keep every fill matching.

Index (once per pattern and vocabulary, cached): each token's text is walked from every automaton
state, vectorised over the vocabulary, giving `next[token, state]`; tokens with the same row form a
class, so a mask is computed per class ([C] with C in the hundreds) and spread to the vocabulary
with one gather. Two states are added: `dead` (no match possible) and `pre`, the start of a span
whose literal's space it may bring (docs/language.md, Seams): from `pre` a token's one leading
space is the literal's, and the rest of its text is walked from the automaton's start.

Per step, for a span of L positions: each position is a relation between states ([n, n] bool): a
committed token's transition, an end token in the droppable tail (`[MASK a-b]`) the identity, a
masked position any token's. Forward reachability from the start and backward reachability from
the accepting states (L small matrix products each way) give, for every masked position, exactly
the tokens that some completion of the whole span accepts: committed tokens fixed, other masked
positions free, any length the range allows. Whatever order the sampler commits in, the span
stays completable; `PatternStep.settle` re-checks positions committed in the same step one after
another (each was allowed alone, not necessarily together) and replaces a token that no longer
fits with the best one that does.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import interegular
import numpy as np
import torch

from editor.constraints import VocabularyRules
from editor.regexes import compile_fsm

__all__ = [
    "PatternStep",
    "SpanConstraint",
    "TokenAutomaton",
    "automaton_for",
    "restrict_patterns_",
]

_PARTIAL_CHARACTER = "\ufffd"


@dataclass(frozen=True, eq=False)
class TokenAutomaton:  # (not slotted: `free_or_end` is cached on the instance)
    """A pattern indexed against one vocabulary. States 0..S-1 are the automaton's, S is `dead`,
    S+1 is `pre`; n = S + 2."""

    patterns: tuple[str, ...]
    start: int
    pre: int
    dead: int
    finals: torch.Tensor  # [n] bool
    class_of: torch.Tensor  # [V] long, each token's class (excluded tokens: an all-dead class)
    class_next: torch.Tensor  # [C, n] long, a class's next state from each state
    free: torch.Tensor  # [n, n] float: s -> t when some token leads from s to t
    end_ids: tuple[int, ...]
    build_seconds: float

    @property
    def states(self) -> int:
        return int(self.finals.shape[0])

    @functools.cached_property
    def free_or_end(self) -> torch.Tensor:
        """[n, n]: `free`, or staying put (an end token in a range's droppable tail)."""
        return torch.clamp(self.free + torch.eye(self.states), max=1.0)

    def token_counts(self, joins_space: bool, limit: int) -> list[int]:
        """The numbers of tokens (up to `limit`) that some fill matching the pattern can have."""
        state = self._start_vector(joins_space)
        counts = []
        finals = self.finals.float()
        for count in range(limit + 1):
            if float(state @ finals) > 0:
                counts.append(count)
            state = ((state @ self.free) > 0).float()
            if not state.any():
                break
        return counts

    def _start_vector(self, joins_space: bool) -> torch.Tensor:
        vector = torch.zeros(self.states)
        vector[self.pre if joins_space else self.start] = 1.0
        return vector


@dataclass(frozen=True)
class SpanConstraint:
    """A pattern span on a canvas: positions start .. start+length-1, the ones from min_tokens on
    droppable (they may hold an end token, which is dropped)."""

    start: int
    length: int
    min_tokens: int
    joins_space: bool
    automaton: TokenAutomaton

    def reach(self, tokens: Sequence[int], masked: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward [L+1, n] (states some reading of the first i positions can be in) and backward
        [L+1, n] (states from which positions i.. can still end in an accepting state). A masked
        position is a product with the any-token relation [n, n]; a committed token a scatter
        (forward) or a gather (backward) along its transition [n]; an end token in the droppable
        tail leaves the states as they are."""
        automaton = self.automaton
        moves = [self._move(offset, tokens[offset], masked[offset]) for offset in range(self.length)]
        forward = torch.zeros(self.length + 1, automaton.states)
        forward[0] = automaton._start_vector(self.joins_space)
        for offset, move in enumerate(moves):
            if move is None:
                forward[offset + 1] = forward[offset]
            elif move.dim() == 2:
                forward[offset + 1] = ((forward[offset] @ move) > 0).float()
            else:
                forward[offset + 1] = torch.zeros(automaton.states).index_add_(0, move, forward[offset]).clamp_(max=1.0)
        backward = torch.zeros_like(forward)
        backward[self.length] = automaton.finals.float()
        for offset in range(self.length - 1, -1, -1):
            move = moves[offset]
            if move is None:
                backward[offset] = backward[offset + 1]
            elif move.dim() == 2:
                backward[offset] = ((move @ backward[offset + 1]) > 0).float()
            else:
                backward[offset] = backward[offset + 1][move]
        return forward, backward

    def feasible(self, tokens: Sequence[int], masked: Sequence[bool]) -> bool:
        """Whether some completion of the masked positions matches."""
        forward, _ = self.reach(tokens, masked)
        return bool((forward[self.length] * self.automaton.finals).any())

    def allowed(self, tokens: Sequence[int], masked: Sequence[bool], offsets: Sequence[int]) -> torch.Tensor:
        """[K, V] bool: the tokens each masked offset may take so that the span stays completable."""
        automaton = self.automaton
        forward, backward = self.reach(tokens, masked)
        index = torch.tensor(list(offsets), dtype=torch.long)
        before = forward[index] > 0  # [K, n]
        after = backward[index + 1] > 0  # [K, n]
        # A class fits when, from some reachable state, its next state can still finish.
        lands = after[:, automaton.class_next]  # [K, C, n]
        classes = (lands & before[:, None, :]).any(dim=-1)  # [K, C]
        result = classes[:, automaton.class_of]  # [K, V]
        droppable = index >= self.min_tokens
        if droppable.any() and automaton.end_ids:
            stays = (before & after).any(dim=-1) & droppable  # an end token keeps the state
            result[:, list(automaton.end_ids)] = stays[:, None]
        return result

    def _move(self, offset: int, token: int, masked: bool) -> torch.Tensor | None:
        """A position as a step between states: [n, n] relation (masked), [n] next states (a
        committed token), or None (an end token in the droppable tail: no change)."""
        automaton = self.automaton
        droppable = offset >= self.min_tokens
        if masked:
            return automaton.free_or_end if droppable else automaton.free
        if droppable and token in automaton.end_ids:
            return None
        if 0 <= token < automaton.class_of.shape[0]:
            return automaton.class_next[automaton.class_of[token]]
        return torch.full((automaton.states,), automaton.dead, dtype=torch.long)


# --- building the index -------------------------------------------------------------------------

_cache: weakref.WeakKeyDictionary[VocabularyRules, dict[tuple[str, ...], TokenAutomaton]] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def automaton_for(patterns: tuple[str, ...], vocabulary: VocabularyRules) -> TokenAutomaton:
    """The strings matching every pattern (each already checked by
    `editor.regexes.checked_pattern`) as one automaton indexed against the vocabulary, built once
    per (patterns, vocabulary). Raises PatternError for what the automaton compiler cannot express."""
    with _cache_lock:
        cached = _cache.setdefault(vocabulary, {}).get(patterns)
    if cached is not None:
        return cached
    built = _build(patterns, vocabulary)
    with _cache_lock:
        _cache[vocabulary][patterns] = built
    return built


def _build(patterns: tuple[str, ...], vocabulary: VocabularyRules) -> TokenAutomaton:
    started = time.perf_counter()
    fsm = compile_fsm(patterns[0])
    for pattern in patterns[1:]:
        fsm = fsm & compile_fsm(pattern)
    live, order = _live_states(fsm)
    size = len(order)
    dead, pre = size, size + 1
    symbols = fsm.alphabet._symbol_mapping  # char -> symbol (and anything_else -> its symbol)
    other = symbols[interegular.fsm.anything_else]
    alphabet_size = max(symbols.values()) + 1
    table = np.full((size + 2, alphabet_size), dead, dtype=np.int32)  # pre's row unused while walking
    for state, moves in fsm.map.items():
        if state in live:
            for symbol, target in moves.items():
                if target in live:
                    table[order[state], symbol] = order[target]
    texts = vocabulary.texts
    usable = [
        token_id
        for token_id, text in enumerate(texts)
        if text and _PARTIAL_CHARACTER not in text and token_id not in vocabulary.banned
    ]
    start = order[fsm.initial] if fsm.initial in live else dead
    lookup = {ord(ch): symbol for ch, symbol in symbols.items() if isinstance(ch, str)}
    states = _token_states(table, [texts[t] for t in usable], lookup, other, start, pre, dead)
    all_dead = np.full((1, size + 2), dead, dtype=np.int32)
    table_rows = np.ascontiguousarray(np.concatenate([all_dead, states]))
    as_bytes = table_rows.view(np.dtype((np.void, table_rows.dtype.itemsize * table_rows.shape[1]))).reshape(-1)
    _, first_of_class, class_index = np.unique(as_bytes, return_index=True, return_inverse=True)
    rows = table_rows[first_of_class]
    class_index = class_index.reshape(-1)
    class_of = np.full(vocabulary.vocab_size, class_index[0], dtype=np.int64)
    class_of[np.array(usable, dtype=np.int64)] = class_index[1:]
    class_next = torch.from_numpy(rows.astype(np.int64))
    n = size + 2
    free = torch.zeros(n, n)
    free[torch.arange(n)[None].expand(class_next.shape[0], n), class_next] = 1.0
    free[:, dead] = 0.0  # a way into the dead state never helps
    finals = torch.zeros(n, dtype=torch.bool)
    for state in fsm.finals:
        if state in live:
            finals[order[state]] = True
    if fsm.initial in live and fsm.initial in fsm.finals:
        finals[pre] = True
    return TokenAutomaton(
        patterns=patterns,
        start=start,
        pre=pre,
        dead=dead,
        finals=finals,
        class_of=torch.from_numpy(class_of),
        class_next=class_next,
        free=free,
        end_ids=tuple(vocabulary.end_ids),
        build_seconds=time.perf_counter() - started,
    )


def _live_states(fsm: interegular.FSM) -> tuple[set[Any], dict[Any, int]]:
    """States that can still reach an accepting state, and their new numbers 0..S-1."""
    incoming: dict[Any, set[Any]] = {}
    for state, moves in fsm.map.items():
        for target in moves.values():
            incoming.setdefault(target, set()).add(state)
    live = set(fsm.finals)
    frontier = list(live)
    while frontier:
        state = frontier.pop()
        for source in incoming.get(state, ()):
            if source not in live:
                live.add(source)
                frontier.append(source)
    ordered = sorted(live, key=lambda s: (s != fsm.initial, str(s)))
    return live, {state: number for number, state in enumerate(ordered)}


def _token_states(
    table: np.ndarray, texts: list[str], lookup: Mapping[int, int], other: int, start: int, pre: int, dead: int
) -> np.ndarray:
    """[U, n] the state each token leads to from each state (column `pre`: from the span's start,
    its one leading space taken as the literal's). Tokens are grouped by length, and tokens that
    read as the same symbols (and start with a space or not alike) are walked once: the work is
    the number of distinct spellings times their length times n."""
    lengths = np.fromiter((len(text) for text in texts), dtype=np.int64, count=len(texts))
    flat = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    unique, inverse = np.unique(flat, return_inverse=True)
    symbols = np.array([lookup.get(int(code), other) for code in unique], dtype=np.int32)[inverse.reshape(-1)]
    firsts = np.cumsum(lengths) - lengths
    spaced = np.fromiter((text.startswith(" ") for text in texts), dtype=np.int32, count=len(texts))
    n = table.shape[0]
    states = np.empty((len(texts), n), dtype=np.int32)
    for length in np.unique(lengths).tolist():
        members = np.nonzero(lengths == length)[0]
        grid = symbols[firsts[members][:, None] + np.arange(length)]  # [m, length]
        key = np.ascontiguousarray(np.concatenate([spaced[members][:, None], grid], axis=1))
        rows = key.view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).reshape(-1)
        _, first, which = np.unique(rows, return_index=True, return_inverse=True)
        distinct, leading = grid[first], spaced[members][first].astype(bool)
        walked = np.broadcast_to(np.arange(n, dtype=np.int32), (len(first), n)).copy()
        full = np.full(len(first), length, dtype=np.int64)
        _walk(table, walked[:, :pre], distinct, full)
        # From `pre`: one leading space is the literal's; the rest is walked from the start.
        from_pre = np.full((len(first), 1), start, dtype=np.int32)
        shifted = np.concatenate([distinct[:, 1:], np.full((len(first), 1), -1, dtype=np.int32)], axis=1)
        _walk(table, from_pre, np.where(leading[:, None], shifted, distinct), full - leading)
        walked[:, pre] = from_pre[:, 0]
        states[members] = walked[which.reshape(-1)]
    return states


def _walk(table: np.ndarray, states: np.ndarray, symbols: np.ndarray, lengths: np.ndarray) -> None:
    """Advance every token's states [U, k] through its symbols [U, T], in place; only the tokens
    still running at a column are touched (the work is the vocabulary's total length times k)."""
    for column in range(symbols.shape[1]):
        running = np.nonzero(lengths > column)[0]
        if not len(running):
            break
        states[running] = table[states[running], symbols[running, column][:, None]]


# --- the sampler's hook ---------------------------------------------------------------------------


class ConstrainedRow(Protocol):
    constraints: Sequence[SpanConstraint]


@dataclass
class PatternStep:
    """What `restrict_patterns_` worked out for one step: per (row, slot), the allowed mask it put
    on the logits, so that `settle` can check the step's commits without a second pass."""

    rows: Sequence[ConstrainedRow]
    ids: torch.Tensor  # [B, L]
    masked: torch.Tensor  # [B, L]
    candidates: torch.Tensor  # [B, M]
    masks: dict[tuple[int, int], torch.Tensor]  # (row, slot) -> [V] bool

    def settle(
        self,
        logits: torch.Tensor,  # [B, M, V] the step's filtered logits
        tokens: torch.Tensor,  # [B, M]
        confidence: torch.Tensor,  # [B, M]
        committed: torch.Tensor,  # [B, M] bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tokens with every commit in a pattern span made to fit: commits are taken in
        order of confidence, each checked with the ones before it in place."""
        tokens, confidence = tokens.clone(), confidence.clone()
        for row_number, row in enumerate(self.rows):
            if not row.constraints:
                continue
            slots = committed[row_number].nonzero().flatten().tolist()
            if not slots:
                continue
            positions = self.candidates[row_number].tolist()
            chosen = tokens[row_number].tolist()
            sure = confidence[row_number].tolist()
            ids = self.ids[row_number].tolist()
            masked = self.masked[row_number].tolist()
            for constraint in row.constraints:
                mine = [s for s in slots if constraint.start <= positions[s] < constraint.start + constraint.length]
                mine.sort(key=lambda s: -sure[s])
                span = slice(constraint.start, constraint.start + constraint.length)
                span_ids, span_masked = ids[span], masked[span]
                for turn, slot in enumerate(mine):
                    offset = positions[slot] - constraint.start
                    if turn == 0 and (row_number, slot) in self.masks:
                        fits = self.masks[(row_number, slot)]
                    else:
                        fits = constraint.allowed(span_ids, span_masked, [offset])[0]
                    token = chosen[slot]
                    if not bool(fits[token]):
                        token, probability = _best_fitting(logits[row_number, slot], fits.to(logits.device))
                        tokens[row_number, slot] = token
                        confidence[row_number, slot] = probability
                    span_ids[offset], span_masked[offset] = token, False
        return tokens, confidence


def _best_fitting(logits: torch.Tensor, fits: torch.Tensor) -> tuple[int, float]:
    """The most likely token of `fits` [V] under logits [V] (the first one if none is finite)."""
    restricted = logits.masked_fill(~fits, float("-inf"))
    if torch.isneginf(restricted).all():
        restricted = fits.float().log()
    token = int(restricted.argmax())
    probability = float(torch.exp(restricted[token] - torch.logsumexp(restricted, dim=-1)))
    return token, probability if math.isfinite(probability) else 0.0


def restrict_patterns_(
    logits: torch.Tensor,  # [B, M, V], changed in place
    rows: Sequence[ConstrainedRow],
    ids: torch.Tensor,  # [B, L]
    masked: torch.Tensor,  # [B, L] bool
    candidates: torch.Tensor,  # [B, M]
) -> PatternStep | None:
    """Disallow (-inf) at each masked candidate of a pattern span every token no matching
    completion of its span could hold; None (and nothing done) when no row has a pattern span."""
    if not any(row.constraints for row in rows):
        return None
    masks: dict[tuple[int, int], torch.Tensor] = {}
    for row_number, row in enumerate(rows):
        if not row.constraints:
            continue
        positions = candidates[row_number].tolist()
        row_ids = ids[row_number].tolist()
        row_masked = masked[row_number].tolist()
        for constraint in row.constraints:
            end = constraint.start + constraint.length
            slots = [s for s, p in enumerate(positions) if constraint.start <= p < end and row_masked[p]]
            slots = list(dict.fromkeys(slots))
            if not slots:
                continue
            span = slice(constraint.start, end)
            offsets = [positions[s] - constraint.start for s in slots]
            allowed = constraint.allowed(row_ids[span], row_masked[span], offsets)
            width = logits.shape[-1]
            allowed = allowed[:, :width]
            if allowed.shape[1] < width:
                allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]))
            allowed = allowed.to(logits.device)
            index = torch.tensor(slots, dtype=torch.long, device=logits.device)
            logits[row_number, index] = logits[row_number, index].masked_fill(~allowed, float("-inf"))
            for slot, mask in zip(slots, allowed, strict=True):
                masks[(row_number, slot)] = mask
    return PatternStep(rows, ids, masked, candidates, masks)
