"""The fast engine (docs/engine.md): the cached path against the uncached one, position-only logits
against the full pass, the factor schedule's rule, per-row seeds in batches, and lazy step events.
All on tiny random models on the CPU; speed is measured by `editor bench engine`, not here."""

from __future__ import annotations

import pytest
import torch

from editor.filling import fill_documents, prepare_canvas, vocabulary_rules
from editor.models import NativeDiffusionModel, aligned_logits
from editor.models.graphs import WindowGraphs, bucket, pad_columns
from editor.models.native import FOLD_REFRESH_FLOPS
from editor.options import SamplerOptions
from editor.parser import parse_document
from editor.sampler import Row, SampleOutput, SamplerRun, StepEvent, pad_rows, sample

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

SOURCES = [
    "Dear [MASK 9], your [MASK 5] will reach you on [MASK 3].",
    "The cat sat on the [MASK 12] and looked at the garden.",
    "[MASK 4] and [MASK 7]",
]


def rows_for(model: NativeDiffusionModel, sources: list[str]) -> list[Row]:
    canvases = [prepare_canvas(model, parse_document(s)) for s in sources]
    return [Row(c.ids, c.pinned, c.rules) for c in canvases]


def run(model: NativeDiffusionModel, rows: list[Row], options: SamplerOptions) -> tuple[SampleOutput, list[StepEvent]]:
    events: list[StepEvent] = []
    output = sample(model, rows, options, vocabulary_rules(model), on_step=events.append)
    return output, events


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("schedule", ["confidence", "blocks", "threshold", "left-to-right"])
def test_cache_refreshed_every_step_equals_the_uncached_fill(
    tiny_model: NativeDiffusionModel, tiny_shifted_model: NativeDiffusionModel, shifted: bool, schedule: str
) -> None:
    model = tiny_shifted_model if shifted else tiny_model
    rows = rows_for(model, SOURCES)
    options = SamplerOptions(schedule=schedule, steps=8, block_length=4, seed=3, cache=False)
    plain, plain_events = run(model, rows, options)
    cached, cached_events = run(model, rows, options.model_copy(update={"cache": True, "cache_refresh_every": 1}))
    assert cached.ids == plain.ids
    assert [e.commits for e in cached_events] == [e.commits for e in plain_events]


@pytest.mark.parametrize("shifted", [False, True])
def test_a_window_step_scores_like_the_full_pass(
    tiny_model: NativeDiffusionModel, tiny_shifted_model: NativeDiffusionModel, shifted: bool
) -> None:
    """With a fresh cache, recomputing any window that holds the scored positions (and, shifted,
    the positions left of them) gives the full pass's logits there, in padded batches too."""
    model = tiny_shifted_model if shifted else tiny_model
    ids, _, attention = pad_rows(rows_for(model, SOURCES[:2]), model.special.pad, model.device)
    at = torch.tensor([[5, 6, 7, 9], [8, 9, 10, 11]])
    full = aligned_logits(model, ids, attention)  # [2, L, V]
    expected = full.gather(1, at[..., None].expand(-1, -1, full.shape[-1]))
    with torch.inference_mode():
        scored, cache = model.score(ids, attention, at, keep_cache=True)
        assert cache is not None
        torch.testing.assert_close(scored.float(), expected, atol=1e-5, rtol=1e-5)
        window = torch.tensor([[4, 5, 6, 7, 8, 9], [7, 8, 9, 10, 11, 2]])
        windowed = model.score_window(cache, ids, window, at)
    torch.testing.assert_close(windowed.float(), expected, atol=1e-5, rtol=1e-5)


def test_cached_fill_keeps_every_invariant(tiny_model: NativeDiffusionModel) -> None:
    """The default cached path: pins kept, every mask filled, each row on its own schedule."""
    rows = rows_for(tiny_model, SOURCES)
    output, events = run(tiny_model, rows, SamplerOptions(steps=5, seed=1))
    mask = tiny_model.special.mask
    for row, ids in zip(rows, output.ids, strict=True):
        assert mask not in ids
        assert all(new == old for new, old, pin in zip(ids, row.ids, row.pinned, strict=True) if pin)
    for index, row in enumerate(rows):
        masks = sum(not p for p in row.pinned)
        counts = [sum(1 for c in e.commits if c.row == index) for e in events]
        base, extra = divmod(masks, 5)
        assert counts == [base + (1 if s < extra else 0) for s in range(5)]


def test_factor_commits_the_top_n_its_rule_allows(tiny_model: NativeDiffusionModel) -> None:
    """Each step of the factor schedule commits the n best positions, n the largest with
    (n + 1) * (1 - c_n) < factor over the confidences c sorted high to low, at least one."""
    rows = rows_for(tiny_model, [SOURCES[1]])
    for factor in (0.5, 2.0, 6.0):
        options = SamplerOptions(schedule="factor", factor=factor, seed=0, cache=False)
        output, events = run(tiny_model, rows, options)
        assert tiny_model.special.mask not in output.ids[0]
        for event in events:
            candidates, _, _, confidence, _ = event._tensors
            ranked = sorted(confidence[0, : candidates.shape[1]].tolist(), reverse=True)
            allowed = 0
            for n, c in enumerate(ranked, start=1):
                if (n + 1) * (1 - c) >= factor:
                    break
                allowed = n
            assert len(event.commits) == max(1, allowed)


def test_each_row_reproduces_from_its_seed_alone_or_batched(tiny_model: NativeDiffusionModel) -> None:
    """Per-row generators: a random fill of one document equals the same document's row in a batch
    when the row carries the same seed, whatever else the batch holds."""
    options = SamplerOptions(schedule="random", temperature=1.0, steps=4)
    rows = rows_for(tiny_model, SOURCES)
    alone = [
        run(tiny_model, [Row(r.ids, r.pinned, r.rules, seed=40 + i)], options)[0].ids[0] for i, r in enumerate(rows)
    ]
    batched = [Row(r.ids, r.pinned, r.rules, seed=40 + i) for i, r in enumerate(rows)]
    output, _ = run(tiny_model, batched[::-1], options)
    assert output.ids[::-1] == alone
    assert output.row_seeds == [42, 41, 40]


def test_a_one_document_fill_keeps_its_reported_seed(tiny_model: NativeDiffusionModel) -> None:
    document = parse_document(SOURCES[0])
    options = SamplerOptions(temperature=1.0, steps=3, seed=77)
    [first] = fill_documents(tiny_model, [document], options)
    [second] = fill_documents(tiny_model, [document, parse_document(SOURCES[1])], options)[:1]
    assert first.seed == second.seed == 77 and first.text == second.text


def test_step_events_read_the_device_only_when_asked(tiny_model: NativeDiffusionModel) -> None:
    rows = rows_for(tiny_model, SOURCES[:1])
    output, events = run(tiny_model, rows, SamplerOptions(steps=3, seed=0))
    assert all("commits" not in vars(e) for e in events)  # nothing converted yet
    assert [len(e.commits) for e in events] == [6, 6, 5]
    assert events[-1].remaining == [0]
    assert output.row_steps == [3]


def assert_same_fills(got: list[tuple[list[int], list[float]]], expected: list[tuple[list[int], list[float]]]) -> None:
    """Same tokens, and the same confidences up to float rounding (batch shapes change the order of
    a few sums), which also catches a cache refreshed at another step when the tokens agree."""
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    for (_, confidences), (_, wanted) in zip(got, expected, strict=True):
        assert confidences == pytest.approx(wanted, abs=1e-5)


def test_only_a_small_graphed_model_folds_a_refresh_into_the_window_run(
    tiny_model: NativeDiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU (no CUDA graphs) a refresh always runs apart; with graphs the bundled model folds
    it at 8 rows of 512 positions, and a model with 7B parameters in its layers does not at 256 positions."""
    assert tiny_model.window_graphs is None
    assert not tiny_model.refresh_in_window(1, 8)
    monkeypatch.setattr(tiny_model, "fold_refresh_flops", FOLD_REFRESH_FLOPS)
    assert tiny_model.refresh_in_window(8, 512)
    monkeypatch.setattr(tiny_model, "_layer_parameters", 6_500_000_000)
    assert not tiny_model.refresh_in_window(1, 256)


def _refreshed_apart(*args: object, **kwargs: object) -> None:
    raise AssertionError("a refresh ran apart from the window run")


JOIN_OPTIONS = [
    SamplerOptions(seed=5),  # confidence, cache refreshed every 4 of a row's own steps
    SamplerOptions(schedule="blocks", block_length=4, steps=9, cache_refresh_every=None, seed=5),
    SamplerOptions(schedule="random", temperature=1.0, steps=7, seed=5),
    SamplerOptions(schedule="threshold", threshold=0.05, temperature=0.7, top_p=0.9, seed=5),
    SamplerOptions(schedule="factor", factor=2.0, steps=6, cache=False, seed=5),
]


@pytest.mark.parametrize("fold", [False, True], ids=["refresh-apart", "refresh-in-window"])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("options", JOIN_OPTIONS, ids=lambda o: f"{o.schedule}-t{o.temperature}-cache{o.cache}")
def test_a_row_fills_the_same_alone_batched_or_joining_mid_run(
    tiny_model: NativeDiffusionModel,
    tiny_shifted_model: NativeDiffusionModel,
    shifted: bool,
    options: SamplerOptions,
    fold: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Continuous batching's invariant: plan, cache refreshes and random draws follow each row's
    own steps, so a row joining a running batch (of other lengths) fills exactly as alone, and the
    rows already running are not disturbed by it joining or by others leaving; whether the rows due
    for a refresh get a full pass apart or ride in the window run widened to their whole canvas
    (as a small model on CUDA does)."""
    model = tiny_shifted_model if shifted else tiny_model
    monkeypatch.setattr(model, "fold_refresh_flops", float("inf") if fold else 0.0)
    if fold:  # (the same runs without folding do refresh some rows apart: see `refresh-apart`)
        monkeypatch.setattr(SamplerRun, "_refresh_apart", _refreshed_apart)
    vocabulary = vocabulary_rules(model)
    # The last row is the widest and finishes first: the batch narrows while the others run.
    wide = "A long line of literal text that goes on and on before [MASK 2] and still goes on after it."
    rows = [Row(r.ids, r.pinned, r.rules, seed=60 + i) for i, r in enumerate(rows_for(model, [*SOURCES, wide]))]
    assert len(rows[3].ids) > max(len(row.ids) for row in rows[:3])
    solo = [sample(model, [row], options, vocabulary) for row in rows]
    alone = [(output.ids[0], output.confidences[0]) for output in solo]
    together = sample(model, rows, options, vocabulary)
    assert_same_fills(list(zip(together.ids, together.confidences, strict=True)), alone)
    with torch.inference_mode():
        running = SamplerRun(model, rows[1:2], options, vocabulary)
        (first,) = running.keys
        running.step()
        running.step()
        joined = running.add([rows[0], rows[2], rows[3]])  # longer and shorter canvases, mid-run
        widths = [running.width]
        done: dict[int, tuple[list[int], list[float]]] = {}
        while not running.finished:
            running.step()
            finished = [key for key in running.keys if running.row_done(key)]
            done |= {key: running.row_output(key)[:2] for key in finished}
            running.remove(finished)  # each row leaves as soon as it is done
            widths.append(running.width)
    assert_same_fills([done[joined[0]], done[first], done[joined[1]], done[joined[2]]], alone)
    assert widths[0] > widths[-2] > 0  # the widest row left mid-run


PLANNED_OPTIONS = [
    SamplerOptions(seed=5),
    SamplerOptions(schedule="blocks", block_length=4, steps=9, cache_refresh_every=None, seed=5),
    SamplerOptions(schedule="blocks", block_length=3, cache_refresh_every=2, seed=5),
    SamplerOptions(schedule="random", temperature=1.0, steps=7, seed=5),
    SamplerOptions(schedule="left-to-right", steps=5, cache_refresh_every=None, seed=5),
    SamplerOptions(schedule="margin", cache=False, seed=5),
]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("options", PLANNED_OPTIONS, ids=lambda o: f"{o.schedule}-b{o.block_length}-cache{o.cache}")
def test_a_planned_run_knows_its_counts_without_reading_them(
    tiny_model: NativeDiffusionModel, tiny_shifted_model: NativeDiffusionModel, shifted: bool, options: SamplerOptions
) -> None:
    """Under every schedule but threshold/factor the host follows the plans instead of reading the
    device each step: after every step of a padded batch that rows join and leave, its masks left and
    next candidate widths equal the device's, its window widths are at least the device's wherever
    a window runs (exactly, unshifted), and the fill equals the one that reads them."""
    model = tiny_shifted_model if shifted else tiny_model
    vocabulary = vocabulary_rules(model)
    wide = "A long line of literal text that goes on and on before [MASK 2] and still goes on after it."
    rows = [Row(r.ids, r.pinned, r.rules, seed=60 + i) for i, r in enumerate(rows_for(model, [*SOURCES, wide]))]

    def run(follow_plan: bool) -> dict[int, tuple[list[int], list[float]]]:
        done: dict[int, tuple[list[int], list[float]]] = {}
        with torch.inference_mode():
            running = SamplerRun(model, rows[1:2], options, vocabulary)
            assert running.follows_plan  # every schedule here is planned
            running.follows_plan = follow_plan  # False: read the counts back, as threshold/factor do
            steps = 0
            while not running.finished:
                running.step()
                steps += 1
                if steps == 2:
                    running.add([rows[0], rows[2], rows[3]])
                scoring = running._scoring(running.masked, running.plan.at(running._row_step)[1])
                assert running._counts == running.masked.sum(dim=1).tolist()
                assert running._scored_counts == scoring.sum(dim=1).tolist()
                if running.windowed:  # a row starting a block (or refreshing) runs a full pass instead
                    actual = running._window_mask.sum(dim=1).tolist()
                    used = [i for i in range(len(actual)) if not running._refresh_due(i)]
                    assert all(running._window_counts[i] >= actual[i] for i in used)
                    if not shifted:
                        assert running._window_counts == actual
                finished = [key for key in running.keys if running.row_done(key)]
                done |= {key: running.row_output(key)[:2] for key in finished}
                running.remove(finished)
        return done

    followed, read_back = run(True), run(False)
    assert sorted(followed) == sorted(read_back) == list(range(len(rows)))
    assert_same_fills([followed[key] for key in range(4)], [read_back[key] for key in range(4)])


def test_graph_buckets_cover_each_width_with_little_padding() -> None:
    widths = range(1, 2049)
    buckets = [bucket(width) for width in widths]
    assert all(b >= w for b, w in zip(buckets, widths, strict=True))
    assert all(b - w < max(8, w / 4) for b, w in zip(buckets, widths, strict=True))  # a quarter at most
    assert buckets == sorted(buckets)
    assert len(set(buckets)) <= 4 * 9  # about four shapes per octave: few graphs per fill
    assert pad_columns(torch.tensor([[4, 5, 6]]), 5).tolist() == [[4, 5, 6, 4, 4]]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("max_graphs", [2, 48])
@pytest.mark.parametrize("options", JOIN_OPTIONS[:4], ids=lambda o: f"{o.schedule}-t{o.temperature}")
def test_window_steps_run_through_graph_buckets_fill_as_eager_ones(
    tiny_model: NativeDiffusionModel,
    tiny_shifted_model: NativeDiffusionModel,
    monkeypatch: pytest.MonkeyPatch,
    shifted: bool,
    max_graphs: int,
    options: SamplerOptions,
) -> None:
    """The CUDA-graph path's bookkeeping, run eagerly: windows and scored positions padded to
    their buckets, the cache bound to a static slab, graphs dropped beyond the limit. A padded,
    batched fill (rows of four lengths) comes out exactly as the plain window steps give it."""
    model = tiny_shifted_model if shifted else tiny_model
    vocabulary = vocabulary_rules(model)
    wide = "A long line of literal text that goes on and on before [MASK 2] and still goes on after it."
    rows = [Row(r.ids, r.pinned, r.rules, seed=60 + i) for i, r in enumerate(rows_for(model, [*SOURCES, wide]))]
    eager = sample(model, rows, options, vocabulary)
    graphs = WindowGraphs(model.network, max_graphs=max_graphs, capture=False)
    monkeypatch.setattr(model, "window_graphs", graphs)
    graphed = sample(model, rows, options, vocabulary)
    assert_same_fills(
        list(zip(graphed.ids, graphed.confidences, strict=True)),
        list(zip(eager.ids, eager.confidences, strict=True)),
    )
    assert graphs.captures > 0 and graphs.replays > 0  # the padded path did run
    assert len(graphs._graphs) <= max_graphs


@pytest.mark.parametrize("sources", [SOURCES[:1] * 2, SOURCES[:2]], ids=["same-shape", "two-lengths"])
def test_two_runs_stepped_in_turn_keep_their_own_caches(
    tiny_shifted_model: NativeDiffusionModel, monkeypatch: pytest.MonkeyPatch, sources: list[str]
) -> None:
    """Two sampler runs stepped in turn: of one shape, they bind the same static keys/values and
    each takes the slab over from the other; of two canvas lengths with room for one slab, each
    step evicts the other's slab and graphs. Both must fill exactly as when run alone."""
    model = tiny_shifted_model
    vocabulary = vocabulary_rules(model)
    runs_rows = [rows_for(model, [source]) for source in sources]
    runs_options = [
        SamplerOptions(schedule="random", temperature=1.0, cache_refresh_every=None, seed=s) for s in (1, 2)
    ]
    alone = [sample(model, rows, options, vocabulary) for rows, options in zip(runs_rows, runs_options, strict=True)]
    graphs = WindowGraphs(model.network, max_slabs=1, capture=False)
    monkeypatch.setattr(model, "window_graphs", graphs)
    with torch.inference_mode():
        runs = [
            SamplerRun(model, rows, options, vocabulary) for rows, options in zip(runs_rows, runs_options, strict=True)
        ]
        while not all(run.finished for run in runs):
            for run in runs:
                run.step()
    assert [run.output().ids for run in runs] == [output.ids for output in alone]
    assert alone[0].ids != alone[1].ids  # the two runs did write different keys/values
    assert graphs.replays > 0


def test_blocks_score_and_recompute_only_the_active_block(
    tiny_shifted_model: NativeDiffusionModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `blocks`, a step scores only its active block's masked positions and its window holds
    just those, the tokens committed the step before and (shifted) their left neighbours: the
    masked positions of later blocks keep their cached keys/values (Fast-dLLM's dual cache)."""
    model = tiny_shifted_model
    shapes: list[tuple[int, int]] = []
    score_window = NativeDiffusionModel.score_window

    def recording(
        self: NativeDiffusionModel, cache: object, ids: torch.Tensor, window: torch.Tensor, at: torch.Tensor
    ) -> torch.Tensor:
        shapes.append((window.shape[1], at.shape[1]))
        return score_window(self, cache, ids, window, at)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeDiffusionModel, "score_window", recording)
    rows = rows_for(model, ["[MASK 20] and then [MASK 12]"])
    options = SamplerOptions(schedule="blocks", block_length=8, steps=16, cache_refresh_every=None, seed=0)
    output, events = run(model, rows, options)
    assert model.special.mask not in output.ids[0]
    assert len(shapes) == 16 - 4  # every step but the four block starts (full passes)
    assert max(scored for _, scored in shapes) <= 8  # never more than one block scored
    # one block, the 2 tokens committed the step before, and the left neighbours of the block's runs
    assert max(window for window, _ in shapes) <= 8 + 2 + 2
    masked = [i for i, pinned in enumerate(rows[0].pinned) if not pinned]
    blocks = [masked[i : i + 8] for i in range(0, len(masked), 8)]
    committed = [c.position for e in events for c in e.commits]
    assert sorted(committed[:8]) == blocks[0] and sorted(committed[8:16]) == blocks[1]  # in block order


@pytest.mark.parametrize("shifted", [False, True])
def test_fused_projections_score_as_the_separate_ones(
    tiny_model: NativeDiffusionModel, tiny_shifted_model: NativeDiffusionModel, shifted: bool
) -> None:
    """q/k/v and gate/up fused into one matrix each (as served on CUDA) give the same logits, on
    the full pass and on a window against the cache, and keep the parameter count."""
    import copy

    model = tiny_shifted_model if shifted else tiny_model
    fused = copy.deepcopy(model)
    fused.network.fuse_projections()
    assert fused.network.num_parameters() == model.network.num_parameters()
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name, _ in fused.network.named_parameters())
    ids, _, attention = pad_rows(rows_for(model, SOURCES[:2]), model.special.pad, model.device)
    at = torch.tensor([[5, 6, 7, 9], [8, 9, 10, 11]])
    window = torch.tensor([[4, 5, 6, 7, 8, 9], [7, 8, 9, 10, 11, 2]])
    with torch.inference_mode():
        results = []
        for candidate in (model, fused):
            scored, cache = candidate.score(ids, attention, at, keep_cache=True)
            assert cache is not None
            results.append((scored, candidate.score_window(cache, ids, window, at)))
    for expected, got in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fusing_keeps_the_qkv_bias_of_qwen2_layouts() -> None:
    """Dream (Qwen2) has q/k/v biases: the fused matrix carries them."""
    import copy

    from editor.models.transformer import BidirectionalTransformer, TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, qkv_bias=True
    )
    network = BidirectionalTransformer(config).eval()
    for name, parameter in network.named_parameters():
        if name.endswith("_proj.bias"):
            torch.nn.init.normal_(parameter)
    fused = copy.deepcopy(network)
    fused.fuse_projections()
    ids = torch.randint(0, 64, (2, 10))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids), network(ids), atol=1e-5, rtol=1e-5)


def joined_mid_run(model: NativeDiffusionModel, rows: list[Row], options: SamplerOptions) -> list[list[int]]:
    """Row 1 alone for two steps, then rows 0, 2 and 3 join; each row leaves when done."""
    vocabulary = vocabulary_rules(model)
    with torch.inference_mode():
        running = SamplerRun(model, rows[1:2], options, vocabulary)
        (first,) = running.keys
        running.step()
        running.step()
        joined = running.add([rows[0], rows[2], rows[3]])
        done: dict[int, list[int]] = {}
        while not running.finished:
            running.step()
            finished = [key for key in running.keys if running.row_done(key)]
            done |= {key: running.row_output(key)[0] for key in finished}
            running.remove(finished)
    return [done[key] for key in (joined[0], first, joined[1], joined[2])]


@pytest.mark.parametrize("options", JOIN_OPTIONS[:2], ids=lambda o: o.schedule)
def test_graph_shapes_evicted_under_continuous_batching_fill_as_eager_ones(
    tiny_shifted_model: NativeDiffusionModel, monkeypatch: pytest.MonkeyPatch, options: SamplerOptions
) -> None:
    """Rows joining and leaving change the batch shape (and rows refreshing on their own steps
    run as a sub-batch), so window steps come in several (batch, length) shapes: with room for one
    slab and three graphs, shapes keep evicting each other, and every fill is still exact."""
    model = tiny_shifted_model
    wide = "A long line of literal text that goes on and on before [MASK 2] and still goes on after it."
    rows = [Row(r.ids, r.pinned, r.rules, seed=60 + i) for i, r in enumerate(rows_for(model, [*SOURCES, wide]))]
    eager = joined_mid_run(model, rows, options)
    graphs = WindowGraphs(model.network, max_graphs=3, max_slabs=1, capture=False)
    monkeypatch.setattr(model, "window_graphs", graphs)
    assert joined_mid_run(model, rows, options) == eager
    assert graphs.replays > 0
    assert len(graphs._slabs) == 1 and len(graphs._graphs) <= 3
