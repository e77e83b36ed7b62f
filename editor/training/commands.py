"""The training and evaluation commands of `editor` (registered by `editor.cli`). Heavy imports
happen inside each command, so that `editor --help` stays fast."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from editor.options import SamplerOptions

# The training rows' mix (docs/models.md): each share is a fraction of the rows of a batch.
ROW_SHARE: dict[str, Any] = {"type": click.FloatRange(0.0, 1.0), "show_default": True}


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
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="tokenizer directory (from scratch only; a GGUF brings its own)",
)
@click.option(
    "--data",
    "train_data",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help=".npz from prepare-data; with --init-from-gguf also a corpus .txt/.txt.xz",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="model directory to write")
@click.option("--time-budget", "time_budget_s", default=465.0, help="seconds of training (the schedule follows it)")
@click.option("--max-steps", default=None, type=int, help="stop after this many steps (repeat a run exactly)")
@click.option("--learning-rate", default=None, type=float, help="[default: 2e-3 from scratch, 1e-3 for LoRA]")
@click.option("--warmup-steps", default=None, type=int, help="[default: 300 from scratch, 100 for LoRA]")
@click.option("--seed", default=1234)
@click.option(
    "--init-from", type=click.Path(exists=True, path_type=Path), default=None, help="continue from a model directory"
)
@click.option("--span-share", **ROW_SHARE, default=0.3, help="rows masked as contiguous spans, not token by token")
@click.option("--whole-paragraph-share", **ROW_SHARE, default=0.5, help="rows cut at a paragraph end, the rest padded")
@click.option("--padded-span-share", **ROW_SHARE, default=0.2, help="rows whose masked span is followed by end tokens")
@click.option(
    "--infill-share",
    **ROW_SHARE,
    default=0.0,
    help="rows shaped like a document being filled: clean text around 1-3 masked spans, half ending in end tokens",
)
@click.option(
    "--init-from-gguf",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="adapt this autoregressive GGUF (Llama layout) with a LoRA adapter instead of training from scratch",
)
@click.option("--lora-rank", default=64, help="LoRA rank (with --init-from-gguf)")
@click.option("--lora-alpha", default=None, type=float, help="LoRA alpha; scale = alpha / rank [default: the rank]")
@click.option("--batch-size", default=None, type=int, help="rows of 256 tokens per step [default: 256, LoRA 128]")
@click.option("--storage", type=click.Choice(["int8", "float16"]), default="int8", help="how the adapter is stored")
@click.option("--save-rank", default=None, type=int, help="lower the adapter to this rank (SVD) when saving")
@click.option(
    "--init-adapter",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="continue from this adapter directory (with --init-from-gguf; its rank and alpha are kept)",
)
@click.option(
    "--measure-on",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    help="held-out split(s): after LoRA training, bits/char at rate 0.15 for each storage choice",
)
@click.option("--no-compile", is_flag=True, help="run eagerly (torch.compile is used on CUDA by default)")
def train(
    span_share: float,
    whole_paragraph_share: float,
    padded_span_share: float,
    infill_share: float,
    init_from_gguf: Path | None,
    lora_rank: int,
    lora_alpha: float | None,
    batch_size: int | None,
    storage: str,
    save_rank: int | None,
    init_adapter: Path | None,
    measure_on: tuple[Path, ...],
    no_compile: bool,
    **values: Any,
) -> None:
    """Masked-diffusion training: from scratch (the tiny model), or a LoRA adaptation of a GGUF
    model (the default model). Run on a GPU."""
    from editor.training.data import BatchSpec

    def batch_spec(size: int) -> BatchSpec:
        return BatchSpec(
            batch_size=size,
            span_share=span_share,
            whole_paragraph_share=whole_paragraph_share,
            padded_span_share=padded_span_share,
            infill_share=infill_share,
        )

    given = {k: v for k, v in values.items() if v is not None}
    if init_from_gguf is not None:
        from editor.training.lora import LoRAConfig, measure_storage, train_lora

        config = LoRAConfig(
            gguf=init_from_gguf,
            corpus=given.pop("train_data"),
            out_dir=given.pop("out_dir"),
            rank=lora_rank,
            alpha=float(lora_alpha or lora_rank),
            batch=batch_spec(batch_size or 128),
            compile=not no_compile,
            storage=storage,
            save_rank=save_rank,
            init_adapter=init_adapter,
            **{k: v for k, v in given.items() if k not in ("tokenizer_dir", "init_from")},
        )
        summary = train_lora(config)
        if measure_on:
            summary["storage_bits_per_char"] = measure_storage(config.out_dir, init_from_gguf, list(measure_on))
            (config.out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
        return
    if "tokenizer_dir" not in given:
        raise click.UsageError("--tokenizer is required unless --init-from-gguf is given")
    from editor.training.train import TrainConfig
    from editor.training.train import train as run_training

    summary = run_training(TrainConfig(**given, batch=batch_spec(batch_size or 256)))
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


@click.command()
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    help="model to evaluate; repeat for a side-by-side table (e.g. --model default --model tiny) [default: default]",
)
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
@click.option("--limit", default=None, type=int, help="evaluate the first N paragraphs only [default: all]")
@click.option(
    "--rows",
    "rows_kind",
    type=click.Choice(["window", "paragraph"]),
    default="window",
    show_default=True,
    help="window: the split cut into consecutive 256-token rows; paragraph: one row per paragraph (less context)",
)
def evaluate(
    model_specs: tuple[str, ...],
    device: str | None,
    valid: Path,
    train_split: Path | None,
    out: Path | None,
    seed: int,
    limit: int | None,
    rows_kind: str,
) -> None:
    """Masked-token accuracy, NLL and bits/char at mask rates 0.15/0.5/0.9, load time, forward time and
    example fills; one model gives the detailed report, several a side-by-side table."""
    import torch

    from editor.models.loading import load_configured, resolve_device
    from editor.settings import Settings
    from editor.training.evaluate import (
        MASK_RATES,
        ModelReport,
        evaluate_rate,
        example_fills,
        format_comparison,
        forward_ms,
        held_out_rows,
        unigram_log_probs,
    )
    from editor.training.evaluate import evaluate as run_evaluation

    settings = Settings()
    options = SamplerOptions(seed=seed)
    if len(model_specs) <= 1:
        model = load_configured(settings, model=model_specs[0] if model_specs else None, device=device)
        started = time.perf_counter()
        valid_tokens = _limited(_tokenized(valid, model), limit)
        unigram_tokens = _tokenized(train_split, model).tokens if train_split else valid_tokens.tokens
        report = run_evaluation(
            model,
            valid_tokens,
            unigram_tokens,
            options=options,
            rows_kind=rows_kind,
            unigram_source="the training split" if train_split else "the held-out split (optimistic)",
        )
        click.echo(report)
        click.echo(f"(evaluated in {time.perf_counter() - started:.0f} s)", err=True)
    else:
        reports = []
        for spec in model_specs:
            started = time.perf_counter()
            model = load_configured(settings, model=spec, device=device)
            load_s = time.perf_counter() - started
            corpus = _limited(_tokenized(valid, model), limit)
            rows = held_out_rows(corpus, model, rows_kind)
            unigram = unigram_log_probs(corpus.tokens, model.vocab_size)
            network = getattr(model, "network", None)
            reports.append(
                ModelReport(
                    spec=spec,
                    name=model.name,
                    parameters=sum(p.numel() for p in network.parameters()) if network is not None else 0,
                    load_s=load_s,
                    forward_ms=forward_ms(model),
                    results=[evaluate_rate(model, rows, rate, unigram) for rate in MASK_RATES],
                    examples=example_fills(model, options),
                )
            )
            del model
        where = str(resolve_device(device or settings.device))
        if where.startswith("cuda"):
            where = torch.cuda.get_device_name()
        report = format_comparison(
            reports, options, valid.name + (f" (first {limit} paragraphs)" if limit else ""), where, rows_kind
        )
        click.echo(report)
    if out is not None:
        out.write_text(report + "\n", encoding="utf-8")


def _limited(corpus: Any, limit: int | None) -> Any:
    """The first `limit` paragraphs of a tokenized corpus."""
    from editor.training.data import TokenizedCorpus

    if limit is None or limit >= len(corpus.starts):
        return corpus
    end = int(corpus.starts[limit])
    return TokenizedCorpus(tokens=corpus.tokens[:end], starts=corpus.starts[:limit])


def _tokenized(path: Path, model: Any) -> Any:
    from editor.training.data import TokenizedCorpus, tokenize_corpus

    if path.suffix == ".npz":
        return TokenizedCorpus.load(path)
    return tokenize_corpus(path, model.tokenizer)


__all__ = ["evaluate", "prepare_data", "train", "train_tokenizer"]
