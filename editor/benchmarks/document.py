"""`editor bench document FILE`: the wall time of filling one document, naive loop against the fast
engine at the same steps (the issue's CPU target uses ../shared/bench/three-spans.txt).

`naive` runs the model through a plain `DiffusionModel` view (a full forward pass over the canvas
at every step, float32 logits over the whole vocabulary at every position: the landed loop's
work); `fast` is `editor fill` with the given options (cache, its refresh, logits only at masked
positions). The load average is printed and written: the build machine is shared.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from editor.benchmarks.options import device_option, json_option, model_option, schedule_options, threads_option


@click.command("document")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@model_option
@device_option
@click.option("--dtype", "dtype_name", default=None, help="float32, bfloat16 [default: the model's default]")
@click.option("--steps", "steps_list", default="default", help="comma-separated; 'default' = one per masked token")
@click.option("--refresh", "refresh_list", default="4", help="comma-separated cache_refresh_every for fast; none")
@click.option("--naive/--no-naive", default=True, help="also time the naive loop")
@schedule_options
@click.option("--repeats", type=click.IntRange(min=1), default=3, help="timed runs after one warm-up (median)")
@threads_option
@json_option
def document_bench(
    path: Path,
    model_spec: str,
    device: str,
    dtype_name: str | None,
    steps_list: str,
    refresh_list: str,
    naive: bool,
    schedule: str,
    block_length: int,
    repeats: int,
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Median seconds to fill PATH: naive loop vs the fast engine, at the same steps."""
    import torch

    from editor.benchmarks.engine import CountingModel, Work
    from editor.filling import fill_documents
    from editor.models.loading import load_model, model_dtype_text
    from editor.options import SamplerOptions
    from editor.parser import parse_document

    if threads is not None:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    model = load_model(model_spec, device=device, dtype=dtype)
    document = parse_document(path.read_text(encoding="utf-8"))
    load_before = list(os.getloadavg())
    dtype_used = model_dtype_text(model)
    click.echo(
        f"{model.name} on {device} ({dtype_used}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load_before[0]:.1f}; {path.name}, seed 0, {schedule}"
    )
    figures = []
    for steps_text in steps_list.split(","):
        steps = None if steps_text == "default" else int(steps_text)
        modes: list[tuple[str, SamplerOptions, bool]] = []
        base = SamplerOptions(seed=0, steps=steps, schedule=schedule, block_length=block_length)
        if naive:
            modes.append(("naive", base.model_copy(update={"cache": False}), True))
        for refresh_text in refresh_list.split(","):
            refresh = None if refresh_text == "none" else int(refresh_text)
            modes.append((f"fast-r{refresh_text}", base.model_copy(update={"cache_refresh_every": refresh}), False))
        for mode, options, plain in modes:
            filler = CountingModel(model, Work()) if plain else model
            runs = []
            for attempt in range(repeats + 1):  # the first run warms up
                started = time.perf_counter()
                [result] = fill_documents(filler, [document], options)
                if attempt:
                    runs.append(time.perf_counter() - started)
            figure = {
                "mode": mode,
                "steps_option": steps_text,
                "steps": result.steps,
                "median_s": round(statistics.median(runs), 3),
                "runs_s": [round(run, 3) for run in runs],
            }
            figures.append(figure)
            click.echo(f"{mode:10} steps {result.steps:>4}: median {figure['median_s']:.3f} s  {figure['runs_s']}")
    if json_path is not None:
        payload = {
            "benchmark": "document",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "document": path.name,
            "model": model.name,
            "device": device,
            "dtype": dtype_used,
            "dtype_chosen_by": "--dtype" if dtype_name else "the device default",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "schedule": schedule,
            "block_length": block_length if schedule == "blocks" else None,
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
            "figures": figures,
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_path}")


__all__ = ["document_bench"]
