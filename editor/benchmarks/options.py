"""Command-line options that several `editor bench` commands share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from editor.options import SCHEDULES

F = TypeVar("F", bound=Callable[..., Any])

model_option = click.option("--model", "model_spec", default="tiny", help="model to measure (tiny = the bundled model)")
device_option = click.option("--device", default="cpu", help="cpu, cuda, cuda:N")
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads [default: torch's]"
)
json_option = click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write JSON here"
)


def schedule_options(command: F) -> F:
    """--schedule and --block-length, as the sampler takes them."""
    command = click.option(
        "--block-length", default=32, type=click.IntRange(1), help="masked positions per block (blocks schedule)"
    )(command)
    return click.option(
        "--schedule", default="confidence", type=click.Choice(SCHEDULES), help="the sampler's schedule"
    )(command)


__all__ = ["device_option", "json_option", "model_option", "schedule_options", "threads_option"]
