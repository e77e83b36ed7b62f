"""The quality guard of the fast engine (`editor bench engine-quality`): how often a fast setting
fills a document exactly as its uncached counterpart does (one token per step and confidence, or
the same schedule uncached), and the masked-token NLL of each: every filled token's -log p given
the rest of the filled canvas with that one position masked (a pseudo-likelihood; lower = the
model finds the fill more natural)."""

from __future__ import annotations

import json
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
}
# The uncached setting a fast one is compared with (same text); the rest: "reference".
COMPARED_WITH = {"blocks+cached": "blocks"}


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
@click.option("--model", "model_spec", default=None, help="model directory or id [default: the bundled model]")
@click.option("--threads", default=1, help="torch CPU threads")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def engine_quality(model_spec: str | None, threads: int, json_path: str | None) -> None:
    """Same-text rate and masked-token NLL of fast settings against one-token-per-step decoding."""
    import torch

    from editor.filling import prepare_canvas, vocabulary_rules
    from editor.models.loading import load_model
    from editor.options import SamplerOptions
    from editor.parser import parse_document
    from editor.sampler import Row, sample

    torch.set_num_threads(threads)
    model = load_model(model_spec, device="cpu")
    canvases = [prepare_canvas(model, parse_document(text)) for text in DOCUMENTS]
    report: dict[str, dict[str, Any]] = {}
    texts_of: dict[str, list[str]] = {}
    for name, values in SETTINGS.items():
        values = dict(values)
        per_step = values.pop("steps_per_token", None)
        texts, nlls, steps = [], [], []
        for canvas in canvases:
            masks = len(canvas.masked_positions)
            options = SamplerOptions(seed=0, steps=max(1, masks // per_step) if per_step else None, **values)
            output = sample(model, [Row(canvas.ids, canvas.pinned, canvas.rules)], options, vocabulary_rules(model))
            ids = output.ids[0]
            texts.append(str(model.tokenizer.decode(ids)))
            steps.append(output.steps / masks)
            nlls.append(masked_nll(model, ids, list(canvas.masked_positions)))
        texts_of[name] = texts
        compared_with = COMPARED_WITH.get(name, "reference")
        same = sum(a == b for a, b in zip(texts, texts_of[compared_with], strict=True)) / len(texts)
        report[name] = {
            "compared_with": compared_with,
            "same_text": round(same, 3),
            "masked_token_nll": round(statistics.fmean(nlls), 4),
            "steps_per_token": round(statistics.fmean(steps), 3),
        }
        figures = report[name]
        click.echo(
            f"{name:18} same text as {compared_with}: {same:6.1%}  NLL {figures['masked_token_nll']:.4f}  "
            f"steps/token {figures['steps_per_token']:.3f}"
        )
    if json_path:
        payload = {
            "benchmark": "engine-quality",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model.name,
            "documents": len(DOCUMENTS),
            "settings": SETTINGS,
            "results": report,
        }
        Path(json_path).write_text(json.dumps(payload, indent=2), encoding="utf-8")


__all__ = ["engine_quality"]
