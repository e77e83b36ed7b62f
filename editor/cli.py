"""The `editor` command: fill, training, evaluation (and serve/db/batch from their own modules)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, get_args

import click

from editor import __version__
from editor.document import DocumentError
from editor.options import SCHEDULES, SamplerOptions

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="editor")
def main() -> None:
    """Constrained and infilling text editing on masked diffusion language models."""


@main.command()
@click.argument("document", type=click.File("r", encoding="utf-8"))
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="default, tiny, a Hugging Face id or a local directory [default: EDITOR_MODEL, else default]",
)
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N [default: EDITOR_DEVICE, else auto]")
@click.option("--instruction", default=None, help="user turn for instruct models' chat template")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON with span offsets")
@sampler_options
def fill(
    document: Any, model_spec: str | None, device: str | None, instruction: str | None, as_json: bool, **sampler: Any
) -> None:
    """Fill the masks of DOCUMENT (a file, or - for stdin) and print the text.

    Limits (document size, spans, canvas length) come from the same EDITOR_* settings as the server."""
    from editor.filling import fill_documents
    from editor.models.loading import load_configured
    from editor.parser import parse_document
    from editor.settings import Settings

    settings = Settings()
    options = options_from(sampler)
    try:
        parsed = parse_document(document.read(), settings.document_limits())
    except DocumentError as error:
        raise click.ClickException(f"{document.name}: {error}") from error
    model = load_configured(settings, model=model_spec, device=device)
    try:
        with StepProgress(enabled=sys.stderr.isatty() and not as_json) as progress:
            [result] = fill_documents(
                model,
                [parsed],
                options,
                instruction=instruction or settings.instruction,
                max_canvas_tokens=settings.max_canvas_tokens,
                on_step=progress.advance,
            )
    except DocumentError as error:
        raise click.ClickException(f"{document.name}: {error}") from error
    if as_json:
        payload = result.to_dict()
        click.echo(
            json.dumps(
                {k: payload[k] for k in ("text", "spans", "model", "seed", "steps", "elapsed_s", "options")},
                ensure_ascii=False,
                indent=2,
            )
        )
    else:
        click.echo(result.text)


class StepProgress:
    """A transient progress bar of committed tokens on stderr (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(unit="tok", desc="denoising", leave=False, file=sys.stderr)
        return self

    def advance(self, event: Any) -> None:
        if self._bar is not None:
            if self._bar.total is None:
                self._bar.total = len(event.commits) + sum(event.remaining)
            self._bar.update(len(event.commits))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


@main.command("models")
def models_command() -> None:
    """List the models this installation can load offline: name, parameters, size, origin."""
    from rich.console import Console
    from rich.table import Table

    from editor.models.catalog import list_models

    table = Table("name", "available", "parameters", "size on disk", "origin")
    for entry in list_models():
        table.add_row(entry.name, "yes" if entry.available else "no", entry.parameters, entry.size, entry.origin)
    Console().print(table)


from editor.batch.commands import batch  # noqa: E402 - registered after the group exists
from editor.benchmarks import bench  # noqa: E402
from editor.server.commands import db, serve  # noqa: E402
from editor.training.commands import evaluate, prepare_data, train, train_tokenizer  # noqa: E402

sampler_options(batch)  # the same sampler flags as `fill` (added here: they live in this module)
for command in (serve, db, batch, bench, train_tokenizer, prepare_data, train, evaluate):
    main.add_command(command)


if __name__ == "__main__":
    main()
