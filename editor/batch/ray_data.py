"""`editor batch --ray`: the records of a batch run through Ray Data (docs/batch.md, README
"Running on a Ray cluster").

`RayDataFiller` is a `RecordFiller`: `run_records` drives it exactly as it drives `BatchFiller`
(skipping what `--resume` found done, writing each window durably in input order). The windows
become one Ray Data dataset whose `map_batches` runs `BatchFiller.fill` in a pool of actors, each
loading one model once (on one GPU when the cluster has GPUs). Each Ray Data batch is exactly one
window, so a record is filled next to the same records as in a local run and, for a fixed seed,
gets the same output. Records and results travel pickled in a binary column: they are our own
dataclasses, and a record may hold any JSON.

Inference-side code: it imports nothing from `editor.server` or `editor.db`. Ray is imported at
the top: only `--ray` imports this module.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext

from editor.batch.runner import BatchFiller, InputRecord, RecordResult, windows
from editor.batch.template import Template
from editor.models.base import DiffusionModel
from editor.options import SamplerOptions

ModelLoader = Callable[[], DiffusionModel]  # picklable: it runs on every worker


class _FillWorker:
    """One Ray Data actor: one model, filling one window per call."""

    def __init__(
        self,
        load: ModelLoader,
        template: Template,
        options: SamplerOptions,
        batch_size: int,
        max_canvas_tokens: int | None,
    ) -> None:
        self.filler = BatchFiller(load(), template, options, batch_size=batch_size, max_canvas_tokens=max_canvas_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = [pickle.loads(item) for item in batch.column("record").to_pylist()]
        results = self.filler.fill(records)
        return pa.table({"result": pa.array([pickle.dumps(result) for result in results], type=pa.binary())})


class RayDataFiller:
    """Fills records on Ray Data workers; see the module docstring."""

    def __init__(
        self,
        load: ModelLoader,
        template: Template,
        options: SamplerOptions,
        *,
        batch_size: int,
        max_canvas_tokens: int | None = None,
        workers: int = 1,
        gpus: bool = False,
    ) -> None:
        self.load = load
        self.template = template
        self.options = options
        self.batch_size = batch_size
        self.max_canvas_tokens = max_canvas_tokens
        self.workers = workers
        self.gpus = gpus

    def fill_windows(self, records: Sequence[InputRecord], window: int) -> Iterator[list[RecordResult]]:
        if not records:
            return
        DataContext.get_current().execution_options.preserve_order = True  # output in input order
        blocks = [_records_table(chunk) for chunk in windows(records, window)]  # one block per window
        filled = ray.data.from_arrow(blocks).map_batches(
            _FillWorker,
            fn_constructor_kwargs={
                "load": self.load,
                "template": self.template,
                "options": self.options,
                "batch_size": self.batch_size,
                "max_canvas_tokens": self.max_canvas_tokens,
            },
            batch_size=window,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=self.workers),
            num_cpus=1,
            num_gpus=1 if self.gpus else 0,
        )
        for batch in filled.iter_batches(batch_size=window, batch_format="pyarrow"):
            yield [pickle.loads(item) for item in batch.column("result").to_pylist()]


def _records_table(records: Sequence[InputRecord]) -> pa.Table:
    return pa.table({"record": pa.array([pickle.dumps(record) for record in records], type=pa.binary())})


__all__ = ["RayDataFiller"]
