"""The one interface the app needs from whatever runs fills: `FillBackend`.

Two implementations: `editor.server.worker.ModelWorker` (one model in a thread of this process,
the default) and `editor.server.ray_serve.RayBackend` (`editor serve --replicas N`: the same
worker inside each of N Ray Serve replicas). Controllers, the batch runner and the readiness check
only use what is listed here, so they do not know which one runs.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from editor.chat import Instruction
from editor.document import Document
from editor.options import SamplerOptions
from editor.server.worker import BackgroundWork, CanvasReshape, FillJob


@runtime_checkable
class FillBackend(Protocol):
    @property
    def ready(self) -> bool:
        """The model is loaded (on at least one replica) and fills are accepted."""

    @property
    def model_name(self) -> str | None: ...

    @property
    def model_note(self) -> str | None: ...

    @property
    def model_placement(self) -> str | None:
        """Where the loaded model runs, its dtype and its weights ("cpu, bfloat16, weights 270.0 MB")."""

    @property
    def load_error(self) -> BaseException | None: ...

    @property
    def queued(self) -> int:
        """Fills waiting (the worker's queue; with replicas, fills in flight from this process)."""

    @property
    def lanes(self) -> int:
        """How many pieces of background work can run at once (one per model)."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None before it has loaded (copied before use: not thread-safe)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def shut_down(self) -> None:
        """Refuse new fills and cancel running ones, without waiting (safe from a signal handler)."""

    def wait_ready(self, timeout: float | None = None) -> bool: ...

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
        """Queue a fill; call on the event loop. Raises `QueueFull` or `WorkerUnavailable`.
        `reshape` is applied to each canvas once laid out (it must be picklable)."""

    def submit_background(self, work: BackgroundWork) -> concurrent.futures.Future[Any]:
        """Low-priority work (`work(model)`, a piece of a batch job); `work` must be picklable."""


__all__ = ["FillBackend"]
