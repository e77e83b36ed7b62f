"""The `editor` command: fill, training, evaluation (and serve/db/batch from their own modules)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import click

from editor.document import DocumentError
from editor.sampler import SCHEDULES, SamplerOptions

Command = Callable[..., Any]


def sampler_options(command: Command) -> Command:
    """Add one flag per `SamplerOptions` field, with its description and default in --help."""
    for name, field in reversed(list(SamplerOptions.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        kind: Any = field.annotation
        if name == "schedule":
            kind = click.Choice(SCHEDULES)
        elif get_args(kind):  # Optional[int] -> int
            kind = next(a for a in get_args(kind) if a is not type(None))
        default = field.default
        help_text = field.description or ""
        if default is None:
            help_text += {"steps": " [default: one per masked token]", "seed": " [default: random, printed with --json]"}.get(name, "")
        command = click.option(flag, name, type=kind, default=default, show_default=default is not None, help=help_text)(command)
    return command


def options_from(values: dict[str, Any]) -> SamplerOptions:
    try:
        return SamplerOptions(**{name: values[name] for name in SamplerOptions.model_fields})
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="editor")
def main() -> None:
    """Constrained and infilling text editing on masked diffusion language models."""


@main.command()
@click.argument("document", type=click.File("r", encoding="utf-8"))
@click.option("--model", "model_spec", default=None,
              help="Hugging Face id or local directory [default: EDITOR_MODEL, else the bundled model]")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N [default: EDITOR_DEVICE, else auto]")
@click.option("--instruction", default=None, help="user turn for instruct models' chat template")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON with span offsets")
@sampler_options
def fill(document: Any, model_spec: str | None, device: str | None, instruction: str | None, as_json: bool,
         **sampler: Any) -> None:
    """Fill the masks of DOCUMENT (a file, or - for stdin) and print the text.

    Limits (document size, spans, canvas length) come from the same EDITOR_* settings as the server."""
    from editor.fill import fill_documents
    from editor.models import load_model
    from editor.parser import parse_document
    from editor.settings import Settings

    settings = Settings()
    options = options_from(sampler)
    try:
        parsed = parse_document(document.read(), settings.document_limits())
    except DocumentError as error:
        raise click.ClickException(f"{document.name}: {error}") from error
    model = load_model(model_spec or settings.model, device=device or settings.device)
    try:
        with StepProgress(enabled=sys.stderr.isatty() and not as_json) as progress:
            [result] = fill_documents(model, [parsed], options, instruction=instruction or settings.instruction,
                                      max_canvas_tokens=settings.max_canvas_tokens, on_step=progress.advance)
    except DocumentError as error:
        raise click.ClickException(f"{document.name}: {error}") from error
    if as_json:
        payload = result.to_dict()
        click.echo(json.dumps({k: payload[k] for k in ("text", "spans", "model", "seed", "steps", "elapsed_s", "options")},
                              ensure_ascii=False, indent=2))
    else:
        click.echo(result.text)


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


@main.command("train-tokenizer")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), required=True, help="one paragraph per line (.txt or .txt.xz)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="directory for tokenizer.json and its config")
@click.option("--vocab-size", default=8192)
def train_tokenizer_command(corpus: Path, out: Path, vocab_size: int) -> None:
    """Train the cased byte-level BPE tokenizer of the bundled model."""
    from editor.training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus, vocab_size)
    tokenizer.save_pretrained(str(out))
    click.echo(f"{len(tokenizer)} tokens -> {out}")


@main.command("prepare-data")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), required=True, help="one paragraph per line (.txt or .txt.xz)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="output .npz of token ids")
def prepare_data(tokenizer_dir: Path, corpus: Path, out: Path) -> None:
    """Tokenize a corpus once into a token array for training and evaluation."""
    from transformers import AutoTokenizer

    from editor.training.data import tokenize_corpus

    tokenized = tokenize_corpus(corpus, AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    tokenized.save(out)
    click.echo(f"{len(tokenized.tokens)} tokens in {len(tokenized.starts)} paragraphs -> {out}")


@main.command()
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--data", "train_data", type=click.Path(exists=True, path_type=Path), required=True, help=".npz from prepare-data")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="model directory to write")
@click.option("--time-budget", "time_budget_s", default=465.0, help="seconds of training (the schedule follows it)")
@click.option("--max-steps", default=None, type=int, help="stop after this many steps (repeat a run exactly)")
@click.option("--learning-rate", default=2e-3)
@click.option("--warmup-steps", default=300)
@click.option("--seed", default=1234)
@click.option("--init-from", type=click.Path(exists=True, path_type=Path), default=None, help="continue from a model directory")
@click.option("--span-share", default=0.3, help="share of rows masked as contiguous spans instead of token by token")
def train(span_share: float, **values: Any) -> None:
    """Masked-diffusion training of the bundled model's architecture (run on a GPU)."""
    from editor.training.data import BatchSpec
    from editor.training.train import TrainConfig
    from editor.training.train import train as run_training

    summary = run_training(TrainConfig(**values, batch=BatchSpec(span_share=span_share)))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


@main.command()
@click.option("--model", "model_spec", default=None, help="[default: the bundled model]")
@click.option("--device", default="cpu")
@click.option("--valid", type=click.Path(exists=True, path_type=Path), required=True, help="held-out split (.txt, .txt.xz or .npz)")
@click.option("--train", "train_split", type=click.Path(exists=True, path_type=Path), default=None,
              help="training split for the unigram baseline [default: the held-out split itself]")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write the report here (Markdown)")
@click.option("--seed", default=0, help="seed of the example fills")
def evaluate(model_spec: str | None, device: str, valid: Path, train_split: Path | None,
             out: Path | None, seed: int) -> None:
    """Masked-token accuracy and NLL at mask rates 0.15/0.5/0.9 against a unigram baseline, and example fills."""
    from editor.models import load_model
    from editor.training.evaluate import evaluate as run_evaluation

    model = load_model(model_spec, device=device)
    started = time.perf_counter()
    valid_tokens = _tokenized(valid, model)
    unigram_tokens = _tokenized(train_split, model).tokens if train_split else valid_tokens.tokens
    report = run_evaluation(model, valid_tokens, unigram_tokens, options=SamplerOptions(seed=seed),
                            unigram_source="the training split" if train_split else "the held-out split (optimistic)")
    click.echo(report)
    click.echo(f"(evaluated in {time.perf_counter() - started:.0f} s)", err=True)
    if out is not None:
        out.write_text(report + "\n", encoding="utf-8")


def _tokenized(path: Path, model: Any) -> Any:
    from editor.training.data import TokenizedCorpus, tokenize_corpus

    if path.suffix == ".npz":
        return TokenizedCorpus.load(path)
    return tokenize_corpus(path, model.tokenizer)


from editor.server.commands import db, serve  # noqa: E402 - registered after the group exists

main.add_command(serve)
main.add_command(db)


if __name__ == "__main__":
    main()
