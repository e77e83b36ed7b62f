"""Judges of filled documents: which of several candidate fills reads best (`SamplerOptions.candidates`).

A fill can run N candidates as rows of one sampler batch (the first at the asked temperature,
usually greedy, the others sampled) and keep the one a judge prefers (docs/sampler.md):

- `CausalJudge`, the default model's natural judge: its autoregressive twin, the base model the
  adapter started from (SmolLM2-135M-Instruct) run left to right with the adapter switched off. It
  scores the log-probability of the whole filled document per character, literal text included,
  so a fill that makes the text after it less likely loses, and fills of different lengths compare
  on one footing.
- `SelfJudge`, for models with no twin: the diffusion model's own estimate, each span masked
  again and its tokens scored in one pass (the mean log-probability per token, summed over spans).

Scores are natural-log probabilities (higher is better) and only compare candidates of one document.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Protocol

import torch

from editor.canvas import Canvas
from editor.models.base import DiffusionModel, aligned_logits
from editor.sampler import Row, pad_rows

JUDGE_BATCH_TOKENS = 8192  # positions per forward pass of a judge
_log = logging.getLogger("editor.judging")


class Judge(Protocol):
    name: str

    def score(self, canvases: Sequence[Canvas], filled: Sequence[list[int]], texts: Sequence[str]) -> list[float]:
        """One score per candidate: canvas `canvases[i]` filled with ids `filled[i]`, rendering as `texts[i]`."""
        ...


class CausalJudge:
    """The log-probability of each filled document's text under a causal language model."""

    name = "ar-twin"

    def __init__(self, network: torch.nn.Module, tokenizer: object, bos: int | None, pad: int) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.bos = bos
        self.pad = pad

    def score(self, canvases: Sequence[Canvas], filled: Sequence[list[int]], texts: Sequence[str]) -> list[float]:
        """log P(text) per character: the whole log-probability favours the shortest fill of a range
        ("Thank you for ordering me.." over a fill that names the order), the mean per character
        compares texts of different lengths and tokenizations on one footing (docs/sampler.md)."""
        return [value / max(1, len(text)) for value, text in zip(self.text_log_probs(texts), texts, strict=True)]

    def text_log_probs(self, texts: Sequence[str]) -> list[float]:
        """log P(text) for each text (its first token given the bos, or unscored without one)."""
        encoded = [self._ids(text) for text in texts]
        scores = [0.0] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * len(encoded[order[stop]]) <= JUDGE_BATCH_TOKENS:
                stop += 1
            chunk = order[start:stop]
            for index, value in zip(chunk, self._log_probs([encoded[i] for i in chunk]), strict=True):
                scores[index] = value
            start = stop
        return scores

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        return ([self.bos] if self.bos is not None else []) + ids

    def _log_probs(self, rows: list[list[int]]) -> list[float]:
        width = max(len(row) for row in rows)
        device = next(self.network.parameters()).device
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            real[index, : len(row)] = True
        ids, real = ids.to(device), real.to(device)
        with torch.inference_mode():
            # Right padding is never seen from the left, so a causal pass needs no mask.
            logits = self.network(ids, causal=True)  # [B, W, V]
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, W-1, V] predicting ids[:, 1:]
            picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, W-1]
            totals = picked.masked_fill(~real[:, 1:], 0.0).sum(dim=1)  # [B]
        return [float(value) for value in totals.tolist()]


class SelfJudge:
    """The diffusion model's own estimate: each span masked again, its tokens' mean log-probability."""

    name = "self"

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model

    def score(self, canvases: Sequence[Canvas], filled: Sequence[list[int]], texts: Sequence[str]) -> list[float]:
        rows: list[Row] = []
        owners: list[tuple[int, list[int]]] = []  # (candidate, positions scored) per row
        mask = self.model.special.mask
        for number, (canvas, ids) in enumerate(zip(canvases, filled, strict=True)):
            for layout in canvas.spans:
                free = [layout.start + o for o in range(layout.length) if o not in layout.pinned]
                if not free:
                    continue
                masked = list(ids)
                for position in free:
                    masked[position] = mask
                rows.append(Row(ids=masked, pinned=[True] * len(masked), rules=[]))
                owners.append((number, free))
        scores = [0.0] * len(canvases)
        if not rows:
            return scores
        per_pass = max(1, JUDGE_BATCH_TOKENS // max(len(row.ids) for row in rows))
        for first in range(0, len(rows), per_pass):
            chunk = slice(first, first + per_pass)
            for (number, _), value in zip(
                owners[chunk], self._span_means(rows[chunk], owners[chunk], filled), strict=True
            ):
                scores[number] += value
        return scores

    def _span_means(
        self, rows: list[Row], owners: list[tuple[int, list[int]]], filled: Sequence[list[int]]
    ) -> list[float]:
        ids, _, attention = pad_rows(rows, self.model.special.pad, self.model.device)
        with torch.inference_mode():
            logits = aligned_logits(self.model, ids, attention)  # [B, L, V]
        means: list[float] = []
        for row, (number, positions) in enumerate(owners):
            at = torch.tensor(positions, device=logits.device)
            tokens = torch.tensor([filled[number][p] for p in positions], device=logits.device)
            log_probs = torch.log_softmax(logits[row, at].float(), dim=-1)  # [n, V]
            means.append(float(log_probs.gather(-1, tokens[:, None]).mean()))
        return means


_judges: weakref.WeakKeyDictionary[object, Judge] = weakref.WeakKeyDictionary()


def judge_for(model: DiffusionModel) -> Judge:
    """The model's judge, built once per model: the default model's autoregressive twin when its
    base weights are installed, else the model's own estimate."""
    if model not in _judges:
        twin = _autoregressive_twin(model)
        _judges[model] = twin if twin is not None else SelfJudge(model)
    return _judges[model]


def _autoregressive_twin(model: DiffusionModel) -> CausalJudge | None:
    if getattr(model, "name", None) != "default":
        return None
    return load_autoregressive_twin(model.device, getattr(model, "dtype", torch.float32))


def load_autoregressive_twin(device: torch.device, dtype: torch.dtype) -> CausalJudge | None:
    """The default model's base (SmolLM2-135M-Instruct) as a causal judge, or None when its weights
    are not installed. Also what `editor bench fills` measures every model's fills with."""
    from editor.models.adapter import adapter_special_ids, base_model_dir, read_adapter_config
    from editor.models.checkpoints import FAMILIES, load_checkpoint
    from editor.models.gguf import BASE_SHA256, find_base_gguf
    from editor.models.loading import bundled_path
    from editor.models.native import NativeDiffusionModel

    gguf = find_base_gguf()
    if gguf is None:
        return None
    adapter = bundled_path("default")
    directory = base_model_dir(adapter, gguf, BASE_SHA256)
    twin = load_checkpoint(FAMILIES["native"], directory, device=device, dtype=dtype, name="default-ar-twin")
    assert isinstance(twin, NativeDiffusionModel)
    twin.network.fuse_projections()
    special = adapter_special_ids(read_adapter_config(adapter), adapter)
    _log.info("judging with the autoregressive twin (%s)", directory)
    return CausalJudge(twin.network, twin.tokenizer, special.bos, special.pad)


__all__ = ["CausalJudge", "Judge", "SelfJudge", "judge_for", "load_autoregressive_twin"]
