"""The model worker: one thread owns the model, a bounded queue, batching that never changes a
result, per-job cancellation, steps bridged to asyncio."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from editor.document import DocumentError
from editor.filling import fill_documents, prepare_canvas
from editor.models.base import DiffusionModel
from editor.options import FillCancelled, SamplerOptions
from editor.parser import parse_document
from editor.server.worker import (
    FillJob,
    ModelWorker,
    QueueFull,
    WorkerUnavailable,
    compatible,
    worker_threads,
)
from editor.settings import Settings
from tests.api_fixtures import SlowModel, make_settings

pytest_plugins = ("tests.api_fixtures",)  # its fixtures; conftest.py belongs to the core tests
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]. Kind regards"
GREEDY = SamplerOptions(seed=1)
SAMPLED = SamplerOptions(temperature=1.0, seed=11)


@pytest.fixture
def worker_settings(tmp_path: Path, api_model_dir: Path) -> Settings:
    return make_settings(tmp_path, api_model_dir, queue_size=4, max_batch_rows=8, batch_window_ms=50)


def started_worker(settings: Settings, model: DiffusionModel) -> ModelWorker:
    worker = ModelWorker(settings, loader=lambda: model)
    worker.start()
    assert worker.wait_ready(10)
    return worker


def run(coroutine):
    return asyncio.run(coroutine)


async def streamed(worker: ModelWorker, document: Any, options: SamplerOptions, rows: int = 1) -> tuple[list[Any], Any]:
    """A streamed fill's step updates and its outcome (`rows`: the sampler rows the job takes)."""
    job = worker.submit([document], options, stream=True)
    assert job.rows == rows
    await job.wait_started()
    steps = [update async for update in job.steps()]
    return steps, await job.result()


def test_worker_loads_the_model_in_its_own_thread(worker_settings: Settings, api_model: DiffusionModel) -> None:
    threads: list[str] = []

    def loader() -> DiffusionModel:
        threads.append(threading.current_thread().name)
        return api_model

    worker = ModelWorker(worker_settings, loader=loader)
    assert not worker.ready
    worker.start()
    try:
        assert worker.wait_ready(10) and worker.model_name == api_model.name
        assert threads == ["editor-model-worker"]
    finally:
        worker.stop()
    assert not worker.ready


def test_worker_loads_the_configured_model_by_default(worker_settings: Settings) -> None:
    worker = ModelWorker(worker_settings)  # settings.model is the tiny model's directory
    worker.start()
    try:
        assert worker.wait_ready(30)
        assert worker.model_name == worker_settings.model
    finally:
        worker.stop()


def test_a_model_that_fails_to_load_makes_submissions_unavailable(worker_settings: Settings) -> None:
    def broken() -> DiffusionModel:
        raise OSError("no such checkpoint")

    worker = ModelWorker(worker_settings, loader=broken)
    worker.start()
    try:
        assert not worker.wait_ready(10)
        assert "no such checkpoint" in str(worker.load_error)

        async def submit() -> None:
            worker.submit([parse_document(DOC)], GREEDY)

        with pytest.raises(WorkerUnavailable, match="failed to load"):
            run(submit())
    finally:
        worker.stop()


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_worker_result_equals_a_direct_fill(
    worker_settings: Settings, api_model: DiffusionModel, options: SamplerOptions
) -> None:
    document = parse_document(DOC)
    (expected,) = fill_documents(api_model, [document], options)
    worker = started_worker(worker_settings, api_model)
    try:

        async def fill():
            return await worker.submit([document], options).result()

        outcome = run(fill())
    finally:
        worker.stop()
    (result,) = outcome.results
    assert (result.text, result.seed, result.steps) == (expected.text, expected.seed, expected.steps)
    assert [s.token_ids for s in result.spans] == [s.token_ids for s in expected.spans]
    assert 0 <= outcome.queued_s <= outcome.total_s and 0 < outcome.fill_s <= outcome.total_s


def test_batched_jobs_give_the_same_results_as_alone(worker_settings: Settings, api_model: DiffusionModel) -> None:
    sources = [DOC, "One [MASK 2] two [MASK 6 name=long] three.", "[MASK 5] and [MASK 1]", "Short [MASK 1]."]
    documents = [parse_document(s) for s in sources]
    alone = [fill_documents(api_model, [d], GREEDY)[0].text for d in documents]
    slow = SlowModel(api_model, delay=0.0)
    worker = started_worker(worker_settings, slow)
    try:

        async def fill_all() -> list[str]:
            jobs = [worker.submit([d], GREEDY) for d in documents]
            return [(await job.result()).results[0].text for job in jobs]

        texts = run(fill_all())
    finally:
        worker.stop()
    assert texts == alone
    # Run alone, these take 3+4, 2+6, 5+1 and 1 forward passes; one shared batch needs 8.
    assert slow.forwards == 8
    assert len(worker.recent) == 4 and {s.state for s in worker.recent} == {"done"}


def test_a_full_queue_raises_queue_full_with_retry_after(worker_settings: Settings, api_model: DiffusionModel) -> None:
    settings = worker_settings.model_copy(update={"queue_size": 2})
    slow = SlowModel(api_model, delay=0.05)
    worker = started_worker(settings, slow)
    document = parse_document(DOC)
    try:

        async def flood() -> tuple[int, list[QueueFull]]:
            accepted, refused = [], []
            for _ in range(6):
                try:
                    accepted.append(worker.submit([document], SAMPLED))  # sampled: never batched
                except QueueFull as error:
                    refused.append(error)
            for job in accepted:
                await job.result()
            return len(accepted), refused

        accepted, refused = run(flood())
    finally:
        worker.stop()
    # At most one job is running and two wait; the rest were refused at once.
    assert 2 <= accepted <= 3 and len(refused) == 6 - accepted
    assert all(error.retry_after >= 1 for error in refused)


def test_steps_stream_in_order_and_cover_every_mask(worker_settings: Settings, api_model: DiffusionModel) -> None:
    worker = started_worker(worker_settings, api_model)
    document = parse_document(DOC)
    try:
        steps, outcome = run(streamed(worker, document, SamplerOptions(steps=4)))
    finally:
        worker.stop()
    assert [u.step for u in steps] == [0, 1, 2, 3]
    assert [u.remaining for u in steps] == [5, 3, 1, 0]  # 7 masks in 4 steps: 2, 2, 2, 1
    commits = [c for u in steps for c in u.commits]
    (result,) = outcome.results
    by_span = {(c.span, c.offset): c.token_id for c in commits}
    assert len(by_span) == len(commits) == 7  # every mask committed exactly once
    for span in result.spans:
        assert [by_span[(span.index, k)] for k in range(len(span.token_ids))] == span.token_ids
    assert {c.name for c in commits if c.span == 0} == {"greeting"}
    assert outcome.trace is not None and [t["step"] for t in outcome.trace] == [0, 1, 2, 3]


def test_candidates_are_judged_in_the_worker_and_streamed_by_their_first(
    worker_settings: Settings, api_model: DiffusionModel
) -> None:
    """A fill with candidates runs them as rows of the batch, keeps what a direct fill keeps (with
    the same alternatives), and streams the first candidate of each document: every mask once."""
    document = parse_document(DOC)
    options = SamplerOptions(seed=4, candidates=3, steps=4)
    (expected,) = fill_documents(api_model, [document], options)
    worker = started_worker(worker_settings, api_model)
    try:
        steps, outcome = run(streamed(worker, document, options, rows=3))
    finally:
        worker.stop()
    (result,) = outcome.results
    assert result.text == expected.text and result.score == pytest.approx(expected.score)
    assert [s.alternatives for s in result.spans] == [s.alternatives for s in expected.spans]
    assert any(s.alternatives for s in result.spans)
    commits = [c for u in steps for c in u.commits]
    assert {c.row for c in commits} == {0}
    assert len({(c.span, c.offset) for c in commits}) == len(commits) == 7
    assert [u.remaining for u in steps][-1] == 0


def test_cancel_stops_the_job_at_the_next_step(worker_settings: Settings, api_model: DiffusionModel) -> None:
    slow = SlowModel(api_model, delay=0.02)
    worker = started_worker(worker_settings, slow)
    long_doc = parse_document("Start [MASK 40] end.")
    try:

        async def cancel_after_two_steps() -> int:
            job = worker.submit([long_doc], GREEDY, stream=True)
            async for update in job.steps():
                if update.step == 1:
                    job.cancel()
            with pytest.raises(FillCancelled):
                await job.result()
            return job.steps_done

        steps_done = run(cancel_after_two_steps())
        assert 2 <= steps_done < 40
        summary = worker.recent[-1]
        assert summary.state == "cancelled" and summary.steps_done == steps_done
        assert slow.forwards <= steps_done + 1  # no forward pass after the cancel was seen

        async def next_job() -> str:  # the worker goes on serving
            return (await worker.submit([parse_document(DOC)], GREEDY).result()).results[0].text

        assert run(next_job())
    finally:
        worker.stop()


def test_a_cancelled_job_does_not_stop_its_batch(worker_settings: Settings, api_model: DiffusionModel) -> None:
    slow = SlowModel(api_model, delay=0.01)
    worker = started_worker(worker_settings, slow)
    documents = [parse_document("A [MASK 12] b."), parse_document("C [MASK 10] d.")]
    expected = fill_documents(api_model, [documents[1]], GREEDY)[0].text
    try:

        async def both() -> str:
            quitter = worker.submit([documents[0]], GREEDY, stream=True)
            stayer = worker.submit([documents[1]], GREEDY)
            async for update in quitter.steps():
                if update.step == 2:
                    quitter.cancel()
            with pytest.raises(FillCancelled):
                await quitter.result()
            return (await stayer.result()).results[0].text

        assert run(both()) == expected
    finally:
        worker.stop()
    states = sorted(s.state for s in worker.recent)
    assert states == ["cancelled", "done"]


def test_a_bad_canvas_fails_only_its_own_job(worker_settings: Settings, api_model: DiffusionModel) -> None:
    settings = worker_settings.model_copy(update={"max_canvas_tokens": 24})
    worker = started_worker(settings, api_model)
    try:

        async def two() -> tuple[BaseException | None, str]:
            too_long = worker.submit([parse_document("x [MASK 30]")], GREEDY)
            fine = worker.submit([parse_document("ok [MASK 3]")], GREEDY)
            error = None
            try:
                await too_long.result()
            except DocumentError as caught:
                error = caught
            return error, (await fine.result()).results[0].text

        error, text = run(two())
    finally:
        worker.stop()
    assert isinstance(error, DocumentError) and "24 canvas tokens" in str(error)
    assert text.startswith("ok")


def test_compatible_requires_equal_options_but_the_seed(worker_settings: Settings, api_model: DiffusionModel) -> None:
    worker = ModelWorker(worker_settings, loader=lambda: api_model)

    async def jobs():
        document = parse_document(DOC)
        return (
            worker.submit([document], GREEDY),
            worker.submit([document], GREEDY),
            worker.submit([document], SamplerOptions(seed=2)),
            worker.submit([document], SAMPLED),
        )

    a, b, c, d = run(jobs())
    # Rows draw from their own generators, so seeds (and randomness) no longer keep jobs apart.
    assert compatible(a, b) and compatible(a, c) and compatible(d, d) and not compatible(a, d)


def test_batched_random_jobs_reproduce_their_seeds(worker_settings: Settings, api_model: DiffusionModel) -> None:
    documents = [parse_document(s) for s in ("One [MASK 4] two.", "[MASK 6] and [MASK 2]", DOC)]
    seeds = (5, 6, 7)
    alone = [
        fill_documents(api_model, [d], SAMPLED.model_copy(update={"seed": s}))[0].text
        for d, s in zip(documents, seeds, strict=True)
    ]
    worker = started_worker(worker_settings, api_model)
    try:

        async def fill_all() -> list[tuple[str, int]]:
            jobs = [
                worker.submit([d], SAMPLED.model_copy(update={"seed": s}))
                for d, s in zip(documents, seeds, strict=True)
            ]
            results = [(await job.result()).results[0] for job in jobs]
            return [(r.text, r.seed) for r in results]

        filled = run(fill_all())
    finally:
        worker.stop()
    assert filled == list(zip(alone, seeds, strict=True))


LONG_DOC = "Start [MASK 60] end."
SHORT_DOCS = ("One [MASK 3] two.", "A [MASK 2] b [MASK 2] c.")


async def join_while_running(
    worker: ModelWorker, options: SamplerOptions, seeds: tuple[int, ...]
) -> tuple[list[str], list[int]]:
    """Start the long fill, and once it has run two steps submit the short ones; returns the texts
    (long first) and the order in which the jobs completed (0 = the long one)."""
    finished: list[int] = []

    async def outcome(index: int, job: FillJob) -> str:
        text = (await job.result()).results[0].text
        finished.append(index)
        return text

    long_job = worker.submit([parse_document(LONG_DOC)], options.model_copy(update={"seed": seeds[0]}), stream=True)
    waiters = [asyncio.create_task(outcome(0, long_job))]
    async for update in long_job.steps():
        if update.step == 2:
            break
    for index, (source, seed) in enumerate(zip(SHORT_DOCS, seeds[1:], strict=True), start=1):
        job = worker.submit([parse_document(source)], options.model_copy(update={"seed": seed}))
        waiters.append(asyncio.create_task(outcome(index, job)))
    return list(await asyncio.gather(*waiters)), finished


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_fills_joining_a_running_batch_equal_their_fills_alone(
    worker_settings: Settings, api_model: DiffusionModel, options: SamplerOptions
) -> None:
    seeds = (21, 22, 23)
    alone = [
        fill_documents(api_model, [parse_document(source)], options.model_copy(update={"seed": seed}))[0].text
        for source, seed in zip((LONG_DOC, *SHORT_DOCS), seeds, strict=True)
    ]
    slow = SlowModel(api_model, delay=0.01)
    worker = started_worker(worker_settings, slow)
    try:
        texts, finished = run(join_while_running(worker, options, seeds))
    finally:
        worker.stop()
    assert texts == alone
    assert finished[-1] == 0  # the short fills joined the long one's batch and left it first


@pytest.mark.parametrize("continuous", [True, False])
def test_a_short_fill_submitted_during_a_long_one_finishes_first(
    worker_settings: Settings, api_model: DiffusionModel, continuous: bool
) -> None:
    settings = worker_settings.model_copy(update={"continuous_batching": continuous})
    worker = started_worker(settings, SlowModel(api_model, delay=0.01))
    try:
        _, finished = run(join_while_running(worker, GREEDY, (1, 2, 3)))
    finally:
        worker.stop()
    # Static batching (the previous worker) makes the short fills wait for the whole long batch.
    assert finished == ([1, 2, 0] if continuous else [0, 1, 2])


def test_a_job_cancelled_in_a_joined_batch_leaves_without_disturbing_the_others(
    worker_settings: Settings, api_model: DiffusionModel
) -> None:
    documents = [parse_document(s) for s in ("A [MASK 30] b.", "C [MASK 12] d.", "E [MASK 8] f [MASK 3].")]
    alone = [fill_documents(api_model, [d], SAMPLED)[0].text for d in documents]
    slow = SlowModel(api_model, delay=0.01)
    worker = started_worker(worker_settings, slow)
    try:

        async def three() -> tuple[str, str]:
            first = worker.submit([documents[0]], SAMPLED, stream=True)
            async for update in first.steps():
                if update.step == 1:
                    break
            quitter = worker.submit([documents[1]], SAMPLED, stream=True)  # joins the running batch
            last = worker.submit([documents[2]], SAMPLED)
            async for update in quitter.steps():
                if update.step == 3:
                    quitter.cancel()
            with pytest.raises(FillCancelled):
                await quitter.result()
            return (await first.result()).results[0].text, (await last.result()).results[0].text

        texts = run(three())
    finally:
        worker.stop()
    assert texts == (alone[0], alone[2])
    cancelled = [s for s in worker.recent if s.state == "cancelled"]
    assert len(cancelled) == 1 and 4 <= cancelled[0].steps_done < 12


class BatchShapes(SlowModel):
    """Records the canvas shape [rows, width] of every sampler step."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__(model, delay=0.01)
        self.shapes: list[tuple[int, int]] = []

    def score(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.shapes.append((int(ids.shape[0]), int(ids.shape[1])))
        return super().score(ids, *args, **kwargs)

    def score_window(self, cache: Any, ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.shapes.append((int(ids.shape[0]), int(ids.shape[1])))
        return super().score_window(cache, ids, *args, **kwargs)


@pytest.mark.parametrize("limit", ["rows", "tokens"])
def test_fills_join_a_running_batch_only_within_its_row_and_token_limits(
    worker_settings: Settings, api_model: DiffusionModel, limit: str
) -> None:
    long_doc = parse_document(LONG_DOC)
    width = len(prepare_canvas(api_model, long_doc).ids)
    budget = 2 * width if limit == "tokens" else 100 * width
    settings = worker_settings.model_copy(
        update={"max_batch_rows": 3 if limit == "tokens" else 2, "max_batch_tokens": budget}
    )
    shorts = [parse_document(s) for s in ("One [MASK 3] two.", "[MASK 2] x", "y [MASK 4]", "z [MASK 1].")]
    alone = [fill_documents(api_model, [d], GREEDY)[0].text for d in shorts]
    recorder = BatchShapes(api_model)
    worker = started_worker(settings, recorder)
    try:

        async def fill() -> list[str]:
            first = worker.submit([long_doc], GREEDY, stream=True)
            async for update in first.steps():
                if update.step == 1:
                    break
            jobs = [worker.submit([d], GREEDY) for d in shorts]
            texts = [(await job.result()).results[0].text for job in jobs]
            await first.result()
            return texts

        texts = run(fill())
    finally:
        worker.stop()
    assert texts == alone
    assert max(rows for rows, _ in recorder.shapes) == 2  # the long fill plus one short one at a time
    assert all(rows * columns <= budget for rows, columns in recorder.shapes)


def test_a_fill_waiting_for_room_in_the_batch_can_be_cancelled(
    worker_settings: Settings, api_model: DiffusionModel
) -> None:
    long_doc = parse_document(LONG_DOC)
    width = len(prepare_canvas(api_model, long_doc).ids)
    settings = worker_settings.model_copy(update={"max_batch_tokens": width})  # no room beside the long fill
    worker = started_worker(settings, SlowModel(api_model, delay=0.01))
    try:

        async def cancel_the_waiting_one() -> list[str]:
            finished: list[str] = []
            first = worker.submit([long_doc], GREEDY, stream=True)
            async for update in first.steps():
                if update.step == 1:
                    break
            waiting = worker.submit([parse_document(DOC)], GREEDY)
            await waiting.wait_started()  # laid out, waiting for rows to leave
            waiting.cancel()
            with pytest.raises(FillCancelled):
                await waiting.result()
            assert first.state == "running"  # it left without waiting for the batch
            finished.append("waiting")
            await first.result()
            finished.append("long")
            return finished

        assert run(cancel_the_waiting_one()) == ["waiting", "long"]
    finally:
        worker.stop()
    assert [s.state for s in worker.recent] == ["cancelled", "done"]


def test_the_worker_leaves_a_core_for_the_event_loop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_threads(0) == 7
    assert worker_threads(3) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert worker_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # Ray (or the user) chose: torch's own default stands
    assert worker_threads(0) is None
    assert worker_threads(4) == 4
