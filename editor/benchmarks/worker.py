"""`editor bench worker`: the model worker under staggered arrivals, static batching against
continuous (step-level) batching, results committed in results/worker-bench.md.

N fills of mixed lengths are submitted to a `ModelWorker` at fixed intervals, as an API server
would; each mode gets a fresh worker over the same loaded model, the same documents, seeds and
arrival times. Latency is submission to result, as the event loop sees it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from editor.benchmarks.options import device_option, json_option, model_option, threads_option

MODES = ("static", "continuous")


@dataclass(frozen=True)
class ModeFigures:
    mode: str
    fills: int
    masked_tokens: int
    makespan_s: float  # first submission to last result
    fills_per_s: float
    tokens_per_s: float
    mean_latency_s: float
    p50_latency_s: float
    p90_latency_s: float
    max_latency_s: float
    latencies_s: list[float]  # per fill, in submission order


def fill_source(index: int, masks: int) -> str:
    """A short document with one span of `masks` tokens (the canvas grows with it)."""
    return f"Note {index}: the meeting about the budget [MASK {masks}] and then everyone went home."


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def _workload(worker: Any, documents: list[Any], options: Any, interval_s: float) -> list[tuple[float, Any]]:
    """Submit document i at i * interval_s; (latency, outcome) per document."""
    start = time.perf_counter()

    async def one(index: int, document: Any) -> tuple[float, Any]:
        await asyncio.sleep(max(0.0, start + index * interval_s - time.perf_counter()))
        submitted = time.perf_counter()
        outcome = await worker.submit([document], options.model_copy(update={"seed": index})).result()
        return time.perf_counter() - submitted, outcome

    return list(await asyncio.gather(*(one(i, d) for i, d in enumerate(documents))))


@click.command("worker")
@model_option
@device_option
@click.option("--fills", type=click.IntRange(min=1), default=40, help="fills submitted")
@click.option("--masks", default="4,32,8,64,16", help="comma-separated masked tokens per fill, cycled")
@click.option("--interval-ms", type=click.FloatRange(min=0), default=40.0, help="gap between two submissions")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="[default: one per masked token]")
@click.option("--rows", type=click.IntRange(min=1), default=8, help="max_batch_rows")
@click.option("--mode", "modes", multiple=True, type=click.Choice(MODES), default=MODES, help="[default: both]")
@threads_option
@json_option
def worker_bench(
    model_spec: str,
    device: str,
    fills: int,
    masks: str,
    interval_ms: float,
    steps: int | None,
    rows: int,
    modes: tuple[str, ...],
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Static vs continuous batching in the model worker: fills/s, tokens/s, mean and p90 latency."""
    import torch

    from editor.models.loading import load_configured
    from editor.options import SamplerOptions
    from editor.parser import parse_document
    from editor.server.worker import ModelWorker
    from editor.settings import Settings

    if threads is not None:
        torch.set_num_threads(threads)
    sizes = [int(size) for size in masks.split(",")]
    counts = [sizes[i % len(sizes)] for i in range(fills)]
    documents = [parse_document(fill_source(i, n)) for i, n in enumerate(counts)]
    options = SamplerOptions(steps=steps)
    model = load_configured(Settings(), model=model_spec, device=device)  # EDITOR_DTYPE, EDITOR_CUDA_GRAPHS as served
    load_before = list(os.getloadavg())
    figures: list[ModeFigures] = []
    texts: dict[str, list[str]] = {}
    for mode in modes:
        settings = Settings(
            _env_file=None,
            device=device,
            max_batch_rows=rows,
            queue_size=fills + 1,
            fill_timeout_s=3600,
            continuous_batching=mode == "continuous",
        )
        worker = ModelWorker(settings, loader=lambda: model)
        worker.start()
        if not worker.wait_ready(600):
            raise click.ClickException(f"the model failed to load: {worker.load_error}")
        try:
            asyncio.run(_workload(worker, documents[:2], options, 0.0))  # warm-up: vocabulary masks, allocator
            outcomes = asyncio.run(_workload(worker, documents, options, interval_ms / 1000))
        finally:
            worker.stop()
        latencies = [latency for latency, _ in outcomes]
        last = max(i * interval_ms / 1000 + latency for i, latency in enumerate(latencies))
        texts[mode] = [outcome.results[0].text for _, outcome in outcomes]
        figures.append(
            ModeFigures(
                mode=mode,
                fills=fills,
                masked_tokens=sum(counts),
                makespan_s=last,
                fills_per_s=fills / last,
                tokens_per_s=sum(counts) / last,
                mean_latency_s=statistics.fmean(latencies),
                p50_latency_s=_percentile(latencies, 0.5),
                p90_latency_s=_percentile(latencies, 0.9),
                max_latency_s=max(latencies),
                latencies_s=[round(latency, 4) for latency in latencies],
            )
        )
    hardware = (
        torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    click.echo(
        f"{model.name} on {hardware}, torch {torch.__version__}, {torch.get_num_threads()} threads; {fills} fills "
        f"of {masks} masked tokens every {interval_ms:g} ms, max {rows} rows; load average {load_before[0]:.1f}"
    )
    click.echo(f"{'mode':11} {'fills/s':>8} {'tokens/s':>9} {'mean s':>7} {'p50 s':>7} {'p90 s':>7} {'max s':>7}")
    for figure in figures:
        click.echo(
            f"{figure.mode:11} {figure.fills_per_s:>8.2f} {figure.tokens_per_s:>9.1f} {figure.mean_latency_s:>7.3f} "
            f"{figure.p50_latency_s:>7.3f} {figure.p90_latency_s:>7.3f} {figure.max_latency_s:>7.3f}"
        )
    same = len({tuple(values) for values in texts.values()}) == 1
    click.echo(f"same texts in every mode: {same}")
    if json_path is not None:
        payload = {
            "benchmark": "worker",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": hardware,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
            "model": model.name,
            "fills": fills,
            "masks": sizes,
            "interval_ms": interval_ms,
            "max_batch_rows": rows,
            "options": options.model_dump(),
            "same_texts_in_every_mode": same,
            "figures": [asdict(figure) for figure in figures],
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_path}")


__all__ = ["fill_source", "worker_bench"]
