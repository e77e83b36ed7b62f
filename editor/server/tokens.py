"""Counting a text's tokens with the loaded model's tokenizer, for "mask this selection" in the
web editor. Only the tokenizer is used, never the model, and never on the event loop."""

from __future__ import annotations

import copy
import threading
from typing import Any

import anyio.to_thread
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE

from editor.server.backend import FillBackend
from editor.server.errors import LimitExceeded
from editor.server.schemas import TokenizeOut
from editor.server.worker import WorkerUnavailable


class TokenCounter:
    # A plain class, not a dataclass: Litestar would try to validate a dataclass dependency's fields.
    def __init__(self, worker: FillBackend, max_chars: int) -> None:
        self.worker = worker
        self.max_chars = max_chars
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    async def count(self, text: str) -> TokenizeOut:
        if len(text) > self.max_chars:
            raise LimitExceeded(
                f"the text is {len(text)} characters long; the limit is {self.max_chars}",
                status=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        if not self.worker.ready or self.worker.model_name is None:
            raise WorkerUnavailable("the model is still loading")
        return await anyio.to_thread.run_sync(self._count, text, self.worker.model_name)

    def _count(self, text: str, model: str) -> TokenizeOut:
        with self._lock:
            tokenizer = self._own_tokenizer()
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces = [tokenizer.decode([token_id]) for token_id in ids]
        return TokenizeOut(count=len(ids), tokens=pieces, model=model)

    def _own_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = private_tokenizer(self.worker)
        return self._tokenizer


def private_tokenizer(worker: FillBackend) -> Any:
    """A private copy of the loaded model's tokenizer: a fast tokenizer is not safe to call from two
    threads at once, and the worker thread uses the model's own."""
    tokenizer = worker.tokenizer
    if tokenizer is None:
        raise WorkerUnavailable("the model is not loaded")
    return copy.deepcopy(tokenizer)


__all__ = ["TokenCounter", "private_tokenizer"]
