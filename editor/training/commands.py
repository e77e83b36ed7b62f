"""The training and evaluation commands of `editor` (registered by `editor.cli`). Heavy imports
happen inside each command, so that `editor --help` stays fast."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from editor.options import SamplerOptions


@click.command("train-tokenizer")
@click.option(
    "--corpus",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="one paragraph per line (.txt or .txt.xz)",
)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="directory for tokenizer.json and its config"
)
@click.option("--vocab-size", default=8192)
def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    """Train the cased byte-level BPE tokenizer of the bundled model."""
    from editor.training.tokenizer import train_tokenizer as train_bpe

    tokenizer = train_bpe(corpus, vocab_size)
    tokenizer.save_pretrained(str(out))
    click.echo(f"{len(tokenizer)} tokens -> {out}")


@click.command("prepare-data")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, path_type=Path), required=True)
@click.option(
    "--corpus",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="one paragraph per line (.txt or .txt.xz)",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output .npz of token ids")
def prepare_data(tokenizer_dir: Path, corpus: Path, out: Path) -> None:
    """Tokenize a corpus once into a token array for training and evaluation."""
    from transformers import AutoTokenizer

    from editor.training.data import tokenize_corpus

    tokenized = tokenize_corpus(corpus, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    tokenized.save(out)
    click.echo(f"{len(tokenized.tokens)} tokens in {len(tokenized.starts)} paragraphs -> {out}")


@click.command()
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, path_type=Path), required=True)
@click.option(
    "--data", "train_data", type=click.Path(exists=True, path_type=Path), required=True, help=".npz from prepare-data"
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="model directory to write")
@click.option("--time-budget", "time_budget_s", default=465.0, help="seconds of training (the schedule follows it)")
@click.option("--max-steps", default=None, type=int, help="stop after this many steps (repeat a run exactly)")
@click.option("--learning-rate", default=2e-3)
@click.option("--warmup-steps", default=300)
@click.option("--seed", default=1234)
@click.option(
    "--init-from", type=click.Path(exists=True, path_type=Path), default=None, help="continue from a model directory"
)
@click.option("--span-share", default=0.3, help="share of rows masked as contiguous spans instead of token by token")
def train(span_share: float, **values: Any) -> None:
    """Masked-diffusion training of the bundled model's architecture (run on a GPU)."""
    from editor.training.data import BatchSpec
    from editor.training.train import TrainConfig
    from editor.training.train import train as run_training

    summary = run_training(TrainConfig(**values, batch=BatchSpec(span_share=span_share)))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


@click.command()
@click.option("--model", "model_spec", default=None, help="[default: the bundled model]")
@click.option("--device", default=None, help="[default: EDITOR_DEVICE, else auto]")
@click.option(
    "--valid",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="held-out split (.txt, .txt.xz or .npz)",
)
@click.option(
    "--train",
    "train_split",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="training split for the unigram baseline [default: the held-out split itself]",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write the report here (Markdown)")
@click.option("--seed", default=0, help="seed of the example fills")
def evaluate(
    model_spec: str | None, device: str | None, valid: Path, train_split: Path | None, out: Path | None, seed: int
) -> None:
    """Masked-token accuracy and NLL at mask rates 0.15/0.5/0.9 against a unigram baseline, and example fills."""
    from editor.models.loading import load_configured
    from editor.settings import Settings
    from editor.training.evaluate import evaluate as run_evaluation

    model = load_configured(Settings(), model=model_spec, device=device)
    started = time.perf_counter()
    valid_tokens = _tokenized(valid, model)
    unigram_tokens = _tokenized(train_split, model).tokens if train_split else valid_tokens.tokens
    report = run_evaluation(
        model,
        valid_tokens,
        unigram_tokens,
        options=SamplerOptions(seed=seed),
        unigram_source="the training split" if train_split else "the held-out split (optimistic)",
    )
    click.echo(report)
    click.echo(f"(evaluated in {time.perf_counter() - started:.0f} s)", err=True)
    if out is not None:
        out.write_text(report + "\n", encoding="utf-8")


def _tokenized(path: Path, model: Any) -> Any:
    from editor.training.data import TokenizedCorpus, tokenize_corpus

    if path.suffix == ".npz":
        return TokenizedCorpus.load(path)
    return tokenize_corpus(path, model.tokenizer)


__all__ = ["evaluate", "prepare_data", "train", "train_tokenizer"]
