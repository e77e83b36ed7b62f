"""The long schemathesis run (not collected by pytest): every operation of the OpenAPI document,
positive and negative cases, against a live loopback server on a tiny random model; prints calls
made, the status counts, every 5xx and every conformance failure, and writes them as Markdown.

    .venv/bin/python -m tests.fuzz.run_schemathesis --examples 500 --out results/fuzz-run.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from editor.models.loading import load_model
from editor.training.tokenizer import train_tokenizer
from tests.api_fixtures import make_settings, save_tiny_model
from tests.conftest import _tiny_corpus
from tests.fuzz.harness import fuzz, serve_in_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per operation and generation mode")
    parser.add_argument("--seed", type=int, default=None, help="derandomize with this seed (default: random)")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (Markdown)")
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
        for base in serve_in_thread(settings, model):
            report = fuzz(base, examples=args.examples, seed=args.seed)
        elapsed = time.perf_counter() - started
    lines = [
        f"- calls made: {report.calls} in {elapsed:.0f} s",
        f"- 5xx answers: {report.server_error_count}",
        f"- conformance failures: {len(report.failures)}",
        "- statuses: " + ", ".join(f"{status} x {count}" for status, count in sorted(report.statuses.items())),
    ]
    lines += [f"- 5xx: {entry}" for entry in report.server_errors]
    lines += [f"- failure: {entry}" for entry in report.failures]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
