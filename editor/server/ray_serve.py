"""Model replicas on Ray Serve (`editor serve --replicas N`, README "Running on a Ray cluster").

Each replica is a Serve deployment replica that owns one `ModelWorker` (so one model, with the
same bounded queue, batching and cancellation as the in-process server), on one GPU when the
cluster has GPUs. The Litestar app stays in front: `RayBackend` implements `FillBackend`, so the
controllers do not know the fills run elsewhere. A fill is one streaming Serve call: the replica
yields ("started", replica id), each step (streaming fills only), then ("done", outcome) or
("error", exception); the front relays those into an ordinary `FillJob`. A client that goes away
cancels the Serve call, which cancels the job in the replica at its next step. Serve's
back-pressure (every replica at `max_ongoing_requests`, `max_queued_requests` waiting here) is
the 429; a replica that dies mid-fill is a 503 and Serve starts a new one.

This module imports Ray at the top: only `editor serve --replicas` (and tests) import it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ray
import ray.exceptions
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from editor.chat import Instruction
from editor.document import Document, DocumentError
from editor.options import FillCancelled, SamplerOptions
from editor.ray_cluster import connect, started_local_ray, stop_local_ray, use_gpus
from editor.server.limits import FillTimedOut, LimitExceeded
from editor.server.worker import (
    BackgroundWork,
    CanvasReshape,
    FillJob,
    JobState,
    ModelLoader,
    ModelWorker,
    QueueFull,
    StepUpdate,
    WorkerUnavailable,
)
from editor.settings import Settings

log = logging.getLogger(__name__)

DEPLOYMENT = "FillReplica"
Message = tuple[Literal["started", "step", "done", "error"], Any]


@dataclass(frozen=True)
class RemoteFill:
    """What a replica needs to run one fill (sent pickled)."""

    documents: list[Document]
    options: SamplerOptions
    instruction: Instruction | None
    stream: bool
    keep_trace: bool
    reshape: CanvasReshape | None = None


def _portable(error: BaseException) -> BaseException:
    """The error itself when the front knows its type (it maps to a 4xx/5xx there); anything else
    as a plain RuntimeError with its message, which answers 500 like an error in this process."""
    known = (DocumentError, LimitExceeded, QueueFull, WorkerUnavailable, FillCancelled, FillTimedOut)
    return error if isinstance(error, known) else RuntimeError(f"{type(error).__name__}: {error}")


class FillReplica:
    """One Serve replica: a `ModelWorker` with its model, loaded before the replica counts as up."""

    def __init__(self, settings: Settings, loader: ModelLoader | None = None) -> None:
        self.worker = ModelWorker(settings, loader)
        self.worker.start()
        if not self.worker.wait_ready():
            raise RuntimeError(f"the model failed to load: {self.worker.load_error}")
        self.replica = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> dict[str, Any]:
        """The model's name, note and tokenizer (the front counts tokens with a copy)."""
        return {
            "replica": self.replica,
            "model_name": self.worker.model_name,
            "model_note": self.worker.model_note,
            "model_placement": self.worker.model_placement,
            "tokenizer": self.worker.tokenizer,
        }

    async def fill(self, request: RemoteFill) -> AsyncIterator[Message]:
        try:
            job = self.worker.submit(
                request.documents,
                request.options,
                instruction=request.instruction,
                stream=request.stream,
                keep_trace=request.keep_trace,
                reshape=request.reshape,
            )
        except (QueueFull, WorkerUnavailable) as error:
            yield ("error", error)
            return
        ended = False
        try:
            try:
                await job.wait_started()
                yield ("started", self.replica)
                async for update in job.steps():
                    yield ("step", update)
                outcome = await job.result()
            except Exception as error:
                ended = True
                yield ("error", _portable(error))
                return
            ended = True
            yield ("done", outcome)
        finally:
            if not ended:  # the caller cancelled the call (its client went away)
                job.cancel()

    async def background(self, work: BackgroundWork) -> Any:
        """A piece of a batch job, in the worker's low-priority lane."""
        return await asyncio.wrap_future(self.worker.submit_background(work))

    def check_health(self) -> None:
        if not self.worker.ready:
            raise RuntimeError("the model worker is not running")

    def __del__(self) -> None:
        self.worker.shut_down()


def replica_options(settings: Settings, replicas: int) -> dict[str, Any]:
    """Serve options: one GPU per replica when the cluster has GPUs (and the device is not forced
    to the CPU). Each replica takes as many fills as its worker's queue holds (`queue_size`,
    running ones counted: a fill leaves the queue only once it runs, so more could overflow it);
    this process holds as many again while they wait for a replica (Serve counts a request as
    waiting until it is routed, so a smaller front queue would refuse bursts the replicas have
    room for). Beyond both: 429."""
    gpus = use_gpus(settings.device)
    per_replica = settings.queue_size
    return {
        "name": DEPLOYMENT,
        "num_replicas": replicas,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if gpus else 0},
        "max_ongoing_requests": per_replica,
        "max_queued_requests": replicas * per_replica,
        "health_check_period_s": 2,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
    }


class RayBackend:
    """`FillBackend` on Ray Serve replicas (see the module docstring)."""

    def __init__(self, settings: Settings, *, loader: ModelLoader | None = None, replicas: int | None = None) -> None:
        self.settings = settings
        self.replicas = replicas or settings.replicas or 1
        self._loader = loader
        self._handle: Any = None
        self._info: dict[str, Any] = {}
        self.load_error: BaseException | None = None
        self._started = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._in_flight: set[FillJob] = set()
        self._relays: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._own_ray = False  # this process started Ray (and stops it)

    # -- lifecycle --

    def start(self) -> None:
        """Connect to Ray here, deploy the replicas in a thread (they load their models there)."""
        if self._thread is not None:
            return
        # `editor serve` connects first (in the main thread): the Ray it started is still ours to stop.
        self._own_ray = connect(self.settings.ray_address) or started_local_ray()
        self._thread = threading.Thread(target=self._deploy, name="editor-ray-deploy", daemon=True)
        self._thread.start()

    def _deploy(self) -> None:
        try:
            serve.start(proxy_location="Disabled")
            deployment = serve.deployment(FillReplica, **replica_options(self.settings, self.replicas))
            handle = serve.run(
                deployment.bind(self.settings, self._loader), name=self.settings.ray_app_name, route_prefix=None
            )
            self._info = handle.describe.remote().result()
            self._handle = handle
            log.info("%d replica(s) of %s ready on Ray Serve", self.replicas, self._info["model_name"])
        except BaseException as error:
            self.load_error = error
            log.exception("the replicas failed to start")
        finally:
            self._started.set()

    def shut_down(self) -> None:
        self._stopping = True
        for job in self.jobs:
            job.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel fills in flight and remove the Serve application (and stop the local Ray
        instance if this backend started it)."""
        self.shut_down()
        self._started.wait(timeout)
        if not ray.is_initialized():
            return
        try:
            serve.delete(self.settings.ray_app_name)
        except Exception:
            log.exception("cannot remove the Serve application")
        if self._own_ray and not self.settings.ray_address:
            serve.shutdown()
            stop_local_ray()

    # -- state --

    @property
    def ready(self) -> bool:
        return self._handle is not None and not self._stopping

    @property
    def model_name(self) -> str | None:
        return self._info.get("model_name")

    @property
    def model_note(self) -> str | None:
        return self._info.get("model_note")

    @property
    def model_placement(self) -> str | None:
        return self._info.get("model_placement")

    @property
    def tokenizer(self) -> Any:
        return self._info.get("tokenizer")

    @property
    def lanes(self) -> int:
        return self.replicas  # Serve spreads concurrent background calls over the replicas

    @property
    def queued(self) -> int:
        return len(self._in_flight)

    @property
    def jobs(self) -> list[FillJob]:
        """The fills in flight from this process (waiting at the front, queued or running on a replica)."""
        return list(self._in_flight)

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._started.wait(timeout)
        return self.ready

    # -- fills --

    def _check_open(self) -> Any:
        if self._stopping:
            raise WorkerUnavailable("the server is shutting down")
        if self.load_error is not None:
            raise WorkerUnavailable(f"the model replicas failed to start: {self.load_error}")
        if self._handle is None:
            raise WorkerUnavailable("the model replicas are still starting")
        return self._handle

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
        handle = self._check_open()
        job = FillJob.submitted(
            self.settings, documents, options, instruction=instruction, stream=stream, keep_trace=keep_trace
        )
        loop = job.loop
        call = handle.options(stream=True).fill.remote(
            RemoteFill(job.documents, options, instruction, stream, job.keep_trace, reshape)
        )

        def cancel_call() -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answer
                loop.call_soon_threadsafe(call.cancel)

        job.on_cancel = cancel_call
        self._in_flight.add(job)
        relay = self._keep(loop.create_task(self._relay(job, call), name=f"editor-fill-{job.id}"))
        relay.add_done_callback(lambda _: self._in_flight.discard(job))
        return job

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return task

    async def _relay(self, job: FillJob, call: Any) -> None:
        """Hand the replica's messages to the job, and turn Ray's failures into ours."""
        try:
            async for kind, value in call:
                if kind == "started":
                    job.served_by, job.state = value, "running"
                    job._signal_started()
                elif kind == "step":
                    self._on_step(job, value)
                elif kind == "done":
                    job._finish("done", outcome=value)
                else:
                    job._finish(_state_for(value), error=value)
            if job.state in ("queued", "running"):
                job._finish("failed", error=WorkerUnavailable("the replica ended the fill without an answer"))
        except (RequestCancelledError, asyncio.CancelledError):
            job._finish("cancelled", error=self._cancel_reason(job))
        except BackPressureError:
            job._finish("failed", error=QueueFull(self._retry_after()))
        except (ray.exceptions.RayActorError, DeploymentUnavailableError) as error:
            log.warning("fill %s lost its replica: %s", job.id, error)
            job._finish(
                "failed",
                error=WorkerUnavailable(
                    f"the replica running this fill stopped ({type(error).__name__}) after {job.steps_done} "
                    "steps; nothing was stored. Retry: the other replicas (and a restarted one) take fills"
                ),
            )
        except Exception as error:  # a bug on the way: a 500 that names it, never a job left waiting
            job._finish("failed", error=RuntimeError(f"the fill failed on its replica: {error}"))

    def _cancel_reason(self, job: FillJob) -> BaseException:
        if self._stopping:
            return WorkerUnavailable(
                f"the server is shutting down: the fill was cancelled after {job.steps_done} steps; nothing was stored"
            )
        return FillCancelled(f"fill cancelled after {job.steps_done} steps")

    @staticmethod
    def _on_step(job: FillJob, update: StepUpdate) -> None:
        job.steps_done = update.step + 1
        job._publish(update)  # the trace, when kept, comes with the outcome

    def _retry_after(self) -> int:
        """Seconds until a replica has likely taken one more batch: a guess from the load."""
        batches = len(self._in_flight) / max(1, self.replicas * self.settings.max_batch_rows)
        return max(1, min(60, math.ceil(batches)))

    def submit_background(self, work: BackgroundWork) -> concurrent.futures.Future[Any]:
        """`work(model)` on one replica's low-priority lane (call on the event loop)."""
        handle = self._check_open()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        call = handle.background.remote(work)

        async def relay() -> None:
            try:
                future.set_result(await call)
            except BackPressureError:
                future.set_exception(QueueFull(self._retry_after()))
            except (ray.exceptions.RayActorError, DeploymentUnavailableError) as error:
                future.set_exception(WorkerUnavailable(f"the replica running a batch chunk stopped: {error}"))
            except BaseException as error:
                future.set_exception(error)

        self._keep(asyncio.get_running_loop().create_task(relay()))
        return future


def _state_for(error: BaseException) -> JobState:
    return "cancelled" if isinstance(error, FillCancelled) else "failed"


__all__ = ["FillReplica", "RayBackend", "RemoteFill", "replica_options"]
