"""What a fill means for the stored history: the revision a fill becomes, the "everything else
pinned" document that regenerates one span, the spans of the merged result, the revision that
takes another candidate's text for a span, and the diff between two revisions. Pure functions of
documents, fill results and stored revisions: no HTTP here."""

from __future__ import annotations

import difflib
import re
from typing import Any

from editor.canvas import SpanAlternative, SpanFill, split_literals
from editor.db.models import Revision, RevisionSpan
from editor.db.services import NewRevision, NotFound
from editor.document import Document, MaskSpan
from editor.filling import FillResult
from editor.options import SamplerOptions
from editor.server.limits import LimitExceeded
from editor.server.schemas import DiffOut, SpanChange, TextChunk
from editor.server.worker import JobOutcome

_WORDS = re.compile(r"\s+|\w+|[^\w\s]")


def new_revision(
    result: FillResult,
    outcome: JobOutcome,
    *,
    source: str,
    instruction: str | None,
    spans: list[SpanFill] | None = None,
    **extra: Any,
) -> NewRevision:
    """What to store for a fill: the options as given, with the seed that was used."""
    records = spans if spans is not None else result.spans
    options = result.options.model_copy(update={"seed": result.seed}).model_dump(mode="json")
    return NewRevision(
        source=source,
        text=result.text,
        spans=records,
        model=result.model,
        seed=result.seed,
        options=options,
        steps=result.steps,
        queued_s=outcome.queued_s,
        fill_s=outcome.fill_s,
        total_s=outcome.total_s,
        instruction=instruction,
        trace=outcome.trace,
        **extra,
    )


def revision_options(revision: Revision) -> SamplerOptions:
    """The revision's sampler options with a fresh seed (fields this version does not know are dropped)."""
    known = {k: v for k, v in revision.options.items() if k in SamplerOptions.model_fields and k != "seed"}
    return SamplerOptions.model_validate(known)


# --------------------------------------------------------------------------- regenerate one span


def find_span(document: Document, key: str, where: str) -> MaskSpan:
    """A span by name or 0-based index; NotFound otherwise."""
    try:
        return document.span(key)
    except KeyError:
        raise NotFound(f"span {key!r} of {where}") from None


def pin_all_but(document: Document, revision: Revision, target: int) -> Document:
    """The document with every span but `target` replaced by the revision's fill, as literal text."""
    return pin_except(document, revision, {target})


def pin_except(document: Document, revision: Revision, targets: set[int]) -> Document:
    """The document with every span not in `targets` replaced by the revision's fill, as literal text.

    Literal text comes from the revision's filled text, so the seams read exactly as they did;
    only the literal right before a target is the document's own (the old fill may have taken
    over its trailing space, and the new fill must be free to do so again)."""
    literals, spans = split_literals(document)
    fills = {s.index: s for s in revision.spans}
    if sorted(fills) != list(range(len(spans))):
        raise ValueError(f"revision {revision.number} does not cover the spans of its source")
    segments: list[str | MaskSpan] = []
    at = 0  # offset in the revision's text where the next literal starts
    for span in spans:
        fill = fills[span.index]
        if span.index in targets:
            segments += [literals[span.index], span]
        else:
            segments += [revision.text[at : fill.start], fill.text]
        at = fill.end
    segments.append(revision.text[at:])
    return Document(_merge_literals(segments))


def _merge_literals(segments: list[str | MaskSpan]) -> tuple[str | MaskSpan, ...]:
    merged: list[str | MaskSpan] = []
    for segment in segments:
        if isinstance(segment, str):
            if not segment:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += segment
                continue
        merged.append(segment)
    return tuple(merged)


def merged_spans(revision: Revision, targets: set[int], result: FillResult) -> list[SpanFill]:
    """All of the original document's spans for the new text: the refilled ones from `result` (its
    spans are the targets in order), the others unchanged but moved by the change in length before them."""
    refilled = dict(zip(sorted(targets), result.spans, strict=True))
    shift = 0
    records: list[SpanFill] = []
    for span in sorted(revision.spans, key=lambda s: s.index):
        new = refilled.get(span.index)
        if new is not None:
            records.append(new.model_copy(update={"index": span.index, "name": span.name}))
            shift = new.end - span.end
            continue
        records.append(span.to_fill().model_copy(update={"start": span.start + shift, "end": span.end + shift}))
    for record in records:  # the offsets must point at the fills, or the revision would lie
        if result.text[record.start : record.end] != record.text:
            raise RuntimeError(f"span {record.index} does not line up with the refilled text")
    return records


def kept_scores(revision: Revision, targets: set[int]) -> dict[int, float]:
    """The known judge's scores of the spans a refill keeps (a refilled span's old score is void)."""
    return {s.index: s.score for s in revision.spans if s.index not in targets and s.score is not None}


def regenerated(revision: Revision, target: int, outcome: JobOutcome, instruction: str | None) -> NewRevision:
    return refilled(revision, {target}, outcome, instruction, kind="regenerate", parent_number=revision.number)


def refilled(
    revision: Revision,
    targets: set[int],
    outcome: JobOutcome,
    instruction: str | None,
    *,
    kind: str = "fill",
    parent_number: int | None = None,
) -> NewRevision:
    """The revision a refill of `targets` (every other span pinned to `revision`) becomes."""
    result = outcome.results[0]
    return new_revision(
        result,
        outcome,
        source=revision.source,
        instruction=instruction,
        spans=merged_spans(revision, targets, result),
        kind=kind,
        regenerated_span=min(targets) if kind == "regenerate" else None,
        parent_number=parent_number,
        scores=kept_scores(revision, targets),
    )


# --------------------------------------------------------------------------- choose an alternative


def stored_span(revision: Revision, key: str, where: str) -> RevisionSpan:
    """A revision's span by name or 0-based index (as `Document.span` finds them); NotFound otherwise."""
    spans = sorted(revision.spans, key=lambda s: s.index)
    named = next((s for s in spans if s.name is not None and s.name == key), None)
    if named is not None:
        return named
    if key.isascii() and key.isdigit() and int(key) < len(spans):
        return spans[int(key)]
    raise NotFound(f"span {key!r} of {where}")


def chosen(revision: Revision, span: RevisionSpan, alternative: int, where: str) -> NewRevision:
    """The revision that takes alternative number `alternative` of `span` as its text, without a fill.

    Later spans move by the change in length. The chosen text leaves the span's alternatives and
    the replaced text takes its place there, with its score: the recorded one, or for a fill's own
    winner (whose score the fill does not report) the best alternative's, which the winner at
    least reached. Alternatives carry no confidence, so the span keeps the replaced text's."""
    options = [SpanAlternative.model_validate(a) for a in span.alternatives]
    if not options:
        raise LimitExceeded(f"span {_label(span)} of {where} has no alternatives: one candidate filled it")
    if not 0 <= alternative < len(options):
        raise LimitExceeded(
            f"span {_label(span)} of {where} has {len(options)} alternative{'s' if len(options) != 1 else ''}: "
            f"give an alternative from 0 to {len(options) - 1}, not {alternative}"
        )
    pick = options[alternative]
    own_score = span.score if span.score is not None else max(o.score for o in options)
    options[alternative] = SpanAlternative(text=span.text, token_ids=list(span.token_ids), score=own_score)
    shift = len(pick.text) - len(span.text)
    spans: list[SpanFill] = []
    for other in sorted(revision.spans, key=lambda s: s.index):
        fill = other.to_fill()
        if other.index == span.index:
            replaced = {"text": pick.text, "token_ids": list(pick.token_ids), "alternatives": options}
            fill = fill.model_copy(update=replaced | {"end": span.start + len(pick.text)})
        elif other.index > span.index:  # spans lie in index order (even empty ones at one offset)
            fill = fill.model_copy(update={"start": other.start + shift, "end": other.end + shift})
        spans.append(fill)
    return NewRevision(
        source=revision.source,
        text=revision.text[: span.start] + pick.text + revision.text[span.end :],
        spans=spans,
        model=revision.model,
        seed=revision.seed,
        options=dict(revision.options),
        steps=0,
        queued_s=0.0,
        fill_s=0.0,
        total_s=0.0,
        instruction=revision.instruction,
        kind="choose",
        regenerated_span=span.index,
        parent_number=revision.number,
        scores=kept_scores(revision, {span.index}) | {span.index: pick.score},
    )


def _label(span: RevisionSpan) -> str:
    return repr(span.name) if span.name is not None else str(span.index)


# --------------------------------------------------------------------------- diff


def diff_revisions(before: Revision, after: Revision) -> DiffOut:
    """Per-span changes (spans matched by name, else index) and a word- and line-level text diff."""
    old = {_key(s.name, s.index): s for s in before.spans}
    changes: list[SpanChange] = []
    for span in after.spans:
        previous = old.pop(_key(span.name, span.index), None)
        was = previous.text if previous is not None else None
        changes.append(
            SpanChange(
                key=_key(span.name, span.index), index=span.index, before=was, after=span.text, changed=was != span.text
            )
        )
    changes += [SpanChange(key=key, index=None, before=s.text, after=None, changed=True) for key, s in old.items()]
    return DiffOut(
        document_id=after.document_id,
        from_revision=before.number,
        to_revision=after.number,
        source_changed=before.source != after.source,
        spans=changes,
        chunks=word_diff(before.text, after.text),
        unified=line_diff(before.text, after.text, f"revision {before.number}", f"revision {after.number}"),
    )


def _key(name: str | None, index: int) -> str:
    return name if name is not None else str(index)


def word_diff(before: str, after: str) -> list[TextChunk]:
    """Word-level chunks whose `before`s join to `before` and `after`s to `after`. Changes kept
    apart only by spaces are one change: "quick brown" -> "slow red", not quick/slow, brown/red."""
    a, b = _WORDS.findall(before), _WORDS.findall(after)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    chunks: list[TextChunk] = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        chunk = TextChunk(op=op, before="".join(a[i1:i2]), after="".join(b[j1:j2]))
        if op != "equal" and len(chunks) >= 2 and chunks[-2].op != "equal" and chunks[-1].before.isspace():
            change, space = chunks[-2], chunks[-1]
            before, after = change.before + space.before + chunk.before, change.after + space.after + chunk.after
            if before.strip() and after.strip():  # words on both sides: one replacement reads best
                del chunks[-2:]
                chunk = TextChunk(op="replace", before=before, after=after)
        chunks.append(chunk)
    return chunks


def line_diff(before: str, after: str, from_name: str, to_name: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), fromfile=from_name, tofile=to_name
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


__all__ = [
    "chosen",
    "diff_revisions",
    "find_span",
    "merged_spans",
    "new_revision",
    "pin_all_but",
    "pin_except",
    "refilled",
    "regenerated",
    "revision_options",
    "stored_span",
    "word_diff",
]
