"""`editor batch`: fill a JSON template (or one derived from a JSON Schema) for every record of a
JSONL file (docs/batch.md). torch and the model stack are imported inside the command."""

from __future__ import annotations

import stat
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import click

from editor.cli_options import apply_threads, options_from, quantize_option, sampler_options, threads_option
from editor.options import SamplerOptions

if TYPE_CHECKING:
    from editor.batch.runner import RecordFiller


def _read_text(name: str, what: str) -> str:
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.ClickException(f"cannot read the {what} {name}: {error}") from error


def _batch_options(sampler: dict[str, Any]) -> SamplerOptions:
    """The command line's sampler options. Without --schedule, the batch defaults apply (today the
    same as `editor fill`'s; --steps still applies); with --schedule, the same defaults as `editor fill`."""
    from editor.batch.runner import BATCH_DEFAULTS

    context = click.get_current_context()
    values = dict(sampler)
    if context.get_parameter_source("schedule") in (click.core.ParameterSource.DEFAULT, None):
        values["schedule"] = BATCH_DEFAULTS.schedule
        if context.get_parameter_source("steps") in (click.core.ParameterSource.DEFAULT, None):
            values["steps"] = BATCH_DEFAULTS.steps
    return options_from(values)


@click.command()
@click.argument("inputs", nargs=-1, metavar="[TEMPLATE] RECORDS")
@click.option("-o", "--output", "output_name", default=None, help="output JSONL file, or - for stdout  [required]")
@click.option(
    "--schema", "schema_name", default=None, help="derive the template from this JSON Schema file (then no TEMPLATE)"
)
@click.option("--resume", is_flag=True, help="continue an interrupted run: skip ids already in the output file")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="records per sampler call [default: EDITOR_BATCH_SIZE, else 16]",
)
@click.option("--max-records", type=click.IntRange(min=1), default=None, help="stop after this many input records")
@click.option(
    "--model", "model_spec", default=None, help="Hugging Face id or local directory [default: the bundled model]"
)
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N [default: EDITOR_DEVICE, else auto]")
@click.option("--instruction", default=None, help="user turn for instruct models; may use {field} placeholders")
@click.option("--print-template", is_flag=True, help="print the (derived) template and exit")
@quantize_option
@threads_option
@click.option("--progress/--no-progress", default=True, help="progress bar on stderr")
@click.option(
    "--ray", "use_ray", is_flag=True, help="fill on Ray Data workers, one model each (README: Running on a Ray cluster)"
)
@click.option(
    "--address", default=None, help="with --ray: the cluster to join [default: EDITOR_RAY_ADDRESS, else a local Ray]"
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="with --ray: workers, one model each [default: EDITOR_RAY_BATCH_WORKERS, else 1]",
)
@sampler_options
def batch(
    inputs: tuple[str, ...],
    output_name: str | None,
    schema_name: str | None,
    resume: bool,
    batch_size: int | None,
    max_records: int | None,
    model_spec: str | None,
    device: str | None,
    instruction: str | None,
    print_template: bool,
    quantize: str | None,
    threads: int | None,
    progress: bool,
    use_ray: bool,
    address: str | None,
    workers: int | None,
    **sampler: Any,
) -> None:
    """Fill TEMPLATE (a JSON file with [MASK ...] tags and {field} placeholders) for every record
    of RECORDS (JSONL; - for stdin), writing one JSON line per input line to --output.

    With --schema, the template is derived from a JSON Schema and TEMPLATE is left out. schedule
    and steps default to the threshold schedule with at most 2 steps (fast); every sampler option
    can be given. Each output line is {"custom_id", "output", "spans", "error"}."""
    from editor.batch.schema import template_from_schema
    from editor.batch.template import Template, TemplateError
    from editor.parser import suspicious_tags
    from editor.settings import Settings

    settings = Settings()
    if quantize is not None:
        settings = settings.model_copy(update={"quantize": quantize})
    options = _batch_options(sampler)
    if not use_ray and (address is not None or workers is not None):
        raise click.UsageError("--address and --workers go with --ray")
    expected = 1 if schema_name else 2
    if len(inputs) != expected and not (print_template and len(inputs) == expected - 1):
        usage = "--schema SCHEMA RECORDS" if schema_name else "TEMPLATE RECORDS"
        raise click.UsageError(f"expected {usage}, got {len(inputs)} argument(s)")
    try:
        if schema_name is not None:
            derived = template_from_schema(_read_text(schema_name, "schema"), settings.document_limits())
            template = derived.compile(settings.document_limits(), instruction=instruction)
            template_text = derived.text
        else:
            template_text = _read_text(inputs[0], "template")
            template = Template.parse(template_text, limits=settings.document_limits(), instruction=instruction)
    except TemplateError as error:
        raise click.ClickException(f"{schema_name or inputs[0]}: {error}") from error
    if schema_name is None:
        for warning in suspicious_tags(template_text):
            click.echo(f"warning: {inputs[0]}: {warning}", err=True)
    if print_template:
        click.echo(template_text)
        return
    if output_name is None:
        raise click.UsageError("missing option -o/--output (a file, or - for stdout)")
    records_name = inputs[-1]
    if resume and output_name == "-":
        raise click.UsageError("--resume needs an output file, not -")
    _run(
        template,
        options,
        settings,
        records_name=records_name,
        output_name=output_name,
        resume=resume,
        batch_size=batch_size or settings.batch_size,
        max_records=max_records,
        model_spec=model_spec,
        device=device,
        threads=threads,
        progress=progress,
        ray_workers=(workers or settings.ray_batch_workers) if use_ray else None,
        ray_address=address or settings.ray_address,
    )


def _run(
    template: Any,
    options: SamplerOptions,
    settings: Any,
    *,
    records_name: str,
    output_name: str,
    resume: bool,
    batch_size: int,
    max_records: int | None,
    model_spec: str | None,
    device: str | None,
    threads: int | None,
    progress: bool,
    ray_workers: int | None,
    ray_address: str | None,
) -> None:
    from tqdm import tqdm

    from editor.batch.runner import BatchFiller, ResultWriter, read_done_ids, read_input, run_records
    from editor.models.loading import load_configured
    from editor.models.native import ModelLoadError
    from editor.models.quantize import QuantizeError

    with ExitStack() as stack:
        source: IO[str] = sys.stdin if records_name == "-" else stack.enter_context(_open_records(records_name))
        records = read_input(source, max_chars=settings.max_record_chars)
    if max_records is not None:
        records = records[:max_records]
    done = read_done_ids(Path(output_name)) if resume else set()
    apply_threads(threads, settings.torch_threads)  # this process's; Ray workers keep their own
    filler: RecordFiller
    if ray_workers is not None:
        filler = _ray_filler(template, options, settings, model_spec, device, batch_size, ray_workers, ray_address)
    else:
        try:
            model = load_configured(settings, model=model_spec, device=device)
        except (ModelLoadError, QuantizeError, OSError) as error:
            raise click.ClickException(f"cannot load the model: {error}") from error
        limit = settings.max_canvas_tokens
        filler = BatchFiller(model, template, options, batch_size=batch_size, max_canvas_tokens=limit)
    with ExitStack() as stack:
        stream: BinaryIO = (
            sys.stdout.buffer
            if output_name == "-"
            else stack.enter_context(Path(output_name).open("ab" if resume else "wb"))
        )
        writer = ResultWriter(stream, sync=_is_regular_file(stream))
        todo = sum(1 for record in records if record.custom_id not in done)
        bar = stack.enter_context(
            tqdm(total=todo, unit="rec", desc="batch", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        )
        summary = run_records(
            filler, records, writer, done_ids=done, on_progress=lambda results: bar.update(len(results))
        )
    errors = ", ".join(f"{code}: {count}" for code, count in sorted(summary.errors.items()))
    click.echo(
        f"done {summary.done}, failed {summary.failed}{f' ({errors})' if errors else ''}, skipped {summary.skipped} "
        f"(already in the output), elapsed {summary.elapsed_s:.1f} s, {summary.records_per_s:.1f} records/s, "
        f"{summary.tokens_per_s:.0f} tokens/s",
        err=True,
    )


def _ray_filler(
    template: Any,
    options: SamplerOptions,
    settings: Any,
    model_spec: str | None,
    device: str | None,
    batch_size: int,
    workers: int,
    address: str | None,
) -> RecordFiller:
    """A `RayDataFiller` on the cluster at `address` (or a local Ray); the workers load the model."""
    from functools import partial

    from editor.models.loading import load_configured

    try:
        from editor.batch.ray_data import RayDataFiller
        from editor.ray_cluster import connect, use_gpus
    except ImportError as error:
        raise click.ClickException(f"--ray needs Ray: pip install 'dllm-editor[ray]' ({error})") from error

    try:
        connect(address)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError or ValueError here
        raise click.ClickException(f"cannot join the Ray cluster at {address or '(local)'}: {error}") from error
    return RayDataFiller(
        partial(load_configured, settings, model=model_spec, device=device),
        template,
        options,
        batch_size=batch_size,
        max_canvas_tokens=settings.max_canvas_tokens,
        workers=workers,
        gpus=use_gpus(device or settings.device),
    )


def _open_records(name: str) -> IO[str]:
    try:
        return Path(name).open(encoding="utf-8", errors="replace")
    except OSError as error:
        raise click.ClickException(f"cannot read the records {name}: {error}") from error


def _is_regular_file(stream: BinaryIO) -> bool:
    import os

    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):
        return False


__all__ = ["batch"]
