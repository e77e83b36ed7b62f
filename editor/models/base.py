"""The one small interface the sampler needs from a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from editor.chat import Instruction


@dataclass(frozen=True)
class SpecialIds:
    """Ids that differ per model family; they come from each checkpoint's config or tokenizer."""

    mask: int
    pad: int  # the padding/end token: fills the unused tail of a `[MASK a-b]` span
    bos: int | None = None  # kept at position 0 so a shifted model can predict position 1
    eos: int | None = None
    extra_end: tuple[int, ...] = ()  # other end-like ids (e.g. LLaDA's end-of-turn)

    @property
    def end_ids(self) -> tuple[int, ...]:
        ids = (self.pad,) + ((self.eos,) if self.eos is not None else ()) + self.extra_end
        return tuple(dict.fromkeys(ids))


@runtime_checkable
class DiffusionModel(Protocol):
    """A masked diffusion (or masked) language model as the sampler sees it."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    special: SpecialIds
    logits_shifted: bool  # True when position i is predicted by the output at i-1 (Dream)
    vocab_size: int  # width of the logits, which may exceed len(tokenizer)

    @property
    def device(self) -> torch.device: ...

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] long, attention_mask [B, L] bool (False = padding) -> logits [B, L, V]
        as the model produces them (still shifted for a shifted model)."""
        ...

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        """The ids that go before and after the document canvas: a beginning-of-text token, a
        chat template for instruct models, `[CLS]`/`[SEP]` for BERT-like models. A `Conversation`
        goes through the chat template (or `editor.chat.plain_framing`) and the canvas is the
        assistant's answer."""
        ...


def aligned_logits(model: DiffusionModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits where row [b, i] scores position i, whatever the model's convention. [B, L, V]"""
    logits = model.forward_logits(input_ids, attention_mask)
    if model.logits_shifted:
        # Position i is predicted by the output at i-1; position 0 keeps its own (it is always pinned).
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


@dataclass
class CanvasCache:
    """Keys/values of every canvas position, per layer [B, Hkv, L, D], with what a window run needs
    to know about the canvas (rotary positions [B, L], attention [B, L] or None when unpadded)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    positions: torch.Tensor
    attention: torch.Tensor | None


@runtime_checkable
class WindowedModel(Protocol):
    """What the fast sampler path needs on top of `DiffusionModel` (docs/engine.md). `at` [B, M] are
    canvas positions to score; logits come back aligned (row [b, j] scores position at[b, j]) in
    the model's dtype, computed only there."""

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, at: torch.Tensor, *, keep_cache: bool
    ) -> tuple[torch.Tensor, CanvasCache | None]:
        """A full pass over the canvas ([B, L]; attention None = no padding): logits [B, M, V] at
        `at`, and with `keep_cache` the keys/values of every position."""
        ...

    def score_window(
        self, cache: CanvasCache, input_ids: torch.Tensor, window: torch.Tensor, at: torch.Tensor
    ) -> torch.Tensor:
        """Recompute only the positions `window` [B, W] of the canvas `input_ids` [B, L] against
        `cache` (updated in place there) and return logits [B, M, V] at `at`. The window must hold
        every position whose input changed since its keys/values were cached, and every position
        whose output scores an `at` position (at - 1 for a shifted model)."""
        ...


def windowed(model: DiffusionModel) -> WindowedModel | None:
    """The model as a `WindowedModel` when its class implements one. Looked up on the class, not
    the instance, so a wrapper that forwards unknown attributes to a model (and overrides
    `forward_logits` to observe or restrict it) is still run through its own `forward_logits`."""
    kind = type(model)
    if callable(getattr(kind, "score", None)) and callable(getattr(kind, "score_window", None)):
        return model  # type: ignore[return-value]
    return None


def refreshes_in_window(model: WindowedModel, rows: int, width: int) -> bool:
    """Whether `model` would rather take a refresh of some rows into a window run of `rows` x
    `width` positions than run those rows' full pass apart (a model says so through an optional
    `refresh_in_window(rows, width)`; one that does not never folds)."""
    decide = getattr(model, "refresh_in_window", None)
    return bool(decide(rows, width)) if callable(decide) else False


def scored_logits(
    model: DiffusionModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, at: torch.Tensor
) -> torch.Tensor:
    """Aligned logits [B, M, V] at positions `at` [B, M] from a full pass, for any model."""
    logits = aligned_logits(model, input_ids, attention_mask)  # [B, L, V]
    return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
