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
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch

from editor.canvas import Canvas
from editor.models.base import DiffusionModel, aligned_logits
from editor.sampler import Row, pad_rows

JUDGE_BATCH_TOKENS = 8192  # positions per forward pass of a judge
RECENT_TEXTS = 256  # scored texts a causal judge keeps (a few fills' candidates)
_log = logging.getLogger("editor.judging")


class Judge(Protocol):
    name: str

    def score(self, canvases: Sequence[Canvas], filled: Sequence[list[int]], texts: Sequence[str]) -> list[float]:
        """One score per candidate: canvas `canvases[i]` filled with ids `filled[i]`, rendering as `texts[i]`."""
        ...

    def span_scores(
        self,
        canvases: Sequence[Canvas],
        filled: Sequence[list[int]],
        texts: Sequence[str],
        segments: Sequence[Sequence[tuple[int, int]]],
    ) -> list[list[float]]:
        """One score per span of each candidate (`segments[i]`: each span's character range in
        `texts[i]`, from its fill to the next fill), so spans can be chosen from different candidates."""
        ...


class CausalJudge:
    """The log-probability of each filled document's text under a causal language model."""

    name = "ar-twin"

    def __init__(self, network: torch.nn.Module, tokenizer: object, bos: int | None, pad: int) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.bos = bos
        self.pad = pad
        # The last texts scored: a fill's documents are scored whole and then by span, and its
        # candidates often repeat one another (greedy rows), so each distinct text runs once.
        self._recent: OrderedDict[str, tuple[list[float], list[tuple[int, int]]]] = OrderedDict()

    def score(self, canvases: Sequence[Canvas], filled: Sequence[list[int]], texts: Sequence[str]) -> list[float]:
        """log P(text) per character: the whole log-probability favours the shortest fill of a range
        ("Thank you for ordering me.." over a fill that names the order), the mean per character
        compares texts of different lengths and tokenizations on one footing (docs/sampler.md)."""
        return [value / max(1, len(text)) for value, text in zip(self.text_log_probs(texts), texts, strict=True)]

    def span_scores(
        self,
        canvases: Sequence[Canvas],
        filled: Sequence[list[int]],
        texts: Sequence[str],
        segments: Sequence[Sequence[tuple[int, int]]],
    ) -> list[list[float]]:
        """log P per character of each segment (a fill and the literal text up to the next fill),
        given everything before it: a span's fill is judged with the seam it makes with what follows."""
        scored = self._token_log_probs(texts)
        out: list[list[float]] = []
        for (log_probs, offsets), ranges in zip(scored, segments, strict=True):
            out.append(
                [
                    sum(lp for lp, (at, _) in zip(log_probs, offsets, strict=True) if start <= at < end)
                    / max(1, end - start)
                    for start, end in ranges
                ]
            )
        return out

    def text_log_probs(self, texts: Sequence[str]) -> list[float]:
        """log P(text) for each text (its first token given the bos, or unscored without one)."""
        return [sum(log_probs) for log_probs, _ in self._token_log_probs(texts)]

    def _token_log_probs(self, texts: Sequence[str]) -> list[tuple[list[float], list[tuple[int, int]]]]:
        """Each text's tokens' log-probabilities, with the character range each token covers."""
        found = {text: self._recent[text] for text in texts if text in self._recent}
        missing = list(dict.fromkeys(text for text in texts if text not in found))
        encoded = [self._encode(text) for text in missing]
        order = sorted(range(len(missing)), key=lambda i: len(encoded[i][0]))
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * len(encoded[order[stop]][0]) <= JUDGE_BATCH_TOKENS:
                stop += 1
            chunk = order[start:stop]
            for index, values in zip(chunk, self._log_probs([encoded[i][0] for i in chunk]), strict=True):
                offsets = encoded[index][1]
                unscored = [0.0] * (len(offsets) - len(values))  # the first token, when there is no bos
                found[missing[index]] = (unscored + values, offsets)
                self._remember(missing[index], found[missing[index]])
            start = stop
        return [found[text] for text in texts]

    def _remember(self, text: str, scored: tuple[list[float], list[tuple[int, int]]]) -> None:
        self._recent[text] = scored
        while len(self._recent) > RECENT_TEXTS:
            self._recent.popitem(last=False)

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids (after the bos, if any) and each text token's character range."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
        ids: list[int] = list(encoding["input_ids"])
        offsets = [(int(a), int(b)) for a, b in encoding["offset_mapping"]]
        return ([self.bos] if self.bos is not None else []) + ids, offsets

    def _log_probs(self, rows: list[list[int]]) -> list[list[float]]:
        """Per row, the log-probability of each token after the first."""
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
        values = picked.tolist()
        return [values[index][: len(row) - 1] for index, row in enumerate(rows)]


class SelfJudge:
    """The diffusion model's own estimate: each span masked again, its tokens' mean log-probability."""

    name = "self"

    def __init__(self, model: DiffusionModel) -> None:
        self.model = model

    def score(self, canvases: Sequence[Canvas], filled: Sequence[list[int]], texts: Sequence[str]) -> list[float]:
        return [sum(spans) for spans in self.span_scores(canvases, filled, texts, [[] for _ in texts])]

    def span_scores(
        self,
        canvases: Sequence[Canvas],
        filled: Sequence[list[int]],
        texts: Sequence[str],
        segments: Sequence[Sequence[tuple[int, int]]],
    ) -> list[list[float]]:
        """Each span's mean token log-probability with the span masked again (0 for a span with
        nothing free to score); `segments` is not needed: the spans are the canvas's."""
        rows: list[Row] = []
        owners: list[tuple[int, int, list[int]]] = []  # (candidate, span, positions scored) per row
        mask = self.model.special.mask
        for number, (canvas, ids) in enumerate(zip(canvases, filled, strict=True)):
            for span, layout in enumerate(canvas.spans):
                free = [layout.start + o for o in range(layout.length) if o not in layout.pinned]
                if not free:
                    continue
                masked = list(ids)
                for position in free:
                    masked[position] = mask
                rows.append(Row(ids=masked, pinned=[True] * len(masked), rules=[]))
                owners.append((number, span, free))
        scores = [[0.0] * len(canvas.spans) for canvas in canvases]
        if not rows:
            return scores
        per_pass = max(1, JUDGE_BATCH_TOKENS // max(len(row.ids) for row in rows))
        for first in range(0, len(rows), per_pass):
            chunk = slice(first, first + per_pass)
            for (number, span, _), value in zip(
                owners[chunk], self._span_means(rows[chunk], owners[chunk], filled), strict=True
            ):
                scores[number][span] = value
        return scores

    def _span_means(
        self, rows: list[Row], owners: list[tuple[int, int, list[int]]], filled: Sequence[list[int]]
    ) -> list[float]:
        ids, _, attention = pad_rows(rows, self.model.special.pad, self.model.device)
        with torch.inference_mode():
            logits = aligned_logits(self.model, ids, attention)  # [B, L, V]
        means: list[float] = []
        for row, (number, _, positions) in enumerate(owners):
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
