"""Fills worth keeping (issue 19): no loops, lines that stay lines, judged candidates and range
lengths, and the autoregressive judge. Fills come from tiny random models (conftest.py), which
repeat and break lines freely unless a rule stops them, so each rule is seen doing its work."""

from __future__ import annotations

import time

import pytest
import torch

from editor.benchmarks.fills import repeated_trigrams
from editor.canvas import encode
from editor.chat import Instruction
from editor.filling import fill_canvases, fill_documents, prepare_canvas, vocabulary_rules
from editor.judging import CausalJudge, SelfJudge, judge_for
from editor.models import DiffusionModel, aligned_logits
from editor.models.native import NativeDiffusionModel
from editor.options import SamplerOptions
from editor.parser import parse_document
from editor.sampler import Row, forbid_repeated_ngrams_, sample

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

SCHEDULES = ("confidence", "random", "left-to-right", "blocks")


def lettered_trigrams(model: DiffusionModel, ids: list[int]) -> list[tuple[int, int, int]]:
    """The 3-grams of `ids` with a letter in them (the whole canvas is within the rule's window)."""
    texts = vocabulary_rules(model).texts
    return [
        (a, b, c)
        for a, b, c in zip(ids, ids[1:], ids[2:], strict=False)
        if any(ch.isalpha() for t in (a, b, c) for ch in texts[t])
    ]


# --------------------------------------------------------------------------- no loops


def test_forbid_repeated_ngrams_matches_its_definition(tiny_model: DiffusionModel) -> None:
    """Random canvases: a token is banned at a masked position exactly when some placement of the
    position inside a 3-gram, the other two committed, copies a lettered 3-gram within the window
    that a fill wrote at least in part."""
    generator = torch.Generator().manual_seed(0)
    lettered = vocabulary_rules(tiny_model).lettered(torch.device("cpu"))
    words = [encode(tiny_model.tokenizer, w)[0] for w in (" the", " cat", " sat", " on", ",", ".")]
    pool = torch.tensor(words)
    window = 6
    for _ in range(30):
        ids = pool[torch.randint(len(words), (2, 16), generator=generator)]
        known = torch.rand(2, 16, generator=generator) > 0.3
        free = torch.rand(2, 16, generator=generator) > 0.5  # positions a fill wrote (the rest: literal)
        candidates = torch.stack([torch.arange(3) * 5 + 1, torch.arange(3) * 5 + 2])
        known[torch.arange(2)[:, None], candidates] = False
        free[torch.arange(2)[:, None], candidates] = True
        logits = torch.zeros(2, 3, tiny_model.vocab_size)
        forbid_repeated_ngrams_(logits, ids, candidates, known, free, lettered, 3, window)
        for row in range(2):
            for slot in range(3):
                p = int(candidates[row, slot])
                expected: set[int] = set()
                for q in range(16):
                    if q == p or abs(q - p) > window or not known[row, q]:
                        continue
                    for first in (-2, -1, 0):
                        places = [first, first + 1, first + 2]
                        mine = [p + o for o in places]
                        theirs = [q + o for o in places]
                        if min(mine + theirs) < 0 or max(mine + theirs) >= 16:
                            continue
                        others = [(m, t) for m, t in zip(mine, theirs, strict=True) if m != p]
                        if not all(known[row, m] and known[row, t] and ids[row, m] == ids[row, t] for m, t in others):
                            continue
                        gram = [int(ids[row, t]) for t in theirs]
                        if any(lettered[g] for g in gram) and any(free[row, t] for t in theirs):
                            expected.add(int(ids[row, q]))
                banned = {int(t) for t in torch.nonzero(torch.isneginf(logits[row, slot])).flatten()}
                assert banned == expected


class Favouring:
    """A `DiffusionModel` over another one that strongly prefers a few tokens everywhere: with
    " the", " cat", " sat" it writes "the cat sat the cat sat ..."; with "\n" it breaks lines."""

    def __init__(self, base: DiffusionModel, words: tuple[str, ...] = (" the", " cat", " sat")) -> None:
        self.base = base
        self.name, self.tokenizer, self.special = "favouring", base.tokenizer, base.special
        self.logits_shifted, self.vocab_size = base.logits_shifted, base.vocab_size
        self.favourites = [encode(base.tokenizer, word)[0] for word in words]

    @property
    def device(self) -> torch.device:
        return self.base.device

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.base.forward_logits(input_ids, attention_mask).clone()
        logits[..., self.favourites] += 12.0
        return logits

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        return self.base.frame(instruction)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_long_fill_repeats_no_three_word_run(tiny_model: DiffusionModel, schedule: str) -> None:
    """Over several seeds no lettered 3-gram of the canvas appears twice within 64 tokens, though
    the model would loop (it does with the rule off)."""
    model = Favouring(tiny_model)
    source = "The story begins here. [MASK 40] And then it ended."
    canvas = prepare_canvas(model, parse_document(source))
    for seed in range(4):
        repeated = {}
        for rule in (3, 0):
            options = SamplerOptions(schedule=schedule, seed=seed, temperature=1.0, no_repeat_ngram=rule)
            row = Row(canvas.ids, canvas.pinned, canvas.rules)
            output = sample(model, [row], options, vocabulary_rules(model))
            grams = lettered_trigrams(model, output.ids[0])
            repeated[rule] = len(grams) - len(set(grams))
        assert repeated[3] == 0 and repeated[0] > 10, (schedule, seed, repeated)


def test_repeated_trigrams_counts_word_loops_around_a_span() -> None:
    text = "We went home. and saw the sun and saw the sun at last."
    start = text.index("and")
    assert repeated_trigrams(text, start, start + len("and saw the sun and saw the sun")) == 2
    clean = "We went home and saw the sun at last."
    assert repeated_trigrams(clean, clean.index("and"), clean.index(" at")) == 0


# --------------------------------------------------------------------------- lines


def test_line_rules_over_many_seeds(tiny_model: DiffusionModel) -> None:
    """A span that shares its line, or sits on its own line inside a paragraph, holds no line
    break; a line-start fill opens with no blank or break; a span standing as a paragraph of its
    own may break lines (and this model, keen on line breaks, does)."""
    model = Favouring(tiny_model, ("\n", " the", " cat", " sat"))
    source = "Dear [MASK 3],\nAgenda\n[MASK 4-8]\n[MASK 4-8]\n\n[MASK 30]\n\nKind regards,\n[MASK 3]"
    breaks_in_paragraph = 0
    for seed in range(12):
        result = fill_documents(
            model, [parse_document(source)], SamplerOptions(seed=seed, temperature=1.0, candidates=1)
        )[0]
        greeting, first_item, second_item, paragraph, closing = result.spans
        for span in (greeting, first_item, second_item, closing):
            assert "\n" not in span.text and "\r" not in span.text, (seed, span.text)
        for span in (first_item, second_item, paragraph, closing):
            if span.text:
                assert not span.text[0].isspace(), (seed, span.text)
        breaks_in_paragraph += paragraph.text.count("\n")
    assert breaks_in_paragraph > 0  # the paragraph span was free to break lines, and did


# --------------------------------------------------------------------------- candidates


def test_candidates_keep_the_judges_best_and_offer_the_others(tiny_model: DiffusionModel) -> None:
    document = parse_document("Hello [MASK 4] and [MASK 3] there.")
    options = SamplerOptions(seed=3, candidates=4)
    [result] = fill_documents(tiny_model, [document], options)
    assert result.judge == "self" and result.score is not None
    canvas = prepare_canvas(tiny_model, document)
    judge = judge_for(tiny_model)
    # Every candidate rendered and scored again: the kept one scores best.
    from editor.filling import candidate_rows

    rows = candidate_rows(canvas, 3, options, tiny_model.special.end_ids[0])
    output = sample(tiny_model, rows, options, vocabulary_rules(tiny_model))
    from editor.canvas import render

    texts = [
        render(canvas, ids, c, tiny_model.tokenizer, tiny_model.special.end_ids).text
        for ids, c in zip(output.ids, output.confidences, strict=True)
    ]
    scores = judge.score([canvas] * 4, output.ids, texts)
    assert result.text == texts[max(range(4), key=scores.__getitem__)]
    assert result.score == pytest.approx(max(scores))
    for number, span in enumerate(result.spans):
        offered = [alternative.text for alternative in span.alternatives]
        assert span.text not in offered and len(offered) == len(set(offered))
        others = {
            render(canvas, ids, c, tiny_model.tokenizer, tiny_model.special.end_ids).spans[number].text
            for ids, c in zip(output.ids, output.confidences, strict=True)
        }
        assert set(offered) == others - {span.text}
        assert [a.score for a in span.alternatives] == sorted((a.score for a in span.alternatives), reverse=True)
    # Reproducible from the seed; one candidate offers nothing.
    assert fill_documents(tiny_model, [document], options)[0].text == result.text
    [single] = fill_documents(tiny_model, [document], SamplerOptions(seed=3, candidates=1))
    assert all(not span.alternatives for span in single.spans) and single.score is None


def test_a_greedy_row_fills_the_same_beside_sampled_rows(tiny_model: DiffusionModel) -> None:
    canvas = prepare_canvas(tiny_model, parse_document("One [MASK 6] two [MASK 5] three."))
    rules = vocabulary_rules(tiny_model)
    options = SamplerOptions(seed=1)
    alone = sample(tiny_model, [Row(canvas.ids, canvas.pinned, canvas.rules, seed=5)], options, rules)
    mixed = sample(
        tiny_model,
        [Row(canvas.ids, canvas.pinned, canvas.rules, seed=5)]
        + [Row(canvas.ids, canvas.pinned, canvas.rules, seed=s, temperature=0.7) for s in (6, 7)],
        options,
        rules,
    )
    assert mixed.ids[0] == alone.ids[0]
    assert mixed.ids[1] != mixed.ids[2]  # the sampled rows drew their own tokens


def test_range_candidates_try_lengths_across_the_range(tiny_model: DiffusionModel) -> None:
    """With range spans the other candidates are cut at the range's least and a third and two
    thirds of the way up, the tail pinned to the end token; whichever the judge keeps lies in the range."""
    from editor.filling import candidate_rows

    document = parse_document("Start [MASK 2-10] middle [MASK 4] end.")
    canvas = prepare_canvas(tiny_model, document)
    end = tiny_model.special.end_ids[0]
    rows = candidate_rows(canvas, 0, SamplerOptions(candidates=4), end)
    layout = canvas.spans[0]
    kept = [
        sum(1 for o in range(layout.length) if row.ids[layout.start + o] != end or not row.pinned[layout.start + o])
        for row in rows
    ]
    assert kept == [10, 2, 5, 7]
    assert all(
        row.ids[canvas.spans[1].start : canvas.spans[1].start + 4]
        == canvas.ids[canvas.spans[1].start : canvas.spans[1].start + 4]
        for row in rows
    )
    for seed in range(4):
        [result] = fill_documents(tiny_model, [document], SamplerOptions(seed=seed, candidates=4))
        assert 2 <= len(result.spans[0].token_ids) <= 10


# --------------------------------------------------------------------------- judges


def test_causal_judge_scores_text_left_to_right(tiny_model: NativeDiffusionModel) -> None:
    """A causal pass at position i equals a bidirectional pass over the first i + 1 tokens, so the
    judge's log P(text) is the chain rule computed prefix by prefix."""
    network = tiny_model.network
    tokenizer = tiny_model.tokenizer
    bos = tiny_model.special.bos if tiny_model.special.bos is not None else tiny_model.special.pad
    judge = CausalJudge(network, tokenizer, bos, tiny_model.special.pad)
    texts = ["the cat sat on the mat.", "a dog."]
    scores = judge.text_log_probs(texts)
    for text, score in zip(texts, scores, strict=True):
        ids = [bos, *encode(tokenizer, text)]
        expected = 0.0
        with torch.inference_mode():
            for i in range(1, len(ids)):
                logits = network(torch.tensor([ids[:i]]))[0, -1].float()
                expected += float(torch.log_softmax(logits, dim=-1)[ids[i]])
        assert score == pytest.approx(
            expected, abs=0.02
        )  # kernels differ by float32 rounding; a shift by one token differs by nats


def test_models_without_a_twin_judge_themselves(tiny_model: DiffusionModel) -> None:
    assert isinstance(judge_for(tiny_model), SelfJudge)
    canvas = prepare_canvas(tiny_model, parse_document("Hello [MASK 3] there."))
    [result] = fill_canvases(tiny_model, [canvas], SamplerOptions(seed=0, candidates=1))
    filled = list(canvas.ids)
    layout = canvas.spans[0]
    filled[layout.start : layout.start + 3] = result.spans[0].token_ids
    [score] = judge_for(tiny_model).score([canvas], [filled], [result.text])
    # The definition: the span masked again, the mean log-probability of its tokens.
    masked = list(filled)
    masked[layout.start : layout.start + 3] = [tiny_model.special.mask] * 3
    with torch.inference_mode():
        ids = torch.tensor([masked])
        logits = aligned_logits(tiny_model, ids, torch.ones_like(ids, dtype=torch.bool))[0].float()
    log_probs = torch.log_softmax(logits[layout.start : layout.start + 3], dim=-1)
    tokens = torch.tensor(result.spans[0].token_ids)
    assert score == pytest.approx(float(log_probs.gather(-1, tokens[:, None]).mean()), abs=1e-4)


def test_a_fill_loops_neither_in_words_nor_in_digits(tiny_model: DiffusionModel) -> None:
    """Digits and punctuation repeat in real text ("1990 and 1995"), so their 3-grams are free, but
    not a run of six: "0.1.0.1.0.1" is a loop (it is what this model writes with the rule off)."""
    model = Favouring(tiny_model, ("0", ".", "1"))
    canvas = prepare_canvas(model, parse_document("Version [MASK 24] released."))
    for seed in range(3):
        repeated = {}
        for rule in (3, 0):
            options = SamplerOptions(seed=seed, temperature=1.0, no_repeat_ngram=rule)
            output = sample(model, [Row(canvas.ids, canvas.pinned, canvas.rules)], options, vocabulary_rules(model))
            ids = output.ids[0]
            grams = [tuple(ids[i : i + 6]) for i in range(len(ids) - 5)]
            repeated[rule] = len(grams) - len(set(grams))
        assert repeated[3] == 0 and repeated[0] > 0, (seed, repeated)


def test_a_blank_candidate_is_not_kept_while_another_is_not(tiny_model: DiffusionModel) -> None:
    """A lone space is a valid token for a span's first place, but a fill that asked for at least
    one token and shows nothing is never the one kept, however the judge scores it."""
    from editor.canvas import render
    from editor.filling import judged_results

    canvas = prepare_canvas(tiny_model, parse_document("Title: [MASK 1-3]\nNext"))
    layout = canvas.spans[0]
    space, word = encode(tiny_model.tokenizer, " ")[0], encode(tiny_model.tokenizer, " cat")[0]
    end = tiny_model.special.end_ids[0]
    blank, worded = list(canvas.ids), list(canvas.ids)
    blank[layout.start : layout.start + 3] = [space, end, end]
    worded[layout.start : layout.start + 3] = [word, end, end]
    assert (
        render(canvas, blank, [1.0] * len(blank), tiny_model.tokenizer, tiny_model.special.end_ids)
        .spans[0]
        .text.strip()
        == ""
    )
    confidences = [1.0] * len(blank)
    expected = render(canvas, worded, confidences, tiny_model.tokenizer, tiny_model.special.end_ids).spans[0].text
    assert expected.strip()
    options = SamplerOptions(candidates=2)
    for order in ([blank, worded], [worded, blank]):
        [result] = judged_results(
            tiny_model,
            [canvas],
            [(ids, confidences) for ids in order],
            options,
            seed=0,
            steps=1,
            started=time.perf_counter(),
        )
        assert result.spans[0].text == expected


def test_causal_span_scores_split_the_text_log_probability_by_segment(tiny_model: NativeDiffusionModel) -> None:
    """Each segment's score is the log-probability of the tokens that start in it, per character:
    the segments' totals and the unsegmented prefix add up to log P(text)."""
    bos = tiny_model.special.bos if tiny_model.special.bos is not None else tiny_model.special.pad
    judge = CausalJudge(tiny_model.network, tiny_model.tokenizer, bos, tiny_model.special.pad)
    text = "Dear Anna, thank you for the red shoes. Best, Tom"
    segments = [(5, 10), (10, 44), (44, len(text))]
    [per_char] = judge.span_scores([], [], [text], [segments])
    [total] = judge.text_log_probs([text])
    [prefix] = judge.text_log_probs([text[:5]])  # "Dear " tokenizes alike on its own here
    assert prefix + sum(score * (end - start) for score, (start, end) in zip(per_char, segments, strict=True)) == (
        pytest.approx(total, abs=0.05)
    )
    assert all(score < 0 for score in per_char)


class WordJudge:
    """Scores a text by how many liked words it holds (per character), and a segment likewise."""

    name = "words"

    def __init__(self, liked: set[str]) -> None:
        self.liked = liked

    def _value(self, text: str) -> float:
        return sum(word.strip(".,") in self.liked for word in text.split()) / max(1, len(text))

    def score(self, canvases: object, filled: object, texts: list[str]) -> list[float]:
        return [self._value(text) for text in texts]

    def span_scores(
        self, canvases: object, filled: object, texts: list[str], segments: list[list[tuple[int, int]]]
    ) -> list[list[float]]:
        return [[self._value(text[a:b]) for a, b in ranges] for text, ranges in zip(texts, segments, strict=True)]


def test_each_span_may_come_from_a_different_candidate(
    tiny_model: DiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Candidate 1 wrote the better first span and candidate 2 the better second: with per-span
    choice the kept document has both (and the judge prefers it as a whole); per document it has one."""
    from editor.filling import judged_results

    monkeypatch.setattr("editor.filling.judge_for", lambda model: WordJudge({"sun", "moon"}))
    canvas = prepare_canvas(tiny_model, parse_document("I saw the [MASK 1-4] and the [MASK 1-4] today."))
    end = tiny_model.special.end_ids[0]

    def spelt(word: str) -> list[int]:
        tokens = encode(tiny_model.tokenizer, f" {word}")
        return tokens + [end] * (4 - len(tokens))

    candidates = []
    for one, two in (("cat", "dog"), ("sun", "dog"), ("cat", "moon")):
        ids = list(canvas.ids)
        for layout, word in zip(canvas.spans, (one, two), strict=True):
            ids[layout.start : layout.start + 4] = spelt(word)
        candidates.append((ids, [1.0] * len(ids)))
    options = SamplerOptions(candidates=3)
    [mixed] = judged_results(tiny_model, [canvas], candidates, options, seed=0, steps=1, started=time.perf_counter())
    assert mixed.text == "I saw the sun and the moon today."
    assert [alt.text.strip() for alt in mixed.spans[0].alternatives] == ["cat"]
    [whole] = judged_results(
        tiny_model, [canvas], candidates, options, seed=0, steps=1, started=time.perf_counter(), per_span=False
    )
    assert whole.text in ("I saw the sun and the dog today.", "I saw the cat and the moon today.")


class ShortestJudge(WordJudge):
    """Prefers the shortest text: every cut a judge may choose shows."""

    def _value(self, text: str) -> float:
        return -float(len(text))


def test_a_range_span_may_end_after_a_sentence_it_wrote(
    tiny_model: DiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fill that runs on past a full stop ("... shoe. Light and fast. It is") is offered cut after
    its last sentence ends; the judge takes a cut it prefers; a pinned word or the span's least
    length is never cut away, and a fill followed by punctuation is left whole."""
    from editor.filling import judged_results

    monkeypatch.setattr("editor.filling.judge_for", lambda model: ShortestJudge(set()))
    fill = encode(tiny_model.tokenizer, " A red shoe. Light and fast. It is")
    end = tiny_model.special.end_ids[0]

    def judged(source: str, tokens: list[int]) -> str:
        canvas = prepare_canvas(tiny_model, parse_document(source))
        ids = list(canvas.ids)
        layout = canvas.spans[0]
        ids[layout.start : layout.start + layout.length] = tokens + [end] * (layout.length - len(tokens))
        pair = (ids, [1.0] * len(ids))
        [result] = judged_results(
            tiny_model,
            [canvas],
            [pair, pair],
            SamplerOptions(candidates=2),
            seed=0,
            steps=1,
            started=time.perf_counter(),
        )
        return result.text

    n = len(fill)
    assert judged(f"Description:[MASK 2-{n}]\nNext", fill) == "Description: A red shoe.\nNext"
    # The least length reaches past the first full stop: only the second is a place to end.
    least = len(encode(tiny_model.tokenizer, " A red shoe. Light")) + 1
    assert judged(f"Description:[MASK {least}-{n}]\nNext", fill) == "Description: A red shoe. Light and fast.\nNext"
    assert judged(f"Description:[MASK {n}]\nNext", fill) == "Description: A red shoe. Light and fast. It is\nNext"
    # Punctuation after the span: the cuts fall just before the fill's own stops, never doubling one.
    assert judged(f"Description:[MASK 2-{n}]. Next", fill) == "Description: A red shoe. Next"
    assert judged(f"Description:[MASK 2-{n}]", fill) == "Description: A red shoe."  # the document's end
    monday = encode(tiny_model.tokenizer, " on Monday.")
    assert judged(f"It comes[MASK 2-{len(monday)}].", monday) == "It comes on Monday."


class LongestJudge(WordJudge):
    """Prefers the longest text, as a per-character judge can prefer a long predictable tail."""

    def _value(self, text: str) -> float:
        return float(len(text))


def test_an_unfinished_tail_at_a_line_end_goes_whatever_the_judge_prefers(
    tiny_model: DiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A span that ends its line and runs on past its last full stop into words that finish no
    sentence ends after that stop; mid-line the judge decides; a title's stop ("Dr.") is no end."""
    from editor.filling import judged_results

    monkeypatch.setattr("editor.filling.judge_for", lambda model: LongestJudge(set()))
    end = tiny_model.special.end_ids[0]

    def judged(source: str, words: str) -> str:
        fill = encode(tiny_model.tokenizer, words)
        canvas = prepare_canvas(tiny_model, parse_document(source.replace("{n}", str(len(fill)))))
        ids = list(canvas.ids)
        layout = canvas.spans[0]
        ids[layout.start : layout.start + layout.length] = fill + [end] * (layout.length - len(fill))
        pair = (ids, [1.0] * len(ids))
        [result] = judged_results(
            tiny_model, [canvas], [pair, pair], SamplerOptions(candidates=2), seed=0, steps=1, started=0.0
        )
        return result.text

    tail = " A red shoe. Light and fast. It is"
    assert judged("Description:[MASK 2-{n}]\nNext", tail) == "Description: A red shoe. Light and fast.\nNext"
    assert judged("Description:[MASK 2-{n}]", tail) == "Description: A red shoe. Light and fast."
    assert (
        judged("Description:[MASK 2-{n}] and more", tail) == "Description: A red shoe. Light and fast. It is and more"
    )
    assert judged("Made by[MASK 2-{n}]\nNext", " Dr. Smith and") == "Made by Dr. Smith and\nNext"
    assert judged("Made by[MASK 2-{n}]\nNext", " Anna. She is") == "Made by Anna.\nNext"


def test_a_mix_of_candidates_that_would_repeat_itself_is_not_kept(
    tiny_model: DiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each candidate obeys the no-repeat rule on its own; two spans taken from two candidates may
    not: the judge's favourite fill of each span is "the red sun", and the mix that says it twice
    is refused for a whole candidate."""
    from editor.filling import judged_results

    monkeypatch.setattr("editor.filling.judge_for", lambda model: WordJudge({"sun"}))
    canvas = prepare_canvas(tiny_model, parse_document("I saw [MASK 1-8] and [MASK 1-8] today."))
    end = tiny_model.special.end_ids[0]
    candidates = []
    for one, two in (("a cat", "a dog"), ("the red sun", "a dog"), ("a cat", "the red sun")):
        ids = list(canvas.ids)
        for layout, words in zip(canvas.spans, (one, two), strict=True):
            tokens = encode(tiny_model.tokenizer, f" {words}")
            ids[layout.start : layout.start + 8] = tokens + [end] * (8 - len(tokens))
        candidates.append((ids, [1.0] * len(ids)))
    [result] = judged_results(
        tiny_model, [canvas], candidates, SamplerOptions(candidates=3), seed=0, steps=1, started=time.perf_counter()
    )
    assert result.text in ("I saw the red sun and a dog today.", "I saw a cat and the red sun today.")
