"""`editor bench ...`: benchmarks whose results are committed under results/ (each subcommand
lives in its own module here and imports its heavy dependencies inside the command)."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks: print figures, or write them as JSON with --json."""


from editor.benchmarks.batch import batch_bench  # noqa: E402 - registered after the group exists

bench.add_command(batch_bench)

__all__ = ["bench"]
