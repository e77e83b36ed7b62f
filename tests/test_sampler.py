"""The sampler (docs/sampler.md) and what `fill_documents` promises on top of it, on tiny random
models: pinned tokens never change, every mask is filled, each row commits exactly its own
schedule, seeds reproduce, value classes hold, spans keep their lengths, must/choice/cancel work.

`Probe` wraps a model to record every canvas the model is shown (so the state after every step can
be checked, not only the end) and to add logit biases that make an outcome certain."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editor.canvas import Canvas, encode, must_tokens
from editor.chat import Instruction
from editor.document import DocumentError, Must
from editor.filling import fill_documents, prepare_canvas, vocabulary_rules
from editor.models import DiffusionModel, aligned_logits
from editor.options import SCHEDULES, FillCancelled, SamplerOptions
from editor.parser import parse_document
from editor.sampler import (
    Row,
    SampleOutput,
    StepEvent,
    block_plan,
    sample,
    step_counts,
)

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

Bias = Callable[[torch.Tensor], torch.Tensor]  # input ids [B, L] -> additive logits, broadcastable to [B, L, V]


class Probe:
    """A `DiffusionModel` over another one: records inputs and outputs, adds an optional bias."""

    def __init__(self, base: DiffusionModel, bias: Bias | None = None, *, logits_shifted: bool | None = None) -> None:
        self.base = base
        self.bias = bias
        self.name = f"probe({base.name})"
        self.tokenizer = base.tokenizer
        self.special = base.special
        self.logits_shifted = base.logits_shifted if logits_shifted is None else logits_shifted
        self.vocab_size = base.vocab_size
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.base.device

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.base.forward_logits(input_ids, attention_mask)
        if self.bias is not None:
            logits = logits + self.bias(input_ids)
        self.inputs.append(input_ids.detach().clone().cpu())
        self.outputs.append(logits.detach().clone().cpu())
        return logits

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        return self.base.frame(instruction)


def token_bias(vocab_size: int, boosts: dict[int, float]) -> Bias:
    """The same bias at every position."""
    row = torch.zeros(vocab_size)
    for token_id, value in boosts.items():
        row[token_id] += value
    return lambda ids: row


def position_bias(vocab_size: int, boosts: dict[tuple[int, int], float]) -> Bias:
    """A bias at given canvas positions: {(position, token id): value}."""

    def bias(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ids.shape[0], ids.shape[1], vocab_size)
        for (position, token_id), value in boosts.items():
            if position < ids.shape[1]:
                out[:, position, token_id] += value
        return out

    return bias


@dataclass
class Run:
    """One sampler run over canvases, with everything observed."""

    canvases: list[Canvas]
    probe: Probe
    output: SampleOutput
    events: list[StepEvent] = field(default_factory=list)

    def commits(self, row: int) -> list[list[int]]:
        """Positions committed in `row` at each step (position order within a step)."""
        return [[c.position for c in event.commits if c.row == row] for event in self.events]


def canvases_for(model: DiffusionModel, sources: Sequence[str]) -> list[Canvas]:
    return [prepare_canvas(model, parse_document(source)) for source in sources]


def run_sampler(
    model: DiffusionModel, sources: Sequence[str], options: SamplerOptions, bias: Bias | None = None
) -> Run:
    probe = Probe(model, bias)
    canvases = canvases_for(probe, sources)
    assert not probe.inputs, "these documents need no model call to lay out"
    events: list[StepEvent] = []
    rows = [Row(c.ids, c.pinned, c.rules) for c in canvases]
    output = sample(probe, rows, options, vocabulary_rules(probe), on_step=events.append)
    return Run(canvases, probe, output, events)


def check_run(run: Run) -> None:
    """Invariants every fill keeps, checked on every canvas the model saw and on the result."""
    mask = run.probe.special.mask
    assert len(run.probe.inputs) == len(run.events) == run.output.steps
    committed: dict[tuple[int, int], int] = {}  # (row, position) -> token
    for step, (seen, event) in enumerate(zip(run.probe.inputs, run.events, strict=True)):
        assert event.step == step
        for row, canvas in enumerate(run.canvases):
            for position, token in enumerate(canvas.ids):
                shown = int(seen[row, position])
                if canvas.pinned[position]:
                    assert shown == token, f"pinned row {row} position {position} changed before step {step}"
                elif (row, position) in committed:
                    assert shown == committed[row, position], f"committed row {row} position {position} changed"
                else:
                    assert shown == mask
        for commit in event.commits:
            key = (commit.row, commit.position)
            assert key not in committed, f"{key} committed twice"
            assert not run.canvases[commit.row].pinned[commit.position], f"{key} is pinned but was committed"
            assert 0.0 < commit.confidence <= 1.0
            assert commit.token_id != mask
            committed[key] = commit.token_id
        for row, canvas in enumerate(run.canvases):
            left = sum(1 for p in canvas.masked_positions if (row, p) not in committed)
            assert event.remaining[row] == left
    for row, (canvas, ids) in enumerate(zip(run.canvases, run.output.ids, strict=True)):
        assert len(ids) == len(canvas.ids)
        assert mask not in ids, f"row {row} still has a mask"
        assert [t for t, fixed in zip(ids, canvas.pinned, strict=True) if fixed] == [
            t for t, fixed in zip(canvas.ids, canvas.pinned, strict=True) if fixed
        ]
        # The callback saw every masked position exactly once, with the token that was kept.
        assert {p for (r, p) in committed if r == row} == set(canvas.masked_positions)
        for position in canvas.masked_positions:
            assert ids[position] == committed[row, position]
        for position, confidence in enumerate(run.output.confidences[row]):
            assert 0.0 < confidence <= 1.0
            if canvas.pinned[position]:
                assert confidence == 1.0


def options_for(schedule: str, **values: object) -> SamplerOptions:
    if schedule == "blocks":
        values.setdefault("block_length", 4)  # several blocks on these small canvases
    return SamplerOptions(schedule=schedule, **values)


def expected_counts(options: SamplerOptions, masks: int) -> list[int]:
    steps = options.steps if options.steps is not None else masks
    if options.schedule == "blocks":
        return [count for count, _ in block_plan(masks, steps, options.block_length)]
    return step_counts(masks, steps)


# Three rows of different lengths and mask counts: 2 (pinned-heavy), 7, 19 (mask-heavy).
BATCH = (
    "Dear [MASK 2], thank you for your order of the blue chair, the red table and the green lamp. "
    "We shipped the parcel to your home address yesterday. Kind regards, the support team.",
    "[MASK 3] cat sat on the [MASK 4].",
    "Hello [MASK 19]",
)
BATCH_MASKS = (2, 7, 19)


# --------------------------------------------------------------------------- budgets and invariants


@pytest.mark.parametrize("steps", [5, None])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_batch_commits_each_rows_own_schedule(tiny_model: DiffusionModel, schedule: str, steps: int | None) -> None:
    options = options_for(schedule, steps=steps, temperature=1.0, seed=11)
    run = run_sampler(tiny_model, BATCH, options)
    assert [len(c.masked_positions) for c in run.canvases] == list(BATCH_MASKS)
    check_run(run)
    for row, masks in enumerate(BATCH_MASKS):
        counts = [len(positions) for positions in run.commits(row)]
        done = max(i for i, count in enumerate(counts) if count) + 1
        assert all(counts[:done]) and not any(counts[done:]), f"row {row} paused before it finished: {counts}"
        if schedule == "threshold":
            # At least one per step; a random model is never 90% sure, so with steps=None exactly one.
            if steps is None:
                assert counts[:done] == [1] * masks
            else:
                assert done <= steps
        else:
            assert counts[:done] == expected_counts(options, masks), f"row {row}"
    if schedule != "threshold":
        assert run.output.steps == max(len(expected_counts(options, masks)) for masks in BATCH_MASKS)


def test_pinned_heavy_and_mask_heavy_rows_keep_their_own_budget(tiny_model: DiffusionModel) -> None:
    """The batch-shared budget bug (docs/sampler.md): with 2 and 19 masks and 3 steps, a shared count
    would overwrite pinned tokens of the first row or leave masks in the second."""
    sources = (BATCH[0], "Hello [MASK 19]")
    for schedule in ("confidence", "random", "left-to-right"):
        run = run_sampler(tiny_model, sources, SamplerOptions(schedule=schedule, steps=3, temperature=1.0, seed=5))
        check_run(run)
        assert [len(p) for p in run.commits(0)] == [1, 1, 0]
        assert [len(p) for p in run.commits(1)] == [7, 6, 6]


def test_alg_temp_keeps_the_budget(tiny_model: DiffusionModel) -> None:
    for schedule in ("confidence", "margin", "entropy", "blocks"):
        options = options_for(schedule, steps=4, temperature=0.0, alg_temp=2.0, seed=3)
        run = run_sampler(tiny_model, BATCH, options)
        check_run(run)
        for row, masks in enumerate(BATCH_MASKS):
            counts = [len(p) for p in run.commits(row)]
            assert counts[: len(expected_counts(options, masks))] == expected_counts(options, masks)


def test_shifted_model_fills_and_keeps_pins(tiny_shifted_model: DiffusionModel) -> None:
    for schedule in ("confidence", "random"):
        run = run_sampler(
            tiny_shifted_model, BATCH, SamplerOptions(schedule=schedule, steps=5, temperature=1.0, seed=2)
        )
        check_run(run)


@pytest.mark.parametrize("shifted", [False, True])
def test_shift_aligns_predictions_to_positions(tiny_model: DiffusionModel, shifted: bool) -> None:
    """A model whose output i strongly predicts token T[(i + shift) % 3]: after alignment every
    filled position p must hold T[p % 3], which only holds if the shift is undone correctly."""
    tokenizer = tiny_model.tokenizer
    targets = [encode(tokenizer, word)[0] for word in (" the", " and", " on")]
    shift = 1 if shifted else 0
    width = tiny_model.vocab_size

    def bias(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ids.shape[0], ids.shape[1], width)
        for i in range(ids.shape[1]):
            out[:, i, targets[(i + shift) % 3]] = 60.0
        return out

    probe = Probe(tiny_model, bias, logits_shifted=shifted)
    canvas = canvases_for(probe, ["Hello [MASK 7] and [MASK 5]"])[0]
    output = sample(
        probe,
        [Row(canvas.ids, canvas.pinned, canvas.rules)],
        SamplerOptions(seed=0, no_repeat_ngram=0),  # the pattern repeats its 3-gram on purpose
        vocabulary_rules(probe),
    )
    for position in canvas.masked_positions:
        assert output.ids[0][position] == targets[position % 3]
    aligned = aligned_logits(probe, torch.tensor([canvas.ids]), torch.ones(1, len(canvas.ids), dtype=torch.bool))
    assert int(aligned[0, 5].argmax()) == targets[5 % 3]


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps", [None, 4])
def test_left_to_right_commits_in_position_order(tiny_model: DiffusionModel, steps: int | None) -> None:
    run = run_sampler(tiny_model, BATCH, SamplerOptions(schedule="left-to-right", steps=steps, temperature=1.0, seed=1))
    check_run(run)
    for row, canvas in enumerate(run.canvases):
        order = [p for step in run.commits(row) for p in step]
        assert order == sorted(canvas.masked_positions)
        if steps is None:
            assert all(len(step) <= 1 for step in run.commits(row))


@pytest.mark.parametrize("steps", [None, 3, 7])
def test_blocks_finish_before_the_next_starts(tiny_model: DiffusionModel, steps: int | None) -> None:
    options = SamplerOptions(schedule="blocks", steps=steps, block_length=4, temperature=1.0, seed=4)
    run = run_sampler(tiny_model, BATCH, options)
    check_run(run)
    for row, canvas in enumerate(run.canvases):
        block_of = {p: rank // 4 for rank, p in enumerate(canvas.masked_positions)}
        left = set(canvas.masked_positions)
        for step in run.commits(row):
            if not step:
                continue
            current = min(block_of[p] for p in left)
            assert {block_of[p] for p in step} == {current}, f"row {row} left block {current} unfinished"
            left -= set(step)
        assert not left


@pytest.mark.parametrize("schedule", ["confidence", "margin", "entropy"])
def test_confidence_schedules_commit_the_best_scored_positions(tiny_model: DiffusionModel, schedule: str) -> None:
    """Temperature 0: each step's committed positions score at least as high as every position left
    (the logit rules that look at neighbours are off: the scores below are recomputed without them)."""
    options = SamplerOptions(
        schedule=schedule, steps=4, seed=0, repetition_penalty=1.0, single_spaces=False, no_repeat_ngram=0
    )
    run = run_sampler(tiny_model, BATCH, options)
    check_run(run)
    vocabulary = vocabulary_rules(run.probe)
    for seen, logits, event in zip(run.probe.inputs, run.probe.outputs, run.events, strict=True):
        for row, canvas in enumerate(run.canvases):
            scores = {}
            for position in range(len(canvas.ids)):
                if int(seen[row, position]) != run.probe.special.mask:
                    continue
                allowed = vocabulary.mask(canvas.rules[position])
                probs = torch.softmax(logits[row, position].masked_fill(~allowed, float("-inf")), dim=-1)
                top = torch.topk(probs, 2).values
                if schedule == "confidence":
                    scores[position] = float(top[0])
                elif schedule == "margin":
                    scores[position] = float(top[0] - top[1])
                else:
                    scores[position] = -float(-(probs * probs.clamp_min(1e-12).log()).sum())
            chosen = {c.position for c in event.commits if c.row == row}
            if chosen and chosen != set(scores):
                assert min(scores[p] for p in chosen) >= max(s for p, s in scores.items() if p not in chosen) - 1e-6


def test_threshold_commits_every_confident_position_at_once(tiny_model: DiffusionModel) -> None:
    """Positions where the model is sure (a large bias on one token) are all committed in step 0;
    the rest, where it is unsure, one per step; and `steps` caps the number of steps."""
    probe_canvas = canvases_for(tiny_model, ["Hello [MASK 12]"])[0]
    sure = probe_canvas.masked_positions[::3]
    the = encode(tiny_model.tokenizer, " the")[0]
    bias = position_bias(tiny_model.vocab_size, {(p, the): 40.0 for p in sure})
    run = run_sampler(tiny_model, ["Hello [MASK 12]"], SamplerOptions(schedule="threshold"), bias)
    check_run(run)
    steps = run.commits(0)
    assert set(steps[0]) == set(sure)
    assert all(len(step) == 1 for step in steps[1:]) and len(steps) == 1 + 12 - len(sure)
    capped = run_sampler(tiny_model, ["Hello [MASK 12]"], SamplerOptions(schedule="threshold", steps=3), bias)
    check_run(capped)
    assert set(sure) <= set(capped.commits(0)[0]) and capped.output.steps <= 3


# --------------------------------------------------------------------------- seeds and token choice


@pytest.mark.parametrize("schedule", ["random", "confidence"])
def test_same_seed_same_fill_other_seed_other_fill(tiny_model: DiffusionModel, schedule: str) -> None:
    def fill(seed: int) -> tuple[list[str], list[int]]:
        options = SamplerOptions(schedule=schedule, temperature=1.0, steps=6, seed=seed)
        results = fill_documents(tiny_model, [parse_document(s) for s in BATCH], options)
        assert all(r.seed == seed for r in results)
        return [r.text for r in results], [t for r in results for s in r.spans for t in s.token_ids]

    first, again, other = fill(1234), fill(1234), fill(1235)
    assert first == again
    # 28 tokens drawn from a near-flat distribution over ~400 ids: equal fills are out of the question.
    assert first[1] != other[1] and first[0] != other[0]


def test_top_k_one_is_greedy(tiny_model: DiffusionModel) -> None:
    documents = [parse_document(s) for s in BATCH]
    greedy = fill_documents(tiny_model, documents, SamplerOptions(schedule="left-to-right", steps=4, seed=1))
    top1 = fill_documents(
        tiny_model, documents, SamplerOptions(schedule="left-to-right", steps=4, seed=9, temperature=1.5, top_k=1)
    )
    assert [r.text for r in greedy] == [r.text for r in top1]


def test_cancel_stops_before_the_next_model_call(tiny_model: DiffusionModel) -> None:
    for k in (0, 1, 3):
        probe = Probe(tiny_model)
        canvas = canvases_for(probe, ["Hello [MASK 19]"])[0]
        events: list[StepEvent] = []
        with pytest.raises(FillCancelled):
            sample(
                probe,
                [Row(canvas.ids, canvas.pinned, canvas.rules)],
                SamplerOptions(seed=0),
                vocabulary_rules(probe),
                on_step=events.append,
                should_cancel=lambda: len(events) >= k,
            )
        assert len(events) == k and len(probe.inputs) == k


def test_cancel_through_fill_documents(tiny_model: DiffusionModel) -> None:
    probe = Probe(tiny_model)
    events: list[StepEvent] = []
    with pytest.raises(FillCancelled):
        fill_documents(
            probe,
            [parse_document(s) for s in BATCH],
            SamplerOptions(seed=0),
            on_step=events.append,
            should_cancel=lambda: len(events) >= 2,
        )
    assert len(events) == 2 and len(probe.inputs) == 2


# --------------------------------------------------------------------------- value classes

CLASS_PATTERNS = {
    "int": re.compile(r" ?-?\d+"),
    "number": re.compile(r" ?-?[\d.,]+"),
    "word": re.compile(r" ?[^\W\d_]+"),
}


@pytest.mark.parametrize("schedule", ["random", "confidence"])
def test_value_classes_restrict_the_fill(tiny_model: DiffusionModel, schedule: str) -> None:
    source = (
        "Total: [MASK 4 name=a as=int] and $[MASK 3 name=b as=int]\n[MASK 3 name=c as=int]\n"
        "Price [MASK 4 name=d as=number] word [MASK 4 name=e as=word]([MASK 3 name=f as=word])\n"
        "Line: [MASK 8 name=g as=line]\n"
        '{"key": "[MASK 10 name=h as=json]"}'
    )
    document = parse_document(source)
    results = fill_documents(tiny_model, [document] * 12, SamplerOptions(schedule=schedule, temperature=1.0, seed=7))
    for result in results:
        spans = {s.name: s for s in result.spans}
        for name, cls in zip("abcdef", ["int", "int", "int", "number", "word", "word"], strict=True):
            assert CLASS_PATTERNS[cls].fullmatch(spans[name].text), (name, spans[name].text)
        for name in "bcf":  # after '$', at a line start, after '(': no space at all
            assert not spans[name].text[:1].isspace(), (name, spans[name].text)
        assert "\n" not in spans["g"].text and "\r" not in spans["g"].text
        assert not any(ch in '"\\' or ord(ch) < 0x20 for ch in spans["h"].text), spans["h"].text
        assert result.text.endswith(spans["h"].text + '"}')
    # The same positions without a class do produce such characters (so the checks above bite).
    free = fill_documents(
        tiny_model,
        [parse_document("Total: [MASK 10]")] * 12,
        SamplerOptions(schedule=schedule, temperature=1.0, seed=7),
    )
    assert not all(CLASS_PATTERNS["int"].fullmatch(r.spans[0].text) for r in free)
    assert not all(CLASS_PATTERNS["word"].fullmatch(r.spans[0].text) for r in free)


def test_a_token_that_may_be_the_whole_fill_is_a_complete_value(tiny_model: DiffusionModel) -> None:
    """One-token spans, and ranges whose later positions may all be dropped: the first token alone
    must be a value of the class, not a lone minus sign or a lone space (even when the model
    strongly prefers those)."""
    tokenizer = tiny_model.tokenizer
    minus, space, pad = encode(tokenizer, "-")[0], encode(tokenizer, " ")[0], tiny_model.special.pad
    source = (
        "Total: [MASK 1 as=int] and $[MASK 1 as=int] or [MASK 1 as=number] name [MASK 1 as=word] r $[MASK 1-3 as=int]."
    )
    canvas = canvases_for(tiny_model, [source])[0]
    boosts: dict[tuple[int, int], float] = {}
    for layout in canvas.spans:
        boosts[layout.start, minus] = boosts[layout.start, space] = 30.0
        for offset in range(1, layout.length):
            boosts[layout.start + offset, pad] = 60.0
    probe = Probe(tiny_model, position_bias(tiny_model.vocab_size, boosts))
    results = fill_documents(probe, [parse_document(source)] * 4, SamplerOptions(temperature=1.0, seed=0))
    patterns = [CLASS_PATTERNS[c] for c in ("int", "int", "number", "word", "int")]
    for result in results:
        for span, pattern in zip(result.spans, patterns, strict=True):
            assert pattern.fullmatch(span.text.lstrip(" ")), span.text
        assert len(result.spans[4].token_ids) == 1  # the padding was taken (and dropped)
        assert re.fullmatch(r"Total: \S+ and \$\S+ or \S+ name \S+ r \$\S+\.", result.text), result.text
    free = fill_documents(tiny_model, [parse_document(source)] * 32, SamplerOptions(temperature=1.0, seed=1))
    for result in free:
        for span, pattern in zip(result.spans, patterns, strict=True):
            assert pattern.fullmatch(span.text.lstrip(" ")), span.text


# --------------------------------------------------------------------------- span lengths


def test_span_of_n_tokens_yields_n_tokens(tiny_model: DiffusionModel) -> None:
    source = "A [MASK 1] b [MASK 5]\n[MASK 9 as=line] end [MASK 2 as=word]."
    results = fill_documents(tiny_model, [parse_document(source)] * 4, SamplerOptions(temperature=1.0, seed=3))
    for result in results:
        assert [len(s.token_ids) for s in result.spans] == [1, 5, 9, 2]
        assert all(tiny_model.special.pad not in s.token_ids for s in result.spans)
        for span in result.spans:
            assert result.text[span.start : span.end] == span.text


def test_range_span_drops_padding(tiny_model: DiffusionModel) -> None:
    """With padding made overwhelmingly likely, `[MASK a-b]` keeps exactly `a` tokens (padding is
    banned before `a`) and the dropped padding leaves no trace in the text."""
    pad = tiny_model.special.pad
    probe = Probe(tiny_model, token_bias(tiny_model.vocab_size, {pad: 50.0}))
    pad_text = tiny_model.tokenizer.decode([pad])
    source = "Start [MASK 2-6 name=r] middle [MASK 0-3 name=z]\n[MASK 3-5 name=w as=word] end"
    events: list[StepEvent] = []
    (result,) = fill_documents(
        probe, [parse_document(source)], SamplerOptions(temperature=1.0, seed=1), on_step=events.append
    )
    spans = {s.name: s for s in result.spans}
    assert [len(spans[n].token_ids) for n in "rzw"] == [2, 0, 3]
    assert pad_text not in result.text and all(pad not in s.token_ids for s in result.spans)
    # Padding really was sampled at the optional positions (and dropped), not avoided.
    assert sum(1 for e in events for c in e.commits if c.token_id == pad) == (6 - 2) + 3 + (5 - 3)
    decode = tiny_model.tokenizer.decode
    assert result.text == (
        # z is empty, so the space before it goes too: no trailing space before the newline.
        "Start"
        + decode(spans["r"].token_ids).rstrip(" ")
        + " middle"
        + decode(spans["z"].token_ids)
        + "\n"
        + decode(spans["w"].token_ids).lstrip(" ")
        + " end"
    )


def test_range_span_without_padding_bias_stays_in_range(tiny_model: DiffusionModel) -> None:
    results = fill_documents(
        tiny_model, [parse_document("Start [MASK 2-6] end")] * 6, SamplerOptions(temperature=1.0, seed=5)
    )
    for result in results:
        assert 2 <= len(result.spans[0].token_ids) <= 6


# --------------------------------------------------------------------------- choice and must

CHOICES = ("pear", "lemon", "banana")


@pytest.mark.parametrize("favourite", CHOICES)
def test_choice_picks_the_option_the_model_scores_best(tiny_model: DiffusionModel, favourite: str) -> None:
    tokenizer = tiny_model.tokenizer
    option_ids = {option: set(encode(tokenizer, " " + option)) for option in CHOICES}
    for option in CHOICES:  # precondition: the bias favours exactly one option
        assert option == favourite or not option_ids[option] & option_ids[favourite]
    probe = Probe(tiny_model, token_bias(tiny_model.vocab_size, dict.fromkeys(option_ids[favourite], 30.0)))
    source = 'The answer is [MASK choice="pear|lemon|banana" name=pick]. And [MASK 3] more.'
    (result,) = fill_documents(probe, [parse_document(source)], SamplerOptions(seed=0))
    assert result.text.startswith(f"The answer is {favourite}. And ")
    pick = result.spans[0]
    assert pick.name == "pick" and pick.text.strip() == favourite
    assert pick.token_ids == encode(tokenizer, " " + favourite)


def must_run(model: DiffusionModel, source: str, word: str) -> tuple[Canvas, str, list[int], list[StepEvent]]:
    """Fill with the must word's tokens made nearly impossible, so they can only come from pinning."""
    tokenizer = model.tokenizer
    banned = set(encode(tokenizer, word)) | set(encode(tokenizer, " " + word))
    probe = Probe(model, token_bias(model.vocab_size, dict.fromkeys(banned, -40.0)))
    canvas = prepare_canvas(probe, parse_document(source))
    events: list[StepEvent] = []
    (result,) = fill_documents(
        probe, [parse_document(source)], SamplerOptions(temperature=1.0, seed=2), on_step=events.append
    )
    return canvas, result.text, result.spans[0].token_ids, events


def contiguous_at(haystack: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i : i + len(needle)] == needle]


def test_must_without_offset_is_pinned_inside_the_span(tiny_model: DiffusionModel) -> None:
    canvas, text, ids, events = must_run(tiny_model, 'It arrives [MASK 8 must="Monday"] as planned.', "Monday")
    layout = canvas.spans[0]
    assert layout.joins_space
    offsets = list(layout.pinned)
    word = must_tokens(tiny_model.tokenizer, Must("Monday"), min(offsets), layout.joins_space)
    assert contiguous_at(ids, word) == [min(offsets)]
    assert "Monday" in text and text.startswith("It arrives ") and text.endswith(" as planned.")
    pinned_positions = {layout.start + o for o in offsets}
    assert not any(c.position in pinned_positions for e in events for c in e.commits)
    assert len(ids) == 8


@pytest.mark.parametrize("offset", [0, 2, 5])
def test_must_at_offset_is_pinned_there(tiny_model: DiffusionModel, offset: int) -> None:
    _, text, ids, _ = must_run(tiny_model, f'It arrives [MASK 8 must="Monday"@{offset}] as planned.', "Monday")
    word = encode(tiny_model.tokenizer, " Monday")  # mid-span, or after the moved space: spaced
    assert ids[offset : offset + len(word)] == word and len(ids) == 8
    assert "Monday" in text


def test_must_at_start_of_unspaced_span_is_not_spaced(tiny_model: DiffusionModel) -> None:
    _, text, ids, _ = must_run(tiny_model, 'Ref: ([MASK 5 must="Monday"@0])', "Monday")
    assert ids[:2] == encode(tiny_model.tokenizer, "Monday")
    assert text.startswith("Ref: (Monday")


def test_free_must_goes_where_the_model_scores_it_best(tiny_model: DiffusionModel) -> None:
    source = 'It arrives [MASK 8 must="Monday"] as planned.'
    canvas = canvases_for(tiny_model, [source])[0]
    start = canvas.spans[0].start
    word = encode(tiny_model.tokenizer, " Monday")
    best = 4
    probe = Probe(
        tiny_model, position_bias(tiny_model.vocab_size, {(start + best + i, t): 30.0 for i, t in enumerate(word)})
    )
    (result,) = fill_documents(probe, [parse_document(source)], SamplerOptions(seed=0))
    assert contiguous_at(result.spans[0].token_ids, word) == [best]


@pytest.mark.parametrize(
    "must", ['must="a very long sentence that cannot possibly fit"', 'must="a long sentence here"@1']
)
def test_must_too_long_for_its_span_names_the_span(tiny_model: DiffusionModel, must: str) -> None:
    source = f"First line\nThe reply: [MASK 3 {must}] end"
    probe = Probe(tiny_model)
    with pytest.raises(DocumentError) as info:
        fill_documents(probe, [parse_document(source)], SamplerOptions(seed=0))
    assert (info.value.line, info.value.column) == (2, len("The reply: ") + 1)
    assert not probe.inputs, "nothing may run for a document with a mistake"


# --------------------------------------------------------------------------- plans (pure functions)


def test_step_counts_examples() -> None:
    assert step_counts(7, 3) == [3, 2, 2]
    assert step_counts(19, 5) == [4, 4, 4, 4, 3]
    assert step_counts(2, 5) == [1, 1]
    assert step_counts(5, 1) == [5]
    assert step_counts(0, 4) == []


def test_block_plan_examples() -> None:
    assert block_plan(19, 5, 4) == [(4, 0), (4, 1), (4, 2), (4, 3), (3, 4)]
    assert block_plan(8, 4, 4) == [(2, 0), (2, 0), (2, 1), (2, 1)]
    assert block_plan(10, 2, 4) == [(4, 0), (4, 1), (2, 2)]  # at least one step per block
    assert block_plan(8, 3, 4) == [(4, 0), (2, 1), (2, 1)]  # the spare step goes to a later block
    assert block_plan(0, 3, 4) == []


@settings(max_examples=300, deadline=None)
@given(masks=st.integers(0, 600), steps=st.integers(1, 700))
def test_step_counts_property(masks: int, steps: int) -> None:
    counts = step_counts(masks, steps)
    assert sum(counts) == masks
    assert len(counts) == (min(steps, masks) if masks else 0)
    assert all(c >= 1 for c in counts)
    assert counts == sorted(counts, reverse=True) and (not counts or counts[0] - counts[-1] <= 1)


@settings(max_examples=300, deadline=None)
@given(masks=st.integers(0, 600), steps=st.integers(1, 700), block_length=st.integers(1, 80))
def test_block_plan_property(masks: int, steps: int, block_length: int) -> None:
    plan = block_plan(masks, steps, block_length)
    blocks = math.ceil(masks / block_length)
    assert sum(c for c, _ in plan) == masks
    assert all(c >= 1 for c, _ in plan)
    order = [b for _, b in plan]
    assert order == sorted(order) and set(order) == set(range(blocks))
    for block in range(blocks):
        assert sum(c for c, b in plan if b == block) == min(block_length, masks - block * block_length)
    assert len(plan) <= max(steps, blocks)


@settings(max_examples=200, deadline=None)
@given(blocks=st.integers(1, 20), block_length=st.integers(1, 30), steps=st.integers(1, 700))
def test_block_plan_with_whole_blocks_uses_every_step(blocks: int, block_length: int, steps: int) -> None:
    masks = blocks * block_length
    plan = block_plan(masks, steps, block_length)
    assert len(plan) == max(blocks, min(steps, masks))
    if steps >= masks:
        assert all(c == 1 for c, _ in plan)  # one token a step


@pytest.mark.parametrize("schedule", ["confidence", "left-to-right", "random"])
def test_single_spaces_keeps_a_fill_from_doubling_spaces(tiny_model: DiffusionModel, schedule: str) -> None:
    space = tiny_model.tokenizer.convert_tokens_to_ids("Ġ")  # the lone space token of byte-level BPE
    bias = token_bias(tiny_model.vocab_size, {space: 50.0})  # the model wants nothing but spaces
    source = "Dear[MASK 6]team"
    spaced = run_sampler(tiny_model, [source], SamplerOptions(schedule=schedule, seed=1, single_spaces=False), bias)
    assert "  " in tiny_model.tokenizer.decode(spaced.output.ids[0])
    single = run_sampler(tiny_model, [source], SamplerOptions(schedule=schedule, seed=1), bias)
    text = str(tiny_model.tokenizer.decode(single.output.ids[0]))
    assert "  " not in text and text.count(" ") >= 3  # spaces, every other token at most
    check_run(single)


def test_single_spaces_never_leaves_a_span_without_a_token() -> None:
    from editor.sampler import forbid_double_spaces_

    starts = torch.tensor([False, True, True, False])  # token 1 " a", token 2 " ", token 3 "b"
    ends = torch.tensor([False, False, True, False])
    ids = torch.tensor([[2, 9, 1]])  # a blank at 1 between " " and " a"
    logits = torch.zeros(1, 1, 4)
    out = forbid_double_spaces_(logits.clone(), torch.tensor([[True]]), ids, torch.tensor([[1]]), starts, ends)
    assert out[0, 0].tolist() == [0.0, float("-inf"), float("-inf"), 0.0]  # no " a" or " " after " "
    kept = forbid_double_spaces_(logits.clone(), torch.tensor([[False]]), ids, torch.tensor([[1]]), starts, ends)
    assert torch.equal(kept, logits)  # a rule that allows only edge-space tokens keeps them
