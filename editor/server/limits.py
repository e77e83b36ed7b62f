"""Errors for requests that would cause more work than the settings allow (imported by the worker
and by the error handlers, so it depends on neither, nor on the web framework: the worker and its
benchmark run where Litestar is not installed)."""

from __future__ import annotations

from http import HTTPStatus


class LimitExceeded(ValueError):
    """A request over one of the configured limits; `status` is 413 for size, else 422. The message
    names the setting (e.g. `max_steps`) so an operator knows what to raise."""

    def __init__(self, message: str, *, status: int = HTTPStatus.UNPROCESSABLE_ENTITY) -> None:
        super().__init__(message)
        self.status = status


class FillTimedOut(RuntimeError):
    """A fill ran past `fill_timeout_s` and was cancelled (answered 504)."""


__all__ = ["FillTimedOut", "LimitExceeded"]
