"""Quantized weights (`EDITOR_QUANTIZE`, editor/models/quantize.py) on the CPU: int8 loads for the
bundled model and for Dream- and LLaDA-layout checkpoints, scores close to the unquantized model,
fills documents within their constraints, and reports the bytes it holds; fp8 is refused with the
hardware it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from editor.cli import main
from editor.filling import fill_documents
from editor.models import NativeDiffusionModel, load_model
from editor.models.loading import model_weights_text
from editor.models.quantize import QuantizeError, check_quantize
from editor.options import SamplerOptions
from editor.parser import parse_document
from tests.published import write_dream_published, write_llada_published

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

# Measured (2026-12-07, torch 2.13 CPU, torchao 0.18, float32, 2 x 48 random tokens): the largest
# total-variation distance between a position's int8 and float32 distributions was 0.048 (bundled
# model), 0.042 (Dream layout), 0.030 (LLaDA layout); the top token agreed at 96-98% of positions.
MAX_TOTAL_VARIATION = 0.1
MIN_TOP_AGREEMENT = 0.9
DOCUMENT = 'the cat [MASK 6] on [MASK choice="a mat|the document"] in [MASK 4]'  # words LLaDA's test vocabulary has


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("quantize")
    write_dream_published(root / "Dream-v0-Base-7B")
    write_llada_published(root / "LLaDA-8B-Base")
    return {"tiny": "tiny", "dream": str(root / "Dream-v0-Base-7B"), "llada": str(root / "LLaDA-8B-Base")}


def linear_weights(model: NativeDiffusionModel) -> list[torch.Tensor]:
    return [m.weight for m in model.network.layers.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name", ["tiny", "dream", "llada"])
def test_int8_weights_score_close_to_the_full_precision_ones(checkpoints: dict[str, str], name: str) -> None:
    full = load_model(checkpoints[name], dtype=torch.float32)
    int8 = load_model(checkpoints[name], dtype=torch.float32, quantize="int8")
    assert isinstance(full, NativeDiffusionModel) and isinstance(int8, NativeDiffusionModel)
    assert int8.quantize == "int8"
    assert all(type(w).__name__ == "Int8Tensor" for w in linear_weights(int8))
    assert type(int8.network.lm_head.weight) is nn.Parameter  # the head keeps its precision
    ids = torch.randint(3, min(full.vocab_size, 250), (2, 48), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids, dtype=torch.bool)
    expected, got = full.forward_logits(ids, attention), int8.forward_logits(ids, attention)
    assert not torch.equal(expected, got)  # the int8 weights are the ones computing
    distance = 0.5 * (expected.softmax(-1) - got.softmax(-1)).abs().sum(-1)  # [B, L]
    assert distance.max().item() <= MAX_TOTAL_VARIATION
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement >= MIN_TOP_AGREEMENT


@pytest.mark.parametrize("name", ["tiny", "dream", "llada"])
def test_int8_weights_count_one_byte_a_weight_plus_a_scale_per_row(checkpoints: dict[str, str], name: str) -> None:
    full = load_model(checkpoints[name], dtype=torch.float32)
    int8 = load_model(checkpoints[name], dtype=torch.float32, quantize="int8")
    assert isinstance(full, NativeDiffusionModel) and isinstance(int8, NativeDiffusionModel)
    stored = {t.data_ptr(): t.numel() * t.element_size() for t in full.network.state_dict().values()}
    assert full.weight_bytes == sum(stored.values())
    # Each block matrix [out, in]: 4 bytes a weight -> 1, plus a float32 scale and an int8 zero point a row.
    saved = sum(w.numel() * 3 - w.shape[0] * 5 for w in linear_weights(full))
    assert int8.weight_bytes == full.weight_bytes - saved
    assert model_weights_text(int8) == f"int8 weights {int8.weight_bytes / 1e6:,.1f} MB"
    assert model_weights_text(full) == f"weights {full.weight_bytes / 1e6:,.1f} MB"


@pytest.mark.parametrize("name", ["tiny", "dream", "llada"])
def test_an_int8_model_fills_a_document_within_its_constraints(checkpoints: dict[str, str], name: str) -> None:
    model = load_model(checkpoints[name], quantize="int8")
    document = parse_document(DOCUMENT)
    [result] = fill_documents(model, [document], SamplerOptions(seed=3, steps=6))
    first, choice, last = result.spans
    assert choice.text.strip() in ("a mat", "the document")
    literal = result.text[: first.start] + result.text[first.end : choice.start]
    literal += result.text[choice.end : last.start] + result.text[last.end :]
    assert literal.replace(" ", "") == "thecatonin"  # a span may take the space next to it
    assert model.special.mask not in [*first.token_ids, *last.token_ids]
    assert len(first.token_ids) <= 6 and len(last.token_ids) <= 4


def test_fp8_off_a_hopper_gpu_is_refused_with_what_it_needs() -> None:
    with pytest.raises(QuantizeError, match=r"compute capability 8\.9 or newer.*on cpu"):
        load_model("tiny", quantize="fp8")
    with pytest.raises(QuantizeError, match="one of none, int8, fp8"):
        check_quantize("int4", "cpu", torch.float32)


def test_the_fill_command_reports_an_fp8_request_on_the_cpu_as_an_error(tmp_path: Path) -> None:
    document = tmp_path / "letter.txt"
    document.write_text(DOCUMENT, encoding="utf-8")
    result = CliRunner().invoke(
        main, ["fill", str(document), "--model", "tiny", "--device", "cpu", "--quantize", "fp8"]
    )
    assert result.exit_code == 1
    assert "Error: quantize=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer" in result.output
    assert "Traceback" not in result.output


def test_the_engine_bench_runs_each_model_once_per_weight_setting(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    arguments = ["bench", "engine", "--model", "tiny", "--batch", "1", "--tokens", "8", "--context", "24"]
    arguments += ["--tokens-per-step", "4", "--repeats", "0", "--threads", "1", "--naive-batches", "none"]
    result = CliRunner().invoke(main, [*arguments, "--quantize", "none,int8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["figures"]
    assert [(f["quantize"], f["mode"]) for f in figures] == [("none", "fast"), ("int8", "fast")]
    full, int8 = figures
    assert int8["weight_mb"] < 0.5 * full["weight_mb"]  # the blocks' float32 weights are most of the bundled model
    assert int8["bytes"] < full["bytes"] and int8["flops"] == full["flops"]  # fewer bytes read, the same arithmetic
    refused = CliRunner().invoke(main, [*arguments, "--quantize", "fp8"])
    assert refused.exit_code == 1 and "compute capability 8.9 or newer" in refused.output
