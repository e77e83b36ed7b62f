"""The `editor` command: fill, training, evaluation (and serve/db/batch from their own modules)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from editor import __version__
from editor.batch.commands import batch
from editor.benchmarks import bench
from editor.cli_options import apply_threads, options_from, quantize_option, sampler_options, threads_option
from editor.document import DocumentError
from editor.server.commands import db, serve
from editor.training.commands import evaluate, prepare_data, train, train_tokenizer

if TYPE_CHECKING:
    from editor.document import Document
    from editor.options import SamplerOptions


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
@quantize_option
@threads_option
@sampler_options
def fill(
    document: Any,
    model_spec: str | None,
    device: str | None,
    instruction: str | None,
    as_json: bool,
    quantize: str | None,
    threads: int | None,
    **sampler: Any,
) -> None:
    """Fill the masks of DOCUMENT (a file, or - for stdin) and print the text.

    Limits (document size, spans, canvas length) come from the same EDITOR_* settings as the server."""
    from editor.parser import parse_document, suspicious_tags
    from editor.settings import Settings

    settings = Settings()
    options = options_from(sampler)
    source = document.read()
    try:
        parsed = parse_document(source, settings.document_limits())
    except DocumentError as error:
        raise click.ClickException(f"{document.name}: {error}") from error
    for warning in suspicious_tags(source):
        click.echo(f"warning: {document.name}: {warning}", err=True)
    if not parsed.spans:  # nothing to fill: no model to load (seconds) to print the text back
        click.echo(f"note: {document.name}: no [MASK ...] tag, so nothing is filled", err=True)
        _print_result(_unfilled(parsed, options, model_spec or settings.model or "default"), as_json=as_json)
        return
    from editor.filling import fill_documents  # torch: imported only when there is something to fill

    apply_threads(threads, settings.torch_threads)
    model = _load(settings, model_spec, device, quantize)
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
    _print_result(result.to_dict(), as_json=as_json)


def _load(settings: Any, model_spec: str | None, device: str | None, quantize: str | None) -> Any:
    """The configured model; a quantization this machine cannot run is a usage error, not a traceback."""
    from editor.models.loading import load_configured
    from editor.models.quantize import QuantizeError

    try:
        return load_configured(settings, model=model_spec, device=device, quantize=quantize)
    except QuantizeError as error:
        raise click.ClickException(str(error)) from error


def _unfilled(document: Document, options: SamplerOptions, model: str) -> dict[str, Any]:
    """The result of a document with no span, as `FillResult.to_dict` writes one: its text (escapes
    resolved), no spans, no steps; `model` is the one that would have been loaded."""
    text = "".join(segment for segment in document.segments if isinstance(segment, str))
    seed = options.seed or 0  # nothing is drawn: any seed gives this result
    fields = {"text": text, "spans": [], "model": model, "seed": seed, "steps": 0, "elapsed_s": 0.0}
    return fields | {"options": options.model_dump()}


def _print_result(payload: dict[str, Any], *, as_json: bool) -> None:
    if not as_json:
        click.echo(payload["text"])
        return
    keys = ("text", "spans", "model", "seed", "steps", "elapsed_s", "options")
    click.echo(json.dumps({k: payload[k] for k in keys}, ensure_ascii=False, indent=2))


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


for command in (serve, db, batch, bench, train_tokenizer, prepare_data, train, evaluate):
    main.add_command(command)


if __name__ == "__main__":
    main()
