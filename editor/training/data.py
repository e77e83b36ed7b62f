"""Corpus → token arrays, and batches for masked-diffusion training.

The corpus is one paragraph per line. It is tokenized once into a flat uint16 array (each paragraph
followed by a newline token) plus the offsets where paragraphs start, so batches can begin at a
paragraph start the way documents do.
"""

from __future__ import annotations

import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def read_paragraphs(path: Path, limit: int | None = None) -> Iterator[str]:
    """The corpus's lines (one paragraph each), from a plain or an .xz file."""
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if limit is not None and number >= limit:
                return
            yield line.rstrip("\n")


@dataclass(frozen=True)
class TokenizedCorpus:
    tokens: np.ndarray  # [T] uint16
    starts: np.ndarray  # [P] int64, offset of each paragraph in `tokens`

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, starts=self.starts)

    @classmethod
    def load(cls, path: Path) -> TokenizedCorpus:
        data = np.load(path)
        return cls(tokens=data["tokens"], starts=data["starts"])


def tokenize_corpus(text_path: Path, tokenizer: PreTrainedTokenizerBase, chunk: int = 10_000) -> TokenizedCorpus:
    lines = list(read_paragraphs(text_path))
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    for first in range(0, len(lines), chunk):
        batch = [line + "\n" for line in lines[first : first + chunk]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.uint16))
            lengths.append(len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return TokenizedCorpus(tokens=np.concatenate(pieces), starts=starts)


@dataclass(frozen=True)
class BatchSpec:
    seq_len: int = 256
    batch_size: int = 256
    whole_paragraph_share: float = 0.5  # rows that end at a paragraph boundary (then padded)
    span_share: float = 0.3  # rows masked as contiguous spans, the way documents are
    padded_span_share: float = 0.2  # rows whose span is followed by pad tokens (teaches `[MASK a-b]`)
    infill_share: float = 0.0  # rows shaped like a document being filled (`BatchSampler._infill_row`)
    max_pad_run: int = 24
    max_infill_span: int = 60
    eps: float = 1e-3


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long, noisy canvas
    targets: torch.Tensor  # [B, L] long, clean tokens
    loss_mask: torch.Tensor  # [B, L] bool, masked and not padding
    weights: torch.Tensor  # [B, L] float, 1/t for each masked position
    attention_mask: torch.Tensor  # [B, L] bool, False on padding

    def pin_memory(self) -> Batch:
        return Batch(**{name: value.pin_memory() for name, value in vars(self).items()})


class BatchSampler:
    """Draws training rows: each row gets a noise level t ~ U(eps, 1) and masks each token with
    probability t (the masked-diffusion objective), or masks contiguous spans of total share t."""

    def __init__(self, corpus: TokenizedCorpus, spec: BatchSpec, *, bos_id: int, pad_id: int, mask_id: int, seed: int):
        self.corpus = corpus
        self.spec = spec
        self.bos_id, self.pad_id, self.mask_id = bos_id, pad_id, mask_id
        self.rng = np.random.default_rng(seed)
        self.ends = np.append(corpus.starts[1:], len(corpus.tokens))

    def _row_tokens(self) -> tuple[np.ndarray, int]:
        """One row: BOS then text from a paragraph start; returns tokens [L] and the real length."""
        length = self.spec.seq_len
        paragraph = int(self.rng.integers(len(self.corpus.starts)))
        start = int(self.corpus.starts[paragraph])
        limit = min(start + length - 1, len(self.corpus.tokens))
        end = limit
        if self.rng.random() < self.spec.whole_paragraph_share:
            # Whole paragraphs that fit, so the model also sees text that simply ends.
            last_fitting = int(np.searchsorted(self.ends, limit, side="right")) - 1
            if last_fitting >= paragraph:
                end = int(self.ends[last_fitting])
        text = self.corpus.tokens[start:end].astype(np.int64)
        row = np.full(length, self.pad_id, dtype=np.int64)
        row[0] = self.bos_id
        row[1 : 1 + len(text)] = text
        return row, 1 + len(text)

    def _insert_pad_run(self, row: np.ndarray, real: int) -> tuple[np.ndarray, int, tuple[int, int]]:
        """Put a run of pad tokens after a short span, as a finished `[MASK a-b]` span looks."""
        span_start = int(self.rng.integers(1, max(real - 1, 2)))
        span_len = int(self.rng.integers(0, 25))
        pads = int(self.rng.integers(1, self.spec.max_pad_run + 1))
        cut = min(span_start + span_len, real)
        shifted = np.concatenate([row[:cut], np.full(pads, self.pad_id), row[cut:real]])[: self.spec.seq_len]
        out = np.full(self.spec.seq_len, self.pad_id, dtype=np.int64)
        out[: len(shifted)] = shifted
        return out, min(real + pads, self.spec.seq_len), (span_start, min(cut + pads, self.spec.seq_len))

    def _span_mask(self, real: int, rate: float) -> np.ndarray:
        """Contiguous spans (mean length ~8) covering about `rate` of the row."""
        mask = np.zeros(real, dtype=bool)
        target = round(rate * (real - 1))
        while mask[1:real].sum() < target:
            length = int(self.rng.geometric(1 / 8))
            start = int(self.rng.integers(1, real))
            mask[start : start + length] = True
        return mask

    def _infill_row(self, row: np.ndarray, real: int) -> tuple[np.ndarray, int, np.ndarray]:
        """A row as the sampler sees a document: clean text around 1-3 spans of 1 to
        `max_infill_span` tokens (lengths log-uniform, as short fields and long paragraphs both
        occur), half of them followed by a run of pad tokens as a `[MASK a-b]` span that ended early
        holds; only the spans are masked, each position with the row's probability t, so the
        model learns every stage of a fill from the first step on. Returns the row, its real
        length and the spans' extent [L] bool."""
        spec = self.spec
        count = int(self.rng.integers(1, 4))
        starts = np.sort(self.rng.choice(np.arange(1, real), size=min(count, real - 1), replace=False))  # real > 1
        pieces: list[np.ndarray] = []
        extent: list[np.ndarray] = []
        cursor = 0
        for start in starts:
            start = max(int(start), cursor)
            if start >= real:
                break
            length = int(np.exp(self.rng.uniform(0.0, np.log(spec.max_infill_span + 1))))
            end = min(start + max(length, 1), real)
            pads = int(self.rng.integers(1, spec.max_pad_run + 1)) if self.rng.random() < 0.5 else 0
            pieces += [row[cursor:start], row[start:end], np.full(pads, self.pad_id, dtype=np.int64)]
            extent += [np.zeros(start - cursor, dtype=bool), np.ones(end - start + pads, dtype=bool)]
            cursor = end
        pieces.append(row[cursor:real])
        extent.append(np.zeros(real - cursor, dtype=bool))
        text, spans = np.concatenate(pieces)[: spec.seq_len], np.concatenate(extent)[: spec.seq_len]
        out = np.full(spec.seq_len, self.pad_id, dtype=np.int64)
        out[: len(text)] = text
        return out, len(text), spans

    def sample(self) -> Batch:
        spec = self.spec
        rows, targets, loss_masks, weights, attention = [], [], [], [], []
        for _ in range(spec.batch_size):
            row, real = self._row_tokens()
            forced: tuple[int, int] | None = None
            # Drawn only when asked for, so runs without infill rows repeat the earlier runs exactly.
            if spec.infill_share > 0 and real > 1 and self.rng.random() < spec.infill_share:
                row, real, spans = self._infill_row(row, real)
                t = float(self.rng.uniform(spec.eps, 1.0))
                masked = spans[:real] & (self.rng.random(real) < t)
                if not masked.any():  # at least one position to learn from
                    masked[int(self.rng.choice(np.flatnonzero(spans[:real])))] = True
            else:
                if self.rng.random() < spec.padded_span_share:
                    row, real, forced = self._insert_pad_run(row, real)
                t = float(self.rng.uniform(spec.eps, 1.0))
                if forced is None and self.rng.random() < spec.span_share:
                    masked = self._span_mask(real, t)
                else:
                    masked = self.rng.random(real) < t
                if forced is not None:
                    masked[forced[0] : forced[1]] = True
            masked[0] = False  # BOS stays, as at inference
            full_mask = np.zeros(spec.seq_len, dtype=bool)
            full_mask[:real] = masked
            weight = np.full(spec.seq_len, 1.0 / t, dtype=np.float32)
            if forced is not None:
                # A wholly masked span is the t = 1 case: weight 1, not the row's 1/t.
                weight[forced[0] : forced[1]] = 1.0
            rows.append(np.where(full_mask, self.mask_id, row))
            targets.append(row)
            loss_masks.append(full_mask)
            weights.append(weight)
            attention.append(np.arange(spec.seq_len) < real)
        return Batch(
            input_ids=torch.from_numpy(np.stack(rows)),
            targets=torch.from_numpy(np.stack(targets)),
            loss_mask=torch.from_numpy(np.stack(loss_masks)),
            weights=torch.from_numpy(np.stack(weights)),
            attention_mask=torch.from_numpy(np.stack(attention)),
        )
