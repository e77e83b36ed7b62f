"""The fill quality suite (`editor bench fills`): what a user reads, measured on whole filled documents.

Bits per character at a fixed masking rate scores single tokens given the truth around them; it
does not see loops, seams, lengths or fills that ignore their record. This suite fills realistic
documents with the sampler's defaults (or the options given) and measures the finished text:

- held-out paragraphs (`--valid`, one paragraph per line) with 1-3 holes each, exact and range
  lengths from 1 to 60 tokens, mid-line and at the start of a line (two-paragraph documents);
- hand-written letters, forms with numbers, agendas and product texts (`WRITTEN`);
- metrics: the autoregressive twin's log-probability of the whole filled document against the
  original (bits per masked character of the original, `excess_bits_per_char`), word 3-grams a fill
  repeats inside its span or across its seams (unless the original repeats them there), fills
  that open a line with a blank or a line break, line breaks in spans that share their line,
  range spans' chosen lengths against their bounds, and the time per fill.

`--dump FILE` writes the documents (with originals) as JSON and `--score FILE` reads fills made
elsewhere (another commit, another model) in the same shape, so two versions are scored alike.
"""

from __future__ import annotations

import json
import lzma
import math
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from editor.benchmarks.options import device_option, json_option, threads_option

# Hand-written documents: letters, forms with numbers, agendas, product text (no originals).
WRITTEN = (
    "Dear [MASK 2-4 name=greeting],\n\nThank you for ordering [MASK 3-8 name=item]. Your refund of "
    '$[MASK 3 as=number name=amount] will reach you [MASK 4-10 must="Monday" name=when].\n\n'
    "Kind regards,\n[MASK 2-4 name=sender]",
    "Hi [MASK 1-3],\n\nI wanted to let you know that [MASK 8-20]. Could we meet on [MASK 2-5] to talk "
    "about it?\n\nBest,\n[MASK 1-3]",
    "Meeting notes\n\nAgenda\n- [MASK 3-8]\n- [MASK 3-8]\n- [MASK 3-8]\n\nDecisions: [MASK 8-24]",
    "Order form\nName: [MASK 2-4]\nQuantity: [MASK 1-2 as=int]\nDelivery address: [MASK 4-10]\nNotes: [MASK 4-16]",
    "Northwind trail running shoes. [MASK 8-20] They weigh [MASK 1-3 as=int] grams and come in "
    "[MASK 1-3] colours. [MASK 10-30]",
    "A short history of the bicycle.\n\n[MASK 40-60]\n\n[MASK 40-60]\n\nToday, bicycles are [MASK 6-20].",
    "The meeting starts at [MASK 2-4] and should end by [MASK 2-4]. Please bring [MASK 3-10].",
    "Weekly report. This week the team fixed [MASK 1-2 as=int] bugs in the [MASK 2-5]. The main "
    "problem was [MASK 8-16]. Next week we will [MASK 6-14].",
    "Dear customer,\n\nWe are sorry to tell you that your order [MASK 6-16]. We will [MASK 6-16].\n\n"
    "[MASK 2-6]\nThe support team",
    "Recipe: tomato soup\n\nIngredients: [MASK 8-20]\n\nMethod: [MASK 20-48]",
    "Our office is closed on [MASK 1-3] and on public holidays. If you have [MASK 3-8], call us at [MASK 3-12].",
    "The capital of France is [MASK 1-3].",
)

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


@dataclass
class SuiteDocument:
    name: str
    source: str  # the document with its [MASK ...] tags
    original: str | None = None  # the human text the holes were cut from (held-out paragraphs)
    hole_texts: list[str] = field(default_factory=list)  # the original text of each hole


@dataclass
class FilledDocument:
    name: str
    text: str
    spans: list[dict[str, Any]]  # text, start, end, tokens, min, max, line_start, single_line
    seconds: float
    steps: int = 0  # denoising steps (forward passes of the diffusion model, all candidates at once)


# ----------------------------------------------------------------------------- documents


def held_out_documents(path: Path, count: int, tokenizer: Any, seed: int = 0) -> list[SuiteDocument]:
    """`count` documents cut from held-out paragraphs: 1-3 holes of 1-40 words each (1 to ~60
    tokens), exact `[MASK n]` or a range around the true length; every third document is two
    paragraphs with a hole at the start of the second (a line start)."""
    chooser = random.Random(seed)
    with lzma.open(path, "rt", encoding="utf-8") as lines:
        usable = [
            line.strip()
            for line in lines
            if 30 <= len(line.split()) <= 120 and "[" not in line and "]" not in line and "\\" not in line
        ]
    picked = chooser.sample(usable, min(len(usable), 2 * count))
    documents: list[SuiteDocument] = []
    for number in range(count):
        if number % 3 == 2 and len(picked) > count + number:
            first, second = picked[number], picked[count + number]
            documents.append(_two_paragraphs(f"held-out-{number}", first, second, tokenizer, chooser))
        else:
            documents.append(_with_holes(f"held-out-{number}", picked[number], tokenizer, chooser))
    return documents


def _hole_tag(hole: str, tokenizer: Any, chooser: random.Random, spaced: bool) -> str:
    tokens = len(tokenizer.encode((" " if spaced else "") + hole, add_special_tokens=False))
    tokens = max(1, min(60, tokens))
    if chooser.random() < 0.5:
        return f"[MASK {tokens}]"
    low, high = max(1, tokens // 2), min(60, max(tokens + 2, round(tokens * 1.6)))
    return f"[MASK {low}-{high}]"


def _with_holes(name: str, paragraph: str, tokenizer: Any, chooser: random.Random) -> SuiteDocument:
    words = paragraph.split()
    holes = chooser.randint(1, 3)
    part = len(words) // holes
    pieces: list[str] = []
    hole_texts: list[str] = []
    at = 0
    for index in range(holes):
        low, high = index * part + 1, (index + 1) * part - 1
        if high - low < 2:
            break
        length = chooser.randint(1, min(40, high - low))
        start = chooser.randint(low, high - length)
        hole = " ".join(words[start : start + length])
        pieces.append(" ".join(words[at:start]) + " " + _hole_tag(hole, tokenizer, chooser, spaced=True))
        hole_texts.append(hole)
        at = start + length
    pieces.append(" ".join(words[at:]))
    source = "".join(piece if i == 0 else (" " + piece if piece else "") for i, piece in enumerate(pieces))
    return SuiteDocument(name, source, paragraph, hole_texts)


def _two_paragraphs(name: str, first: str, second: str, tokenizer: Any, chooser: random.Random) -> SuiteDocument:
    """Two paragraphs; the second opens with a hole of its first 2-12 words (a line-start span)."""
    words = second.split()
    length = chooser.randint(2, min(12, len(words) - 5))
    hole = " ".join(words[:length])
    tag = _hole_tag(hole, tokenizer, chooser, spaced=False)
    source = f"{first}\n\n{tag} {' '.join(words[length:])}"
    return SuiteDocument(name, source, f"{first}\n\n{second}", [hole])


def written_documents() -> list[SuiteDocument]:
    return [SuiteDocument(f"written-{number}", source) for number, source in enumerate(WRITTEN)]


# ----------------------------------------------------------------------------- filling


def fill_suite(
    model: Any, documents: Sequence[SuiteDocument], options: Any, *, per_span: bool = True
) -> list[FilledDocument]:
    """Fill each document alone (the time per fill is what one user waits)."""
    from editor.filling import fill_canvases, prepare_canvas
    from editor.parser import parse_document

    filled: list[FilledDocument] = []
    for document in documents:
        started = time.perf_counter()
        canvas = prepare_canvas(model, parse_document(document.source))
        [result] = fill_canvases(model, [canvas], options, started=started, per_span=per_span)
        seconds = time.perf_counter() - started
        spans = [
            {
                "text": span.text,
                "start": span.start,
                "end": span.end,
                "tokens": len(span.token_ids),
                "min": layout.min_tokens,
                "max": layout.length,
                "line_start": layout.line_start,
                "single_line": layout.single_line,
            }
            for span, layout in zip(result.spans, canvas.spans, strict=True)
        ]
        filled.append(FilledDocument(document.name, result.text, spans, seconds, result.steps))
        click.echo(f"{document.name} ({seconds:.2f} s): {result.text[:160]!r}", err=True)
    return filled


# ----------------------------------------------------------------------------- metrics


def _words(text: str) -> list[str]:
    return [word.lower() for word in _WORD.findall(text)]


def _trigrams(words: Sequence[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + 3]) for i in range(len(words) - 2)]


def repeated_trigrams(text: str, start: int, end: int, context_words: int = 12) -> int:
    """Word 3-grams touching the span [start, end) of `text` that occur twice within the span and
    `context_words` words on either side."""
    before, inside, after = _words(text[:start]), _words(text[start:end]), _words(text[end:])
    window = before[-context_words:] + inside + after[:context_words]
    first = len(before[-context_words:])
    grams = _trigrams(window)
    touching = [g for i, g in enumerate(grams) if i + 2 >= first and i < first + len(inside)]
    return sum(1 for gram in set(touching) if grams.count(gram) > 1)


def document_metrics(document: SuiteDocument, filled: FilledDocument) -> dict[str, Any]:
    spans = filled.spans
    repeats = sum(repeated_trigrams(filled.text, s["start"], s["end"]) for s in spans)
    if document.original is not None:  # repeats the human text itself has are not the fill's
        repeats = max(0, repeats - _original_repeats(document))
    ranged = [s for s in spans if s["min"] < s["max"]]
    return {
        "repeated_trigrams": repeats,
        "line_start_blank": sum(1 for s in spans if s["line_start"] and (not s["text"] or s["text"][:1].isspace())),
        "newline_in_single_line": sum(1 for s in spans if s["single_line"] and "\n" in s["text"]),
        "range_positions": [(s["tokens"] - s["min"]) / (s["max"] - s["min"]) for s in ranged],
        "range_at_max": sum(1 for s in ranged if s["tokens"] == s["max"]),
        "ranges": len(ranged),
    }


def _original_repeats(document: SuiteDocument) -> int:
    assert document.original is not None
    words = _words(document.original)
    grams = _trigrams(words)
    return sum(1 for gram in set(grams) if grams.count(gram) > 1)


def summary(documents: Sequence[SuiteDocument], filled: Sequence[FilledDocument], judge: Any | None) -> dict[str, Any]:
    per_document = [document_metrics(d, f) for d, f in zip(documents, filled, strict=True)]
    positions = [p for m in per_document for p in m["range_positions"]]
    ranges = sum(m["ranges"] for m in per_document)
    result: dict[str, Any] = {
        "documents": len(documents),
        "spans": sum(len(f.spans) for f in filled),
        "repeated_trigrams": sum(m["repeated_trigrams"] for m in per_document),
        "documents_with_repeats": sum(1 for m in per_document if m["repeated_trigrams"]),
        "line_start_blank": sum(m["line_start_blank"] for m in per_document),
        "newline_in_single_line": sum(m["newline_in_single_line"] for m in per_document),
        "range_spans": ranges,
        "range_at_max": sum(m["range_at_max"] for m in per_document),
        "range_position_mean": round(statistics.fmean(positions), 3) if positions else None,
        "range_position_quartiles": _quartiles(positions),
        "seconds_median": round(statistics.median(f.seconds for f in filled), 3),
        "seconds_mean": round(statistics.fmean(f.seconds for f in filled), 3),
        # Masked positions (each span's full length, end tokens included) per denoising step: what
        # a schedule that commits several tokens a step buys.
        "tokens_per_step": _tokens_per_step(filled),
    }
    if judge is not None:
        result |= _excess_bits(documents, filled, judge)
    return result


def _tokens_per_step(filled: Sequence[FilledDocument]) -> float | None:
    steps = sum(f.steps for f in filled)
    return round(sum(s["max"] for f in filled for s in f.spans) / steps, 3) if steps else None


def _quartiles(values: Sequence[float]) -> list[float] | None:
    if len(values) < 4:
        return None
    return [round(v, 3) for v in statistics.quantiles(values, n=4)]


def _excess_bits(documents: Sequence[SuiteDocument], filled: Sequence[FilledDocument], judge: Any) -> dict[str, Any]:
    """The twin's -log2 P(filled) - -log2 P(original), per masked character of the original, over
    the documents that have an original; and bits per character of every filled document."""
    pairs = [(d, f) for d, f in zip(documents, filled, strict=True) if d.original is not None]
    filled_scores = judge.text_log_probs([f.text for f in filled])
    bits_per_char = [-s / math.log(2) / max(1, len(f.text)) for s, f in zip(filled_scores, filled, strict=True)]
    out: dict[str, Any] = {"filled_bits_per_char_mean": round(statistics.fmean(bits_per_char), 4)}
    if pairs:
        originals = judge.text_log_probs([d.original for d, _ in pairs])
        by_name = {f.name: s for f, s in zip(filled, filled_scores, strict=True)}
        excess = [(o - by_name[f.name]) / math.log(2) for (_, f), o in zip(pairs, originals, strict=True)]
        chars = [sum(len(h) for h in d.hole_texts) for d, _ in pairs]
        out["excess_bits_per_char"] = round(sum(excess) / max(1, sum(chars)), 4)
        out["excess_bits_per_char_median_document"] = round(
            statistics.median(e / max(1, c) for e, c in zip(excess, chars, strict=True)), 4
        )
    return out


# ----------------------------------------------------------------------------- command


@click.command("fills")
@click.option("--model", "model_spec", default="default", help="model to fill with [default: the default model]")
@device_option
@threads_option
@click.option("--valid", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="held-out split (.xz)")
@click.option("--paragraphs", default=30, type=click.IntRange(min=0), help="documents cut from --valid")
@click.option("--written/--no-written", default=True, help="include the hand-written documents")
@click.option("--candidates", type=click.IntRange(1, 16), default=None, help="[default: the model's]")
@click.option("--no-repeat-ngram", type=click.IntRange(0, 8), default=None, help="[default: the sampler's]")
@click.option("--schedule", default=None, help="[default: the sampler's]")
@click.option("--seed", default=0, help="fill seed")
@click.option(
    "--choice",
    type=click.Choice(["span", "document"]),
    default="span",
    help="keep the judge's best document, or let each span come from its best candidate",
)
@click.option("--dump", type=click.Path(dir_okay=False, path_type=Path), help="write the documents here and stop")
@click.option(
    "--documents",
    "documents_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="fill the documents of a --dump (the same documents for every model and version)",
)
@click.option("--score", "score_path", type=click.Path(exists=True, path_type=Path), help="score fills from FILE")
@json_option
def fills_bench(
    model_spec: str,
    device: str,
    threads: int | None,
    valid: Path | None,
    paragraphs: int,
    written: bool,
    candidates: int | None,
    no_repeat_ngram: int | None,
    schedule: str | None,
    seed: int,
    choice: str,
    dump: Path | None,
    documents_path: Path | None,
    score_path: Path | None,
    json_path: Path | None,
) -> None:
    """Fill realistic documents and measure the finished text (repeats, seams, lengths, the twin's likelihood)."""
    import torch

    from editor.judging import load_autoregressive_twin
    from editor.models.loading import load_model
    from editor.models.native import dtype_text
    from editor.options import SamplerOptions

    if threads is not None:
        torch.set_num_threads(threads)
    given: dict[str, Any] = {"seed": seed}
    if candidates is not None:
        given["candidates"] = candidates
    if no_repeat_ngram is not None:
        given["no_repeat_ngram"] = no_repeat_ngram
    if schedule is not None:
        given["schedule"] = schedule
    options = SamplerOptions(**given)
    if score_path is not None:  # fills made elsewhere: only the twin is loaded, not a model to fill with
        loaded = json.loads(score_path.read_text(encoding="utf-8"))
        filled = [FilledDocument(**entry) for entry in loaded["fills"]]
        documents = [SuiteDocument(**entry) for entry in loaded["documents"]]
        source, dtype, where, used = f"fills from {score_path.name}", torch.float32, torch.device(device), None
    else:
        model = load_model(model_spec, device=device)
        if documents_path is not None:
            documents = [SuiteDocument(**entry) for entry in json.loads(documents_path.read_text(encoding="utf-8"))]
        else:
            documents = (held_out_documents(valid, paragraphs, model.tokenizer) if valid else []) + (
                written_documents() if written else []
            )
        if dump is not None:
            dump.write_text(json.dumps([asdict(d) for d in documents], indent=1) + "\n", encoding="utf-8")
            return
        filled = fill_suite(model, documents, options, per_span=choice == "span")
        source, dtype, where = model.name, getattr(model, "dtype", torch.float32), model.device
        used = {**options.model_dump(exclude_none=True), "choice": choice}
    judge = load_autoregressive_twin(where, dtype)
    report = {
        "benchmark": "fills",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": source,
        "dtype": dtype_text(dtype),
        "device": str(where),
        "threads": torch.get_num_threads(),
        "options": used,
        "summary": summary(documents, filled, judge),
        "documents": [asdict(d) for d in documents],
        "fills": [asdict(f) for f in filled],
    }
    click.echo(json.dumps(report["summary"], indent=2))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


__all__ = ["fills_bench", "held_out_documents", "repeated_trigrams", "summary", "written_documents"]
