"""Options shared by the `editor` commands (fill, batch): the sampler flags and --threads.

Imported by `editor.cli` and `editor.batch.commands` alike, so neither imports the other. Pure
click and pydantic: no torch import (`editor --help` stays fast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import click

from editor.options import REFERENCE_SCHEDULES, SCHEDULES, SamplerOptions

Command = Callable[..., Any]


class OptionalInt(click.ParamType):  # type: ignore[type-arg]  # generic only in recent click
    """An integer, or `none` for an option whose None means something (`--cache-refresh-every none`:
    refresh at block starts only)."""

    name = "integer|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "none":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither an integer nor 'none'", param, ctx)


def sampler_options(command: Command) -> Command:
    """Add one flag per `SamplerOptions` field, with its description and default in --help."""
    for name, field in reversed(list(SamplerOptions.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        kind: Any = field.annotation
        if name == "schedule":
            kind = click.Choice(SCHEDULES)
        elif name == "reference":
            kind = click.Choice(tuple(REFERENCE_SCHEDULES))
        elif get_args(kind):  # Optional[int]: an integer, or `none` where None is not the default
            kind = next(a for a in get_args(kind) if a is not type(None))
            if kind is int and field.default is not None:
                kind = OptionalInt()
        default = field.default
        help_text = field.description or ""
        if default is None:
            help_text += {
                "steps": " [default: one per masked token]",
                "seed": " [default: random, printed with --json]",
                "reference": " [default: our own schedules]",
            }.get(name, "")
        command = click.option(
            flag, name, type=kind, default=default, show_default=default is not None, help=help_text
        )(command)
    return command


def options_from(values: dict[str, Any]) -> SamplerOptions:
    try:
        return SamplerOptions(**{name: values[name] for name in SamplerOptions.model_fields})
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


def threads_option(command: Command) -> Command:
    """--threads N: torch's CPU threads for this command (see `apply_threads`)."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        show_default=False,
        help="torch CPU threads [default: EDITOR_TORCH_THREADS, else one core fewer than the machine has]",
    )(command)


def quantize_option(command: Command) -> Command:
    """--quantize none|int8|fp8: how the model's linear weights are stored (EDITOR_QUANTIZE)."""
    return click.option(
        "--quantize",
        type=click.Choice(("none", "int8", "fp8")),
        default=None,
        show_default=False,
        help="store the linear weights as int8 (any device) or fp8 (GPUs of compute capability 8.9+); needs "
        "torchao [default: EDITOR_QUANTIZE, else none]",
    )(command)


def apply_threads(threads: int | None, configured: int) -> int | None:
    """Set torch's threads from --threads, else `configured` (EDITOR_TORCH_THREADS), by the
    server's rule; returns the count applied (None: torch's own, as OMP_NUM_THREADS says)."""
    from editor.threads import use_torch_threads

    return use_torch_threads(threads or configured)


__all__ = [
    "Command",
    "OptionalInt",
    "apply_threads",
    "options_from",
    "quantize_option",
    "sampler_options",
    "threads_option",
]
