"""The rows the training batches are made of: an infill row looks like a document being filled
(clean text, a few masked spans, some ending in end tokens)."""

from __future__ import annotations

import numpy as np

from editor.training.data import BatchSampler, BatchSpec, TokenizedCorpus

BOS, PAD, MASK = 1, 0, 2


def corpus() -> TokenizedCorpus:
    rng = np.random.default_rng(5)
    lengths = rng.integers(20, 300, size=60)
    tokens = rng.integers(10, 500, size=int(lengths.sum())).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return TokenizedCorpus(tokens=tokens, starts=starts)


def sampler(spec: BatchSpec, seed: int = 0) -> BatchSampler:
    return BatchSampler(corpus(), spec, bos_id=BOS, pad_id=PAD, mask_id=MASK, seed=seed)


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_infill_rows_mask_only_spans_in_clean_text_and_some_spans_end_in_end_tokens() -> None:
    spec = BatchSpec(seq_len=128, batch_size=64, infill_share=1.0)
    batch = sampler(spec).sample()
    texts = corpus().tokens
    padded_spans = 0
    for row in range(spec.batch_size):
        real = int(batch.attention_mask[row].sum())
        targets = batch.targets[row, :real].numpy()
        masked = batch.loss_mask[row, :real].numpy()
        inputs = batch.input_ids[row, :real].numpy()
        assert targets[0] == BOS and not masked[0]
        assert masked.any()
        # Outside the masked positions the input is the clean text.
        assert (inputs[~masked] == targets[~masked]).all() and (inputs[masked] == MASK).all()
        # With the pad runs taken out, the text is one stretch of the corpus (nothing dropped mid-row).
        text = targets[1:][targets[1:] != PAD]
        found = np.flatnonzero(texts == text[0])
        assert any((texts[s : s + len(text)] == text).all() for s in found)
        pads = np.flatnonzero(targets == PAD)
        padded_spans += len(runs(targets == PAD))
        assert len(pads) == 0 or pads.min() > 1
    assert padded_spans > spec.batch_size // 4  # about half of the spans end in end tokens


def test_infill_rows_cover_short_and_long_spans() -> None:
    spec = BatchSpec(seq_len=256, batch_size=256, infill_share=1.0, eps=0.999)  # t ~ 1: whole spans masked
    batch = sampler(spec, seed=3).sample()
    spans = [runs(row) for row in batch.loss_mask.numpy()]
    assert all(1 <= len(row) <= 3 for row in spans)  # one to three holes, clean text between them
    lengths = [b - a for row in spans for a, b in row]
    assert min(lengths) <= 2 and max(lengths) >= 40
