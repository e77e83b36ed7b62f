"""`editor bench batch`: records/s and tokens/s of `editor batch` on a fixed synthetic job
(1,000 product records, 3 spans each), results committed in results/batch-bench.md."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from editor.benchmarks.options import device_option, json_option, model_option, threads_option

# Three spans per record: free text, a word and an integer; the record supplies name and brand.
TEMPLATE = (
    '{"sku": "{sku}", "name": "{name}", "brand": "{brand}", "description": "[MASK 8]", '
    '"color": "[MASK 2 as=word]", "price": "[MASK 2 as=int]"}'
)
_NAMES = ("cotton shirt", "wool scarf", "leather belt", "running shoe", "rain jacket", "linen dress", "denim cap")
_BRANDS = ("Acme", "Northwind", "Globex", "Initech", "Umbrella")


def product_records(count: int) -> list[dict[str, Any]]:
    """Deterministic synthetic products."""
    return [
        {
            "custom_id": f"p{number:05d}",
            "sku": f"SKU-{number * 7919 % 100000:05d}",
            "name": f"{_NAMES[number % len(_NAMES)]} no. {number % 50}",
            "brand": _BRANDS[number % len(_BRANDS)],
        }
        for number in range(count)
    ]


@click.command("batch")
@model_option
@device_option
@click.option("--records", type=click.IntRange(min=1), default=1000, help="synthetic records")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="records per sampler call")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="[default: the batch default]")
@threads_option
@json_option
def batch_bench(
    model_spec: str,
    device: str,
    records: int,
    batch_size: int,
    steps: int | None,
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Fill the synthetic product job with `editor batch`'s runner; print records/s and tokens/s."""
    import torch

    from editor.batch.runner import BATCH_DEFAULTS, BatchFiller, ResultWriter, read_input, run_records
    from editor.batch.template import Template
    from editor.models.loading import load_configured
    from editor.settings import Settings

    if threads is not None:
        torch.set_num_threads(threads)
    options = BATCH_DEFAULTS.model_copy(update={"seed": 0} | ({"steps": steps} if steps else {}))
    model = load_configured(Settings(), model=model_spec, device=device)  # EDITOR_DTYPE, EDITOR_CUDA_GRAPHS as served
    template = Template.parse(TEMPLATE)
    inputs = read_input((json.dumps(r) for r in product_records(records)), max_chars=100_000)
    filler = BatchFiller(model, template, options, batch_size=batch_size, max_canvas_tokens=4096)
    filler.fill(inputs[:batch_size])  # warm-up: vocabulary masks, allocator
    with tempfile.TemporaryDirectory() as directory, (Path(directory) / "out.jsonl").open("wb") as stream:
        summary = run_records(filler, inputs, ResultWriter(stream))
    result = {
        "benchmark": "batch",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_name(model.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "model": model.name,
        "records": records,
        "spans_per_record": 3,
        "batch_size": batch_size,
        "options": options.model_dump(),
        "template": TEMPLATE,
        **summary.to_dict(),
    }
    click.echo(
        f"{summary.records_per_s:.1f} records/s, {summary.tokens_per_s:.0f} tokens/s "
        f"({summary.done} done, {summary.failed} failed, {summary.elapsed_s:.1f} s) on {result['device']}"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


__all__ = ["TEMPLATE", "batch_bench", "product_records"]
