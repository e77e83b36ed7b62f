"""Held-out evaluation of a model: masked-token accuracy and negative log-likelihood at several
mask rates against a unigram baseline, plus example fills of everyday documents."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from editor.filling import fill_documents
from editor.models.base import DiffusionModel, aligned_logits
from editor.options import SamplerOptions
from editor.parser import parse_document
from editor.sampler import Row, pad_rows
from editor.training.data import TokenizedCorpus

MASK_RATES = (0.15, 0.5, 0.9)

EXAMPLE_DOCUMENTS: dict[str, str] = {
    "letter": (
        "Dear [MASK 3 name=greeting],\n\nThank you for your letter of [MASK 4 name=date]. I am sorry to hear that "
        '[MASK 10 name=problem]. We will [MASK 8 must="refund" name=action] as soon as possible.\n\n'
        "Kind regards,\nThe [MASK 2 name=team] team"
    ),
    "product": (
        "The [MASK 4 name=product] is a small and [MASK 2 as=word] device for your home. It comes with "
        "[MASK 8 name=features], and the battery lasts [MASK 2 as=int] hours. [MASK 12 name=pitch]"
    ),
    "report": (
        "Summary of the week: the team fixed [MASK 2 as=int] bugs in the [MASK 3 name=component]. "
        "The main problem was [MASK 10 name=cause]. Next week we will [MASK 10 name=plan]. "
        'Status: [MASK choice="on track|late|blocked" name=status].'
    ),
    "france": "The capital of France is [MASK 2].",
}


@dataclass(frozen=True)
class RateResult:
    rate: float
    masked_tokens: int
    accuracy: float
    nll: float
    unigram_accuracy: float
    unigram_nll: float
    masked_chars: int = 0

    @property
    def bits_per_char(self) -> float:
        """NLL of the masked tokens in bits over the characters they spell: comparable across
        tokenizers, where NLL per token is not."""
        return self.nll * self.masked_tokens / math.log(2) / max(self.masked_chars, 1)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins, strict=True)}


def token_char_counts(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Characters each token id contributes to decoded text [V]. For byte-level BPE, a token's
    bytes that start a UTF-8 character (so a character split over tokens counts once); otherwise
    the length of the token decoded on its own."""
    decoder = _byte_decoder()
    counts = np.zeros(vocab_size, dtype=np.int64)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    special = set(tokenizer.all_special_ids)
    for index, token in enumerate(tokens):
        if token is None or index in special:
            continue
        if all(ch in decoder for ch in token):
            counts[index] = sum(1 for ch in token if decoder[ch] & 0xC0 != 0x80)
        else:
            counts[index] = len(tokenizer.decode([index]))
    return counts


def unigram_log_probs(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one smoothed log-probabilities [V] of each token id."""
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def paragraph_rows(corpus: TokenizedCorpus, bos: int, max_len: int) -> list[list[int]]:
    """Each held-out paragraph (cut to `max_len`) as a row starting with the beginning-of-text id."""
    ends = np.append(corpus.starts[1:], len(corpus.tokens))
    return [
        [bos, *corpus.tokens[s:e][: max_len - 1].astype(np.int64).tolist()]
        for s, e in zip(corpus.starts, ends, strict=True)
    ]


def window_rows(corpus: TokenizedCorpus, bos: int, max_len: int) -> list[list[int]]:
    """The held-out split read as one text and cut into consecutive windows of `max_len - 1` tokens,
    each after the beginning-of-text id (as training rows are; paragraphs give each token less context)."""
    tokens = corpus.tokens.astype(np.int64)
    width = max_len - 1
    return [[bos, *tokens[start : start + width].tolist()] for start in range(0, len(tokens) - width + 1, width)]


ROW_KINDS = {"window": window_rows, "paragraph": paragraph_rows}
ROW_DESCRIPTIONS = {
    "window": "the split is read as one text and cut into consecutive 256-token windows, each one row after the"
    " beginning-of-text id",
    "paragraph": "each held-out paragraph is one row (beginning-of-text id + up to 256 tokens)",
}


def held_out_rows(corpus: TokenizedCorpus, model: DiffusionModel, kind: str, max_len: int = 257) -> list[list[int]]:
    """Evaluation rows of `kind` ('window' or 'paragraph') for `model`'s beginning-of-text id."""
    bos = model.special.bos if model.special.bos is not None else model.special.pad
    return ROW_KINDS[kind](corpus, bos, max_len)


def evaluate_rate(
    model: DiffusionModel,
    rows: Sequence[list[int]],
    rate: float,
    unigram: np.ndarray,
    *,
    seed: int = 0,
    batch_size: int = 32,
    char_counts: np.ndarray | None = None,
) -> RateResult:
    """Mask each non-BOS token with probability `rate`, predict all masks in one pass (argmax)."""
    rng = np.random.default_rng(seed)
    chars = token_char_counts(model.tokenizer, model.vocab_size) if char_counts is None else char_counts
    correct = total = masked_chars = 0
    nll = uni_correct = uni_nll = 0.0
    best_unigram = int(unigram.argmax())
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        masks = [np.concatenate([[False], rng.random(len(r) - 1) < rate]) for r in batch]
        noisy = [
            [model.special.mask if m else t for t, m in zip(r, mask, strict=True)]
            for r, mask in zip(batch, masks, strict=True)
        ]
        ids, _, attention = pad_rows([Row(n, [True] * len(n), []) for n in noisy], model.special.pad, model.device)
        with torch.inference_mode():
            log_probs = torch.log_softmax(aligned_logits(model, ids, attention).float(), dim=-1)  # [B, L, V]
        for row_number, (row, mask) in enumerate(zip(batch, masks, strict=True)):
            positions = np.flatnonzero(mask)
            if positions.size == 0:
                continue
            targets = torch.tensor([row[p] for p in positions])
            scores = log_probs[row_number, torch.from_numpy(positions)]  # [m, V]
            correct += int((scores.argmax(-1).cpu() == targets).sum())
            nll -= float(scores.gather(-1, targets[:, None].to(scores.device)).sum())
            uni_correct += float((targets == best_unigram).sum())
            uni_nll -= float(unigram[targets.numpy()].sum())
            total += positions.size
            masked_chars += int(chars[targets.numpy()].sum())
    return RateResult(
        rate, total, correct / total, nll / total, uni_correct / total, uni_nll / total, masked_chars=masked_chars
    )


def example_fills(model: DiffusionModel, options: SamplerOptions) -> dict[str, str]:
    documents = [parse_document(text) for text in EXAMPLE_DOCUMENTS.values()]
    results = fill_documents(model, documents, options)
    return {name: result.text for name, result in zip(EXAMPLE_DOCUMENTS, results, strict=True)}


def format_report(
    model_name: str,
    results: Iterable[RateResult],
    examples: dict[str, str],
    options: SamplerOptions,
    unigram_source: str,
    rows_kind: str = "window",
) -> str:
    lines = [
        f"# Evaluation of `{model_name}`",
        "",
        f"Rows: {ROW_DESCRIPTIONS[rows_kind]}. Each token is masked independently at the rate shown",
        "(seed 0); all masks predicted in one forward pass (argmax). Bits per character = the masked tokens'",
        "NLL in bits over the characters they spell (comparable across tokenizers).",
        f"Unigram baseline: add-one smoothed token frequencies of {unigram_source}.",
        "",
        "| mask rate | masked tokens | accuracy | NLL (nats/token) | bits/char | unigram accuracy | unigram NLL |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.rate:.2f} | {r.masked_tokens} | {r.accuracy:.1%} | {r.nll:.3f} | {r.bits_per_char:.3f} "
            f"| {r.unigram_accuracy:.1%} | {r.unigram_nll:.3f} |"
        )
    lines += ["", f"## Example fills ({options.model_dump(exclude_defaults=True) or 'default options'})", ""]
    for name, text in examples.items():
        lines += [
            f"### {name}",
            "",
            "Document:",
            "",
            "```",
            EXAMPLE_DOCUMENTS[name],
            "```",
            "",
            "Fill:",
            "",
            "```",
            text,
            "```",
            "",
        ]
    return "\n".join(lines)


def evaluate(
    model: DiffusionModel,
    valid: TokenizedCorpus,
    unigram_tokens: np.ndarray,
    *,
    unigram_source: str,
    options: SamplerOptions,
    rows_kind: str = "window",
) -> str:
    rows = held_out_rows(valid, model, rows_kind)
    unigram = unigram_log_probs(unigram_tokens, model.vocab_size)
    results = [evaluate_rate(model, rows, rate, unigram) for rate in MASK_RATES]
    return format_report(model.name, results, example_fills(model, options), options, unigram_source, rows_kind)


@dataclass
class ModelReport:
    """One model's column in a side-by-side evaluation."""

    spec: str
    name: str
    parameters: int
    load_s: float
    forward_ms: float
    results: list[RateResult]
    examples: dict[str, str]


def forward_ms(model: DiffusionModel, length: int = 256, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass over one row of `length` tokens."""
    import time

    ids = torch.full((1, length), model.special.mask, dtype=torch.long)
    ids[0, 0] = model.special.bos if model.special.bos is not None else model.special.pad
    attention = torch.ones(1, length, dtype=torch.bool)
    timings = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model.forward_logits(ids, attention)
        timings.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings[1:]))  # the first call warms up


def format_comparison(
    reports: Sequence[ModelReport], options: SamplerOptions, split: str, device: str, rows_kind: str = "window"
) -> str:
    """Markdown: one column per model; accuracy, NLL and bits/char per rate; timings; fills."""
    names = [f"`{r.spec}`" for r in reports]
    lines = [
        f"# Side-by-side evaluation on `{split}`",
        "",
        f"Rows: {ROW_DESCRIPTIONS[rows_kind]}. Each token is masked",
        "independently at the rate shown (seed 0); all masks are predicted in one forward pass (argmax).",
        "Bits per character = the masked tokens' NLL in bits over the characters those tokens spell, which",
        "compares models with different tokenizers. Accuracy and NLL are per token of each model's own",
        f"tokenizer. Quality measured on {device}.",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in reports) + " |",
        "| parameters | " + " | ".join(f"{r.parameters / 1e6:.1f}M" for r in reports) + " |",
    ]
    rates = [result.rate for result in reports[0].results]
    for index, rate in enumerate(rates):
        lines.append(
            f"| accuracy @{rate:.2f} | " + " | ".join(f"{r.results[index].accuracy:.1%}" for r in reports) + " |"
        )
        lines.append(
            f"| NLL nats/token @{rate:.2f} | " + " | ".join(f"{r.results[index].nll:.3f}" for r in reports) + " |"
        )
        lines.append(
            f"| **bits/char @{rate:.2f}** | "
            + " | ".join(f"**{r.results[index].bits_per_char:.3f}**" for r in reports)
            + " |"
        )
    lines.append("| load time (s) | " + " | ".join(f"{r.load_s:.1f}" for r in reports) + " |")
    lines.append("| ms per forward, 256 tokens | " + " | ".join(f"{r.forward_ms:.0f}" for r in reports) + " |")
    lines += ["", f"## Example fills ({options.model_dump(exclude_defaults=True) or 'default options'})", ""]
    for example in EXAMPLE_DOCUMENTS:
        lines += [f"### {example}", "", "```", EXAMPLE_DOCUMENTS[example], "```", ""]
        for report in reports:
            lines += [f"`{report.spec}`:", "", "```", report.examples[example], "```", ""]
    return "\n".join(lines)


__all__ = [
    "EXAMPLE_DOCUMENTS",
    "MASK_RATES",
    "ROW_KINDS",
    "evaluate",
    "evaluate_rate",
    "held_out_rows",
    "paragraph_rows",
    "unigram_log_probs",
    "window_rows",
]
