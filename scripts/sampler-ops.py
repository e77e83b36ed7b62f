"""Count the sampler step's own tensor operations (each one kernel launch on a GPU) and host reads,
with the model's forward passes left out: issue 24's "~210 sampler launches a step".

    python scripts/sampler-ops.py [--steps-per-token 4] [--schedule blocks] [--json results/...]

Runs `editor bench engine`'s setting (one span of --tokens masked positions in a --context canvas of
random literal tokens, the default vocabulary rules) on the bundled model on the CPU and counts, per
step, every aten operation dispatched outside `score`/`score_window`, and among them those that read
a value back to the host (`_local_scalar_dense`: `.item()`, `.tolist()`, `int(tensor)`) or whose
output size depends on values (`nonzero`, `masked_select`, `unique`), which wait for a GPU.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from editor.benchmarks.engine import _OpenVocabulary, _rows
from editor.models.loading import load_model
from editor.options import SamplerOptions
from editor.sampler import SamplerRun

# Operations that only make a new view of a tensor: no kernel on a GPU.
VIEWS = {"view", "unsqueeze", "squeeze", "select", "slice", "flatten", "expand", "t", "transpose", "alias", "detach"}
WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}


class CountOps(TorchDispatchMode):
    """Counts aten ops by name while `counting` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.counting = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.counting:
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


class Uncounted:
    """The model seen by the sampler, its forward passes not counted."""

    def __init__(self, model: Any, counter: CountOps) -> None:
        self._model, self._counter = model, counter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _quiet(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._counter.counting = False
        try:
            return getattr(self._model, method)(*args, **kwargs)
        finally:
            self._counter.counting = True

    def score(self, *args: Any, **kwargs: Any) -> Any:
        return self._quiet("score", *args, **kwargs)

    def score_window(self, *args: Any, **kwargs: Any) -> Any:
        return self._quiet("score_window", *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps-per-token", type=int, default=4, help="tokens committed a step")
    parser.add_argument("--schedule", default="blocks")
    parser.add_argument("--no-repeat-ngram", type=int, default=SamplerOptions().no_repeat_ngram)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("tiny", dtype=torch.float32)
    options = SamplerOptions(
        steps=args.tokens // args.steps_per_token,
        seed=0,
        schedule=args.schedule,
        block_length=32,
        cache=True,
        no_repeat_ngram=args.no_repeat_ngram,
    )
    vocabulary = _OpenVocabulary(model.vocab_size, model.special.mask)
    rows = _rows(args.batch, args.context, args.tokens, model.vocab_size, seed=args.batch)
    counter = CountOps()
    per_step: list[dict[str, int]] = []
    with torch.inference_mode(), counter:
        counter.counting = False
        run = SamplerRun(Uncounted(model, counter), rows, options, vocabulary)  # type: ignore[arg-type]
        while not run.finished:
            counter.ops.clear()
            counter.counting = True
            run.step()
            counter.counting = False
            per_step.append(dict(counter.ops))
    totals = [sum(step.values()) for step in per_step]
    kernels = [sum(count for name, count in step.items() if name not in VIEWS) for step in per_step]
    waits = [sum(count for name, count in step.items() if name in WAITS) for step in per_step]
    overall: Counter[str] = Counter()
    for step in per_step:
        overall.update(step)
    summary = {
        "setting": vars(args) | {"json": None},
        "steps": len(per_step),
        "ops_per_step_median": sorted(totals)[len(totals) // 2],
        "ops_per_step_min_max": [min(totals), max(totals)],
        "kernel_ops_per_step_median": sorted(kernels)[len(kernels) // 2],  # views left out
        "host_waits_per_step_median": sorted(waits)[len(waits) // 2],
        "host_waits_total": sum(waits),
        "top_ops_per_step": {name: round(count / len(per_step), 1) for name, count in overall.most_common(25)},
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
