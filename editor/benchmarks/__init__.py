"""`editor bench ...`: benchmarks whose results are committed under results/ (each subcommand
lives in its own module here and imports its heavy dependencies inside the command)."""

from __future__ import annotations

import click


@click.group()
def bench() -> None:
    """Benchmarks: print figures, or write them as JSON with --json."""


from editor.benchmarks.batch import batch_bench  # noqa: E402 - registered after the group exists
from editor.benchmarks.document import document_bench  # noqa: E402
from editor.benchmarks.engine import engine  # noqa: E402
from editor.benchmarks.fills import fills_bench  # noqa: E402
from editor.benchmarks.patterns import patterns_bench  # noqa: E402
from editor.benchmarks.quality import engine_quality  # noqa: E402
from editor.benchmarks.worker import worker_bench  # noqa: E402

bench.add_command(batch_bench)
bench.add_command(document_bench)
bench.add_command(engine)
bench.add_command(fills_bench)
bench.add_command(patterns_bench)
bench.add_command(engine_quality)
bench.add_command(worker_bench)

__all__ = ["bench"]
