"""The single model worker (docs/architecture.md).

One thread owns the model: it loads it at start, then takes fill jobs from a bounded queue, one
batch at a time. The event loop never runs model code; it only puts jobs in (`submit`, which
raises `QueueFull` when the queue is at capacity) and awaits what the thread hands back through
`loop.call_soon_threadsafe`: a "started" signal once the canvases are laid out, each step (for
streaming jobs), and the outcome.

Batching: jobs are run together when their sampler options are equal but for the seed. Every
row draws its random numbers from its own generator, seeded from its job's seed and its index in
the job (`editor.sampler.row_seed`), and follows its own step count (plan, cache refreshes), so a
batched fill reproduces from its reported seed exactly as when run alone, random schedules and
temperature included.

Continuous batching (`continuous_batching`, docs/engine.md): the batch is one `SamplerRun` that
runs a step at a time. Between two steps, compatible queued jobs join it (within `max_batch_rows`
and `max_batch_tokens`), a job whose rows are all done is handed back at once and its rows leave,
and a cancelled or timed-out job leaves without disturbing the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Literal

import torch

from editor.canvas import Canvas
from editor.chat import Instruction
from editor.document import Document
from editor.filling import (
    FillResult,
    candidate_rows,
    judged_results,
    locate,
    prepare_canvas,
    vocabulary_rules,
    with_candidates,
)
from editor.judging import judge_for
from editor.models.base import DiffusionModel
from editor.models.loading import load_configured, model_dtype_text, model_weights_text
from editor.options import FillCancelled, SamplerOptions
from editor.sampler import SamplerRun, StepEvent, effective_steps, row_seed
from editor.server.limits import FillTimedOut, LimitExceeded
from editor.settings import Settings
from editor.threads import torch_threads as worker_threads  # the one rule, shared with the CLI
from editor.threads import use_torch_threads

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ModelLoader = Callable[[], DiffusionModel]
BackgroundWork = Callable[[DiffusionModel], Any]
# Applied to each canvas once it is laid out (picklable for Ray: a module-level function or a
# partial of one); e.g. the JSON-number rules of a schema's answer (docs/openai.md).
CanvasReshape = Callable[[Canvas], Canvas]


WATCH_INTERVAL_S = 0.2  # how often the watchdog looks at the worker thread
RESTART_WINDOW_S = 600.0  # restarts counted against `worker_restarts` within this window


class QueueFull(RuntimeError):
    """The queue is at capacity; the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the fill queue is full; retry in {retry_after} s")
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), (self.retry_after,)


class WorkerUnavailable(RuntimeError):
    """The model could not be loaded, or the worker is shutting down."""


class ModelFailed(WorkerUnavailable):
    """The model raised during a fill (a bug, memory running out): that batch's fills fail with
    503, nothing of them is stored, and the worker goes on with the next fills."""


@dataclass(frozen=True)
class CommitInfo:
    """One token committed at a step, located in the document."""

    row: int  # which of the job's documents
    span: int  # the span's index in its document
    name: str | None
    offset: int  # token offset inside the span
    position: int  # canvas position
    token_id: int
    token: str
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "span": self.span,
            "name": self.name,
            "offset": self.offset,
            "position": self.position,
            "token_id": self.token_id,
            "token": self.token,
            "confidence": round(self.confidence, 6),
        }


@dataclass(frozen=True)
class StepUpdate:
    step: int
    commits: list[CommitInfo]
    remaining: int  # masks left over all of the job's rows

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "commits": [c.to_dict() for c in self.commits], "remaining": self.remaining}


@dataclass(frozen=True)
class JobOutcome:
    results: list[FillResult]  # one per document, in order
    trace: list[dict[str, Any]] | None
    queued_s: float  # waiting in the queue
    fill_s: float  # laying out canvases and sampling
    total_s: float
    prompt_tokens: list[int] = field(default_factory=list)  # per document: canvas positions outside its spans


@dataclass(frozen=True)
class JobSummary:
    """What the worker remembers about a finished job (for /ready and tests)."""

    id: int
    state: JobState
    steps_done: int
    rows: int
    error: str | None


_job_ids = count(1)


@dataclass
class _Batch:
    """The running sampler run and the jobs in it (rows are named by their run keys)."""

    run: SamplerRun
    jobs: list[FillJob] = field(default_factory=list)
    seeds: dict[int, int] = field(default_factory=dict)  # job id -> the seed it reports
    keys: dict[int, list[int]] = field(default_factory=dict)  # job id -> its rows' keys
    owners: dict[int, tuple[FillJob, int]] = field(default_factory=dict)  # key -> (job, row in the job)


@dataclass(eq=False)
class FillJob:
    """A unit of work: documents filled with one set of options. Created by `ModelWorker.submit`;
    the awaiting methods must be used on the event loop that submitted it."""

    documents: list[Document]
    options: SamplerOptions
    instruction: Instruction | None
    max_canvas_tokens: int | None
    stream: bool
    keep_trace: bool
    loop: asyncio.AbstractEventLoop
    reshape: CanvasReshape | None = None
    id: int = field(default_factory=lambda: next(_job_ids))
    state: JobState = "queued"
    steps_done: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    deadline: float | None = None  # perf_counter time after which the fill is cancelled (fill_timeout_s)
    canvases: list[Canvas] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)
    served_by: str | None = None  # the replica that runs it (Ray Serve); None for the in-process worker
    on_cancel: Callable[[], None] | None = None  # also told of `cancel` (a remote fill cancels its call)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _started: asyncio.Future[None] = field(init=False)
    _outcome: asyncio.Future[JobOutcome] = field(init=False)
    _events: asyncio.Queue[StepUpdate | None] = field(init=False)

    @classmethod
    def submitted(
        cls,
        settings: Settings,
        documents: Sequence[Document],
        options: SamplerOptions,
        *,
        instruction: Instruction | None,
        stream: bool,
        keep_trace: bool | None,
        reshape: CanvasReshape | None = None,
    ) -> FillJob:
        """A new job on the running event loop, with the limits and trace default of `settings`."""
        return cls(
            documents=list(documents),
            options=options,
            instruction=instruction,
            max_canvas_tokens=settings.max_canvas_tokens,
            stream=stream,
            keep_trace=settings.keep_step_trace if keep_trace is None else keep_trace,
            loop=asyncio.get_running_loop(),
            reshape=reshape,
        )

    def __post_init__(self) -> None:
        self._started = self.loop.create_future()
        self._outcome = self.loop.create_future()
        self._events = asyncio.Queue()

    # -- event-loop side --

    def cancel(self) -> None:
        """Stop this job at the sampler's next step (safe from any thread)."""
        self._cancel.set()
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def timed_out(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    @property
    def should_stop(self) -> bool:
        """Cancelled by its client or by the server, or over its time budget."""
        return self.cancelled or self.timed_out

    @property
    def candidates(self) -> int:
        """Sampler rows per document (judged candidates; settled for the model when it is known)."""
        return self.options.candidates or 1

    @property
    def rows(self) -> int:
        return len(self.documents) * self.candidates

    async def wait_started(self) -> None:
        """Returns once the canvases are laid out; raises the job's error if it failed before."""
        await asyncio.shield(self._started)

    async def result(self) -> JobOutcome:
        return await asyncio.shield(self._outcome)

    async def steps(self) -> AsyncIterator[StepUpdate]:
        """Each step as it happens (streaming jobs only), until the job ends."""
        while (update := await self._events.get()) is not None:
            yield update

    # -- worker-thread side --

    def _call(self, callback: Callable[..., object], *args: object) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.cancel()

    def _signal_started(self) -> None:
        self._call(_resolve, self._started, None)

    def _publish(self, update: StepUpdate) -> None:
        if self.stream:
            self._call(self._events.put_nowait, update)

    def _finish(self, state: JobState, outcome: JobOutcome | None = None, error: BaseException | None = None) -> None:
        self.state = state  # set before the loop is told, so waiters see the final state
        if error is not None:
            self._call(_fail, self._started, error)
            self._call(_fail, self._outcome, error)
        else:
            self._call(_resolve, self._started, None)
            self._call(_resolve, self._outcome, outcome)
        self._call(self._events.put_nowait, None)


def _resolve(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # mark retrieved: a client that went away never awaits it


def random_seed() -> int:
    return random.SystemRandom().randrange(2**63)


def compatible(first: FillJob, other: FillJob) -> bool:
    """Whether `other` may share a sampler run with `first`: equal options but for the seed (each
    row has its own generator, so seeds need not match)."""
    return other.options.model_copy(update={"seed": None}) == first.options.model_copy(update={"seed": None})


class _JobQueue:
    """A bounded FIFO that the batcher can also search for compatible jobs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[FillJob] = deque()
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: FillJob, retry_after: Callable[[int], int]) -> None:
        with self._ready:
            if len(self._jobs) >= self.capacity:
                raise QueueFull(retry_after(len(self._jobs)))
            self._jobs.append(job)
            self._ready.notify()

    def take(self, timeout: float) -> FillJob | None:
        with self._ready:
            if not self._jobs:
                self._ready.wait(timeout)
            return self._jobs.popleft() if self._jobs else None

    def take_matching(self, matches: Callable[[FillJob], bool], rows_left: int) -> list[FillJob]:
        """Remove and return queued jobs that match and fit in `rows_left` rows, oldest first."""
        taken: list[FillJob] = []
        with self._ready:
            for job in list(self._jobs):
                if job.rows <= rows_left and matches(job):
                    self._jobs.remove(job)
                    taken.append(job)
                    rows_left -= job.rows
        return taken

    def take_leading(self, matches: Callable[[FillJob], bool], rows_left: int) -> list[FillJob]:
        """Remove and return jobs from the front of the queue while they match and fit."""
        taken: list[FillJob] = []
        with self._ready:
            while self._jobs and self._jobs[0].rows <= rows_left and matches(self._jobs[0]):
                taken.append(self._jobs.popleft())
                rows_left -= taken[-1].rows
        return taken

    def wait(self, timeout: float) -> None:
        with self._ready:
            self._ready.wait(timeout)

    def wake(self) -> None:
        """Wake a worker waiting in `take` (background work has arrived)."""
        with self._ready:
            self._ready.notify_all()

    def drain(self) -> list[FillJob]:
        with self._ready:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs


def settings_loader(settings: Settings) -> ModelLoader:
    """Loads the configured model (None = the bundled default) on the configured device."""

    def load() -> DiffusionModel:
        return load_configured(settings)

    return load


class ModelWorker:
    """Owns the model in one thread; see the module docstring."""

    def __init__(self, settings: Settings, loader: ModelLoader | None = None) -> None:
        self.settings = settings
        self._loader = loader or settings_loader(settings)
        self._queue = _JobQueue(settings.queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._loaded = threading.Event()
        self._batch: _Batch | None = None  # the running sampler run (thread-side only)
        self._waiting: deque[FillJob] = deque()  # laid out, waiting for room in the running batch
        self.model: DiffusionModel | None = None
        self.load_error: BaseException | None = None
        self.recent: deque[JobSummary] = deque(maxlen=256)
        self._job_seconds = 1.0  # moving average of a batch's duration, for Retry-After
        # Low-priority lane (batch jobs): run only when no interactive fill is queued, one small
        # piece at a time, so an interactive fill waits for at most one piece.
        self._background: deque[tuple[BackgroundWork, concurrent.futures.Future[Any]]] = deque()
        self._background_ran_at = time.perf_counter()  # when a piece of background work last ran
        self._restarts: deque[float] = deque()  # when the watchdog restarted a dead worker thread
        self.gave_up = False  # the thread died more often than `worker_restarts` allows

    # -- lifecycle --

    def start(self) -> None:
        """Start the thread; the model loads there, and `ready` turns true when it has."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="editor-model-worker", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="editor-worker-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """Notice the worker thread dying (something it did not catch: a BaseException, a bug in
        the loop itself) while the server runs: fail the fills it held with 503 (nothing of them
        was stored) and start a new thread on the loaded model, at most `worker_restarts` times in
        ten minutes. Beyond that `ready` stays false, /ready answers 503 and fills are refused, so
        that a supervisor restarts the process."""
        while not self._stopping.is_set():
            thread = self._thread
            if thread is None:
                return
            thread.join(WATCH_INTERVAL_S)
            if thread.is_alive() or self._stopping.is_set():
                continue
            if self.model is None:
                return  # the model never loaded: load_error says why, and there is nothing to restart
            self._fail_running(
                WorkerUnavailable("the model worker stopped unexpectedly during this fill; nothing was stored: retry")
            )
            self._fail_background(WorkerUnavailable("the model worker stopped unexpectedly: retry"))
            now = time.monotonic()
            self._restarts.append(now)
            while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
                self._restarts.popleft()
            if len(self._restarts) > self.settings.worker_restarts:
                log.critical(
                    "the model worker died %d times in %d s: not restarting it; /ready reports not ready "
                    "(restart the server)",
                    len(self._restarts),
                    RESTART_WINDOW_S,
                )
                self.gave_up = True
                for job in self._queue.drain():
                    self._close(job, "failed", error=WorkerUnavailable("the model worker has stopped"))
                return
            log.error(
                "the model worker thread died; starting a new one (%d in the last %d s)",
                len(self._restarts),
                RESTART_WINDOW_S,
            )
            self._thread = threading.Thread(target=self._run, name="editor-model-worker", daemon=True)
            self._thread.start()

    def shut_down(self) -> None:
        """Refuse new and queued jobs and cancel running ones at their next step, without waiting
        (safe from a signal handler). Their waiters get WorkerUnavailable("... shutting down")."""
        self._stopping.set()
        for job in list(self._running):
            job.cancel()
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        for job in self._queue.drain():
            self._close(job, "cancelled", error=WorkerUnavailable("the server is shutting down; nothing was stored"))
        self._fail_background(WorkerUnavailable("the server is shutting down"))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel running and queued jobs and wait for the thread to end."""
        self.shut_down()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return self._loaded.is_set() and self.model is not None and not self._stopping.is_set() and alive

    @property
    def model_name(self) -> str | None:
        return self.model.name if self.model is not None else None

    @property
    def model_placement(self) -> str | None:
        if self.model is None:
            return None
        dtype = model_dtype_text(self.model)
        weights = model_weights_text(self.model)
        placement = str(self.model.device) if dtype == "unknown" else f"{self.model.device}, {dtype}"
        return placement if weights is None else f"{placement}, {weights}"

    @property
    def model_note(self) -> str | None:
        """Why the loaded model is not the one asked for (the default model's base is missing)."""
        return getattr(self.model, "note", None) if self.model is not None else None

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer if self.model is not None else None

    @property
    def lanes(self) -> int:
        return 1  # one model, one piece of background work at a time

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model has loaded (or failed to); True when it is ready."""
        self._loaded.wait(timeout)
        return self.ready

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- submitting (event loop) --

    def submit(
        self,
        documents: Sequence[Document],
        options: SamplerOptions,
        *,
        instruction: Instruction | None = None,
        stream: bool = False,
        keep_trace: bool | None = None,
        reshape: CanvasReshape | None = None,
    ) -> FillJob:
        """Queue a fill; call on the event loop. Raises `QueueFull` or `WorkerUnavailable`."""
        if self._stopping.is_set():
            raise WorkerUnavailable("the server is shutting down")
        if self.load_error is not None:
            raise WorkerUnavailable(f"the model failed to load: {self.load_error}")
        if self.gave_up:
            raise WorkerUnavailable("the model worker has stopped after repeated failures; the server needs a restart")
        if self.model is not None:  # else settled when the job is laid out
            options = with_candidates(self.model, options)
        job = FillJob.submitted(
            self.settings,
            documents,
            options,
            instruction=instruction,
            stream=stream,
            keep_trace=keep_trace,
            reshape=reshape,
        )
        self._queue.put(job, self._retry_after)
        return job

    def submit_background(self, work: BackgroundWork) -> concurrent.futures.Future[Any]:
        """Queue low-priority work (a small piece of a batch job): `work(model)` runs in the worker
        thread when no interactive fill is waiting. Await it with `asyncio.wrap_future`."""
        if self._stopping.is_set():
            raise WorkerUnavailable("the server is shutting down")
        if self.load_error is not None:
            raise WorkerUnavailable(f"the model failed to load: {self.load_error}")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._background.append((work, future))
        self._queue.wake()
        return future

    def _run_background(self) -> None:
        """Run one piece of background work, if any (interactive fills always go first)."""
        if not self._background or self.model is None:
            return
        work, future = self._background.popleft()
        self._background_ran_at = time.perf_counter()
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode():
                future.set_result(work(self.model))
        except BaseException as error:
            future.set_exception(error)

    def _fail_background(self, error: BaseException) -> None:
        while self._background:
            _, future = self._background.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _retry_after(self, waiting: int) -> int:
        """Seconds until the queue has likely drained by one batch's worth."""
        batches = waiting / max(1, self.settings.max_batch_rows) + 1
        return max(1, min(60, math.ceil(batches * self._job_seconds)))

    # -- the thread --

    def _run(self) -> None:
        use_torch_threads(self.settings.torch_threads)
        if self.model is not None:  # a restart after the thread died: the model is still loaded
            self._serve()
            return
        try:
            self.model = self._loader()
            log.info("model %s loaded (%s)", self.model.name, self.model_placement)
            if (with_candidates(self.model, SamplerOptions()).candidates or 1) > 1:
                judge_for(self.model)  # loaded now, so that no user's fill waits for it
        except BaseException as error:
            self.load_error = error
            log.exception("the model failed to load")
            for job in self._queue.drain():
                job._finish("failed", error=WorkerUnavailable(f"the model failed to load: {error}"))
            self._fail_background(WorkerUnavailable(f"the model failed to load: {error}"))
            return
        finally:
            self._loaded.set()
        self._serve()

    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.critical("the model worker thread is dying", exc_info=True)
            raise

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self._background and time.perf_counter() - self._background_ran_at >= self.settings.batch_max_wait_s:
                self._run_background()  # batch jobs are not starved by a steady stream of fills
            if self._batch is None and not self._waiting:
                first = self._queue.take(timeout=0.0 if self._background else 0.1)
                if first is None:
                    self._run_background()
                    continue
                started = time.perf_counter()
                self._waiting.extend(job for job in self._gather(first) if self._prepare(job, started))
            try:
                self._admit()
                self._advance()
            except Exception as error:
                log.exception("the model failed on a batch")
                failure = ModelFailed(
                    f"the model failed during this fill ({type(error).__name__}); nothing was stored, and "
                    "the server goes on: retry, and report it if it happens again"
                )
                failure.__cause__ = error  # logged with each request's id (editor.server.errors)
                self._fail_running(failure)
        for job in self._running:  # the server is shutting down: stopped where they were
            if job.state in ("queued", "running"):
                self._close_stopped(job)
        self._batch = None
        self._waiting.clear()
        self._refuse_queued()  # submitted while the last batch was ending

    @property
    def _running(self) -> list[FillJob]:
        """Jobs laid out and not yet finished: in the running batch or waiting for room in it."""
        return [*(self._batch.jobs if self._batch is not None else ()), *self._waiting]

    def _fail_running(self, error: BaseException) -> None:
        for job in self._running:
            if job.state in ("queued", "running"):
                self._close(job, "failed", error=error)
        self._batch = None
        self._waiting.clear()

    def _gather(self, first: FillJob) -> list[FillJob]:
        """`first` plus compatible queued jobs, waiting up to the batch window for more to arrive."""
        batch = [first]
        rows_left = self.settings.max_batch_rows - first.rows
        deadline = time.perf_counter() + self.settings.batch_window_ms / 1000
        while rows_left > 0:
            more = self._queue.take_matching(lambda job: compatible(first, job), rows_left)
            batch += more
            rows_left -= sum(job.rows for job in more)
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or rows_left <= 0:
                break
            self._queue.wait(remaining)
        return batch

    def _admit(self) -> None:
        """Move laid-out jobs, then (continuous batching) compatible queued ones, into the running
        batch while it has room; they join at its next step. A queued job never overtakes an
        incompatible one ahead of it, so a stream of compatible fills cannot starve it."""
        assert self.model is not None
        batch = self._batch
        if batch is not None and not self.settings.continuous_batching:
            return
        for job in [job for job in self._waiting if job.should_stop]:  # cancelled while waiting for room
            self._waiting.remove(job)
            self._close_stopped(job)
        while self._waiting:
            job = self._waiting[0]
            if batch is None:
                batch = self._batch = _Batch(SamplerRun(self.model, [], job.options, vocabulary_rules(self.model)))
            if not self._fits(batch, job):
                return
            self._waiting.popleft()
            self._join(batch, job)
        if batch is None or not self.settings.continuous_batching:
            return
        rows_left = self.settings.max_batch_rows - len(batch.run.rows)
        first = batch.jobs[0] if batch.jobs else None
        if first is None or rows_left <= 0:
            return
        for job in self._queue.take_leading(lambda queued: compatible(first, queued), rows_left):
            if not self._prepare(job, time.perf_counter()):
                continue
            if self._waiting or not self._fits(batch, job):
                self._waiting.append(job)  # laid out; joins when rows leave
            else:
                self._join(batch, job)

    def _fits(self, batch: _Batch, job: FillJob) -> bool:
        """Whether `job` can join without passing `max_batch_rows` or `max_batch_tokens`."""
        run = batch.run
        rows = len(run.rows) + job.rows
        width = max(run.width, *(len(canvas.ids) for canvas in job.canvases))
        return not run.rows or (rows <= self.settings.max_batch_rows and rows * width <= self.settings.max_batch_tokens)

    def _join(self, batch: _Batch, job: FillJob) -> None:
        seed = job.options.seed if job.options.seed is not None else random_seed()
        assert self.model is not None
        end_id = self.model.special.end_ids[0]
        rows = [
            row
            for index, canvas in enumerate(job.canvases)
            for row in candidate_rows(canvas, row_seed(seed, index), job.options, end_id)
        ]
        try:
            keys = batch.run.add(rows)
        except Exception as error:  # e.g. a rule no token of the vocabulary fits: this job only
            self._close(job, "failed", error=error)
            return
        batch.jobs.append(job)
        batch.seeds[job.id] = seed
        batch.keys[job.id] = keys
        batch.owners |= {key: (job, index) for index, key in enumerate(keys)}

    def _advance(self) -> None:
        """One step of the running batch: stopped jobs leave first, finished ones are handed back."""
        batch = self._batch
        if batch is None:
            return
        for job in list(batch.jobs):
            if job.should_stop or self._stopping.is_set():
                self._leave(batch, job)
                self._close_stopped(job)
        self._hand_back_finished(batch)
        if batch.jobs:
            with torch.inference_mode():
                event = batch.run.step()
            if event is not None:
                self._route_step(event, batch)
            self._hand_back_finished(batch)
        if not batch.jobs:
            self._batch = None

    def _leave(self, batch: _Batch, job: FillJob) -> None:
        keys = batch.keys.pop(job.id)
        batch.run.remove(keys)
        batch.jobs.remove(job)
        for key in keys:
            del batch.owners[key]

    def _hand_back_finished(self, batch: _Batch) -> None:
        """Deliver every job whose rows are all done (continuous batching: at once; otherwise when
        the whole batch is done) and let its rows leave the batch."""
        run = batch.run
        if not self.settings.continuous_batching and not run.finished:
            return
        for job in [job for job in batch.jobs if all(run.row_done(key) for key in batch.keys[job.id])]:
            outputs = [run.row_output(key) for key in batch.keys[job.id]]
            self._leave(batch, job)
            self._deliver(job, batch.seeds.pop(job.id), outputs)

    def _deliver(self, job: FillJob, seed: int, outputs: list[tuple[list[int], list[float], int]]) -> None:
        assert self.model is not None and job.started_at is not None
        steps = max((steps for _, _, steps in outputs), default=0)  # the job's own steps, as when run alone
        results = judged_results(
            self.model,
            job.canvases,
            [(ids, confidences) for ids, confidences, _ in outputs],
            job.options,
            seed=seed,
            steps=steps,
            started=job.started_at,
        )
        finished = time.perf_counter()  # the judge's time counts: the user waits for it
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * (finished - job.started_at)
        outcome = JobOutcome(
            results=results,
            trace=job.trace if job.keep_trace else None,
            queued_s=job.started_at - job.submitted_at,
            fill_s=finished - job.started_at,
            total_s=finished - job.submitted_at,
            prompt_tokens=[len(c.ids) - sum(layout.length for layout in c.spans) for c in job.canvases],
        )
        self._close(job, "done", outcome=outcome)

    def _stop_reason(self, job: FillJob) -> BaseException:
        """Why a job that the sampler stopped did not finish."""
        if self._stopping.is_set():
            return WorkerUnavailable(
                f"the server is shutting down: the fill was cancelled after {job.steps_done} steps; nothing was stored"
            )
        if job.timed_out and not job.cancelled:
            return FillTimedOut(
                f"the fill ran past its time budget of {self.settings.fill_timeout_s:g} s (fill_timeout_s) after "
                f"{job.steps_done} steps and was cancelled; nothing was stored. Ask for fewer steps or shorter spans"
            )
        return FillCancelled(f"fill cancelled after {job.steps_done} steps")

    def _close_stopped(self, job: FillJob) -> None:
        error = self._stop_reason(job)
        self._close(job, "failed" if isinstance(error, FillTimedOut) else "cancelled", error=error)

    def _prepare(self, job: FillJob, started: float) -> bool:
        """Lay out the job's canvases (choices and free musts use the model); False if it cannot run."""
        assert self.model is not None
        if job.cancelled:
            self._close(job, "cancelled", error=FillCancelled("fill cancelled before it started"))
            return False
        job.state, job.started_at = "running", started
        job.deadline = started + self.settings.fill_timeout_s
        job.options = with_candidates(self.model, job.options)
        settings = self.settings
        try:
            with torch.inference_mode():
                job.canvases = [
                    prepare_canvas(
                        self.model,
                        document,
                        instruction=job.instruction,
                        max_canvas_tokens=job.max_canvas_tokens,
                        max_choice_tokens=settings.max_choice_tokens,
                        max_batch_tokens=settings.max_batch_tokens,
                        should_cancel=lambda: self._stopping.is_set() or job.should_stop,
                    )
                    for document in job.documents
                ]
            if job.reshape is not None:
                job.canvases = [job.reshape(canvas) for canvas in job.canvases]
            self._check_work(job)
        except FillCancelled:
            self._close_stopped(job)
            return False
        except Exception as error:
            self._close(job, "failed", error=error)
            return False
        job._signal_started()
        return True

    def _check_work(self, job: FillJob) -> None:
        """Refuse, before sampling, a job whose steps (defaults counted) or size break the limits."""
        limit = self.settings.max_steps
        for canvas in job.canvases:
            masks = canvas.pinned.count(False)
            steps = effective_steps(masks, job.options)
            if steps > limit:
                given = "" if job.options.steps is not None else " (the default: one step per masked token)"
                raise LimitExceeded(
                    f"this fill needs {steps} sampler steps for {masks} masked tokens{given}; the limit is "
                    f"{limit} (max_steps): ask for steps <= {limit}"
                    + (" with a larger block_length" if job.options.schedule == "blocks" else "")
                )
        size = job.rows * max(len(canvas.ids) for canvas in job.canvases)
        if size > self.settings.max_batch_tokens:
            raise LimitExceeded(
                f"this fill needs {size} canvas positions ({job.rows} rows x the widest canvas); the limit is "
                f"{self.settings.max_batch_tokens} (max_batch_tokens)"
            )

    def _route_step(self, event: StepEvent, batch: _Batch) -> None:
        """Split one sampler step between the jobs of the batch, and hand each its own part (a
        job's step numbers are its own: it may have joined the batch late)."""
        owners = [batch.owners[key] for key in event.keys]
        if not any(job.stream or job.keep_trace for job in batch.jobs):
            # Nobody reads the tokens: one small read of per-row commit counts, no token decoding.
            for row_number, committed in enumerate(event.committed_per_row):
                job = owners[row_number][0]
                if committed and not job.cancelled:
                    job.steps_done = event.row_steps[row_number] + 1
            return
        commits: dict[int, list[CommitInfo]] = {job.id: [] for job in batch.jobs}
        counts: dict[int, int] = {job.id: 0 for job in batch.jobs}
        remaining: dict[int, int] = {job.id: 0 for job in batch.jobs}
        steps: dict[int, int] = {}
        for (job, row), left, row_step in zip(owners, event.remaining, event.row_steps, strict=True):
            remaining[job.id] += left if row % job.candidates == 0 else 0  # as streamed: first candidates
            steps[job.id] = row_step
        for commit in event.commits:
            job, row = owners[commit.row]
            counts[job.id] += 1
            document, candidate = divmod(row, job.candidates)
            # Streams show each document's first candidate (the judge picks among all at the end).
            if (job.stream or job.keep_trace) and candidate == 0:  # decoding token text costs time
                commits[job.id].append(
                    self._describe(job, document, commit.position, commit.token_id, commit.confidence)
                )
        for job in batch.jobs:
            if counts[job.id] == 0 or job.cancelled:
                continue
            job.steps_done = steps[job.id] + 1
            if not (job.stream or job.keep_trace):
                continue
            update = StepUpdate(step=steps[job.id], commits=commits[job.id], remaining=remaining[job.id])
            if job.keep_trace:
                job.trace.append(update.to_dict())
            job._publish(update)

    def _describe(self, job: FillJob, row: int, position: int, token_id: int, confidence: float) -> CommitInfo:
        assert self.model is not None
        canvas = job.canvases[row]
        where = locate(canvas, position)
        span, offset = (canvas.spans[where[0]].span, where[1]) if where is not None else (None, -1)
        token = str(self.model.tokenizer.decode([token_id], clean_up_tokenization_spaces=False))
        return CommitInfo(
            row=row,
            span=span.index if span else -1,
            name=span.name if span else None,
            offset=offset,
            position=position,
            token_id=token_id,
            token=token,
            confidence=confidence,
        )

    def _close(
        self, job: FillJob, state: JobState, *, outcome: JobOutcome | None = None, error: BaseException | None = None
    ) -> None:
        # Recorded before the waiter hears of it, so whoever awaited the job sees the summary.
        self.recent.append(JobSummary(job.id, state, job.steps_done, job.rows, None if error is None else str(error)))
        job._finish(state, outcome=outcome, error=error)


__all__ = [
    "BackgroundWork",
    "CanvasReshape",
    "CommitInfo",
    "FillJob",
    "JobOutcome",
    "JobSummary",
    "ModelFailed",
    "ModelWorker",
    "QueueFull",
    "StepUpdate",
    "WorkerUnavailable",
    "compatible",
    "settings_loader",
    "worker_threads",
]
