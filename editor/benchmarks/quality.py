"""The quality guard of the fast engine (`editor bench engine-quality`): how often a fast setting
fills a document exactly as its uncached counterpart does (one token per step and confidence, or
the same schedule uncached), and the masked-token NLL of each: every filled token's -log p given
the rest of the filled canvas with that one position masked (a pseudo-likelihood; lower = the
model finds the fill more natural).

Twelve fixed short documents by default; `--valid FILE --documents N` adds N documents cut from
held-out paragraphs (two spans of 2-8 words each masked at their own token length), because twelve
are too few to tell settings apart."""

from __future__ import annotations

import json
import random
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

DOCUMENTS = (
    "Dear [MASK 4], thank you for your order. Your refund will reach you on [MASK 2].",
    "The cat sat on the [MASK 6] and looked at the garden.",
    "We shipped the parcel to your [MASK 5] yesterday. Kind regards, the [MASK 3] team.",
    "Please reply to this letter before the end of the [MASK 4].",
    "The meeting starts at [MASK 3] and ends at noon. [MASK 10]",
    "She wrote a short story about a [MASK 8] and a boat.",
    "Weekly report. This week the team fixed [MASK 2] bugs in the [MASK 3]. The main problem was [MASK 12].",
    "Hello world! This is a test of the [MASK 6].",
    "Prices rose by [MASK 4] in the last quarter, and the [MASK 8] said it would not last.",
    "Our office is closed on [MASK 3] and on public holidays. Call us at any time if you have [MASK 6].",
    "The train to London leaves from [MASK 4]. [MASK 12] Thanks to everyone who helped.",
    "A small bird sang in the tree near the [MASK 3]. The children [MASK 10] outside.",
)

SETTINGS: dict[str, dict[str, Any]] = {
    "reference": {"cache": False},
    "cached": {"cache": True, "cache_refresh_every": None},
    "cached/2": {"cache": True, "cache_refresh_every": 2},
    "cached/4 (default)": {"cache": True, "cache_refresh_every": 4},
    "cached/8": {"cache": True, "cache_refresh_every": 8},
    "threshold": {"schedule": "threshold", "cache": False},
    "threshold+cached": {"schedule": "threshold", "cache": True, "cache_refresh_every": None},
    "factor+cached": {"schedule": "factor", "cache": True, "cache_refresh_every": None},
    "4/step": {"steps_per_token": 4, "cache": False},
    "4/step+cached": {"steps_per_token": 4, "cache": True, "cache_refresh_every": None},
    # Block decoding (blocks of 4 here: the documents' spans are short) without the cache, and with
    # Fast-dLLM's dual cache (later blocks keep their keys/values until their block starts).
    "blocks": {"schedule": "blocks", "block_length": 4, "cache": False},
    "blocks+cached": {"schedule": "blocks", "block_length": 4, "cache": True, "cache_refresh_every": None},
    # The default block length: one block holds a short document's every mask.
    "blocks/32+cached": {"schedule": "blocks", "cache": True, "cache_refresh_every": None},
}
# The uncached setting a fast one is compared with (same text); the rest: "reference".
COMPARED_WITH = {"blocks+cached": "blocks"}


def held_out_documents(paragraphs: list[str], count: int, tokenizer: Any, seed: int = 0) -> list[str]:
    """`count` documents from paragraphs of 20-80 words (no brackets, which the document language
    reads): two non-overlapping spans of 2-8 words each become `[MASK n]`, n the span's token count."""
    chooser = random.Random(seed)
    usable = [p for p in paragraphs if 20 <= len(p.split()) <= 80 and "[" not in p and "]" not in p]
    documents = []
    for paragraph in chooser.sample(usable, min(count, len(usable))):
        words = paragraph.split()
        half = len(words) // 2
        spans = []
        for low, high in ((1, half), (half + 1, len(words))):  # one span in each half
            length = chooser.randint(2, min(8, high - low))
            start = chooser.randint(low, high - length)
            spans.append((start, start + length))
        pieces, at = [], 0
        for start, end in spans:
            pieces.append(" ".join(words[at:start]))
            tokens = len(tokenizer.encode(" " + " ".join(words[start:end]), add_special_tokens=False))
            pieces.append(f"[MASK {tokens}]")
            at = end
        pieces.append(" ".join(words[at:]))
        documents.append(" ".join(piece for piece in pieces if piece))
    return documents


def masked_nll(model: Any, ids: list[int], positions: list[int]) -> float:
    """Mean -log p(token at p | canvas with p masked), over `positions`."""
    import torch

    from editor.models.base import aligned_logits

    rows = torch.tensor([ids] * len(positions), device=model.device)
    for row, position in enumerate(positions):
        rows[row, position] = model.special.mask
    attention = torch.ones_like(rows, dtype=torch.bool)
    with torch.inference_mode():
        log_probs = torch.log_softmax(aligned_logits(model, rows, attention).float(), dim=-1)
    values = [-float(log_probs[row, p, ids[p]]) for row, p in enumerate(positions)]
    return statistics.fmean(values)


@click.command("engine-quality")
@click.option("--model", "model_spec", default=None, help="model directory or id [default: the default model]")
@click.option("--dtype", "dtype_name", default=None, help="float32, bfloat16 [default: the CPU's default]")
@click.option("--valid", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="held-out split")
@click.option("--documents", default=0, type=click.IntRange(min=0), help="documents cut from --valid")
@click.option("--setting", "chosen", multiple=True, type=click.Choice(list(SETTINGS)), help="only these [default: all]")
@click.option("--threads", default=1, help="torch CPU threads")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def engine_quality(
    model_spec: str | None,
    dtype_name: str | None,
    valid: Path | None,
    documents: int,
    chosen: tuple[str, ...],
    threads: int,
    json_path: str | None,
) -> None:
    """Same-text rate and masked-token NLL of fast settings against one-token-per-step decoding."""
    import torch

    from editor.filling import prepare_canvas, vocabulary_rules
    from editor.models.loading import load_model, model_dtype_text
    from editor.options import SamplerOptions
    from editor.parser import parse_document
    from editor.sampler import Row, sample
    from editor.training.data import read_paragraphs

    if documents and valid is None:
        raise click.UsageError("--documents needs --valid (the held-out split to cut them from)")
    torch.set_num_threads(threads)
    model = load_model(model_spec, device="cpu", dtype=getattr(torch, dtype_name) if dtype_name else None)
    texts = list(DOCUMENTS)
    if documents and valid is not None:
        texts += held_out_documents(list(read_paragraphs(valid)), documents, model.tokenizer)
    canvases = [prepare_canvas(model, parse_document(text)) for text in texts]
    click.echo(f"{model.name} ({model_dtype_text(model)}), {len(canvases)} documents")
    report: dict[str, dict[str, Any]] = {}
    texts_of: dict[str, list[str]] = {}
    settings = {name: SETTINGS[name] for name in chosen} if chosen else SETTINGS
    for name, setting in settings.items():
        values = dict(setting)
        per_step = values.pop("steps_per_token", None)
        fills, nlls, steps = [], [], []
        for canvas in canvases:
            masks = len(canvas.masked_positions)
            options = SamplerOptions(seed=0, steps=max(1, masks // per_step) if per_step else None, **values)
            output = sample(model, [Row(canvas.ids, canvas.pinned, canvas.rules)], options, vocabulary_rules(model))
            ids = output.ids[0]
            fills.append(str(model.tokenizer.decode(ids)))
            steps.append(output.steps / masks)
            nlls.append(masked_nll(model, ids, list(canvas.masked_positions)))
        texts_of[name] = fills
        compared_with = COMPARED_WITH.get(name, "reference")
        baseline = texts_of.get(compared_with)
        same = None if baseline is None else sum(a == b for a, b in zip(fills, baseline, strict=True)) / len(fills)
        report[name] = {
            "compared_with": compared_with,
            "same_text": None if same is None else round(same, 3),
            "masked_token_nll": round(statistics.fmean(nlls), 4),
            "steps_per_token": round(statistics.fmean(steps), 3),
        }
        figures = report[name]
        same_text = "(not run)" if same is None else f"{same:6.1%}"
        click.echo(
            f"{name:18} same text as {compared_with}: {same_text}  NLL {figures['masked_token_nll']:.4f}  "
            f"steps/token {figures['steps_per_token']:.3f}"
        )
    if json_path:
        payload = {
            "benchmark": "engine-quality",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model.name,
            "dtype": model_dtype_text(model),
            "documents": len(canvases),
            "held_out": None if not documents else {"valid": str(valid), "documents": documents, "seed": 0},
            "settings": settings,
            "results": report,
        }
        Path(json_path).write_text(json.dumps(payload, indent=2), encoding="utf-8")


__all__ = ["engine_quality"]
