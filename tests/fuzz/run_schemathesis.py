"""The long schemathesis run (not collected by pytest): every operation of the OpenAPI document,
positive and negative cases, against a live loopback server on a tiny random model; prints calls
made, the status counts, every 5xx and every conformance failure, and writes them as Markdown.

    .venv/bin/python -m tests.fuzz.run_schemathesis --examples 500 --out results/fuzz-run.md
    .venv/bin/python -m tests.fuzz.run_schemathesis --stateful --minutes 10 --out results/fuzz-stateful.md

With --stateful, random sequences of linked calls (the document's OpenAPI links) run until the
time is up; the report adds the calls per operation and anything acknowledged that was lost, and
--json writes the figures as JSON too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from editor.models.loading import load_model
from editor.training.tokenizer import train_tokenizer
from tests.api_fixtures import make_settings, save_tiny_model
from tests.conftest import _tiny_corpus
from tests.fuzz.harness import FuzzReport, StatefulReport, fuzz, fuzz_stateful_for, serve_in_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per operation and generation mode")
    parser.add_argument("--seed", type=int, default=None, help="derandomize with this seed (default: random)")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (Markdown)")
    parser.add_argument("--stateful", action="store_true", help="sequences of linked calls instead")
    parser.add_argument("--minutes", type=float, default=10.0, help="with --stateful: how long to run")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        corpus = directory / "corpus.txt"
        corpus.write_text("\n".join(_tiny_corpus()) + "\n", encoding="utf-8")
        model_dir = save_tiny_model(directory / "model", train_tokenizer(corpus, vocab_size=400))
        settings = make_settings(directory, model_dir, max_steps=64, fill_timeout_s=30)
        model = load_model(model_dir, device="cpu")
        started = time.perf_counter()
        report: FuzzReport
        for base in serve_in_thread(settings, model):
            if args.stateful:
                report, _ = fuzz_stateful_for(base, minutes=args.minutes)
            else:
                report = fuzz(base, examples=args.examples, seed=args.seed)
        elapsed = time.perf_counter() - started
    lines = [
        f"- calls made: {report.calls} in {elapsed:.0f} s",
        f"- 5xx answers: {report.server_error_count}",
        f"- conformance failures: {len(report.failures)}",
        "- statuses: " + ", ".join(f"{status} x {count}" for status, count in sorted(report.statuses.items())),
    ]
    if isinstance(report, StatefulReport):
        lines += [f"- scenarios (sequences of up to 12 linked calls): {report.scenarios}"]
        lines += [f"- acknowledged but lost: {len(report.lost)}"]
        lines += [
            f"- batches of sequences hypothesis gave up replaying (flaky on a live server): {len(report.restarts)}"
        ]
        lines += [f"- calls to {operation}: {count}" for operation, count in report.operations.most_common()]
        lines += [f"- lost: {entry}" for entry in report.lost]
    lines += [f"- 5xx: {entry}" for entry in report.server_errors]
    lines += [f"- failure: {entry}" for entry in report.failures]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    if args.json_path is not None:
        figures: dict[str, Any] = {
            "mode": "stateful" if args.stateful else "single calls",
            "seconds": round(elapsed),
            "calls": report.calls,
            "server_errors": report.server_error_count,
            "conformance_failures": len(report.failures),
            "statuses": {str(status): count for status, count in sorted(report.statuses.items())},
        }
        if isinstance(report, StatefulReport):
            figures |= {
                "scenarios": report.scenarios,
                "lost": report.lost,
                "operations": dict(report.operations),
                "hypothesis_restarts": len(report.restarts),
            }
        args.json_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
