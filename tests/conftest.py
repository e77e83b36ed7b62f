"""Shared fixtures.

Sampler/canvas fixtures (prefix `tiny_`): a byte-level BPE tokenizer trained here on inline text
(the settings of `editor.training.tokenizer`, nothing read from `.carry`), and tiny random
`BidirectionalTransformer` checkpoints written with `save_native` and read back with
`load_native`, plain and shifted. Everything is session-scoped and built in about a second.

Models load in float32 on every CPU here: the suite checks the engine's exact properties (a row
fills the same alone or batched, a cache refreshed every step equals no cache), which bfloat16
(the default on CPUs with bfloat16 dot products) keeps only up to rounding. `test_models` checks
the default itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from editor.models import NativeDiffusionModel, SpecialIds, load_native, save_native
from editor.models.transformer import BidirectionalTransformer, TransformerConfig
from editor.training.tokenizer import BOS_TOKEN, MASK_TOKEN, PAD_TOKEN, train_tokenizer

os.environ["EDITOR_DTYPE"] = "float32"  # the CLI and servers the tests start, in this process or another


@pytest.fixture(autouse=True, scope="session")
def _float32_on_cpu() -> Iterator[None]:
    """Loads that name no dtype (load_model, load_native) take float32 on the CPU: torch's own
    probes say this CPU has no bfloat16 dot products."""
    with pytest.MonkeyPatch.context() as patch:
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            patch.setattr(torch.cpu, probe, lambda: False, raising=False)
        yield


TINY_BOS, TINY_PAD, TINY_MASK = BOS_TOKEN, PAD_TOKEN, MASK_TOKEN  # the bundled tokenizer's specials
TINY_VOCAB = 400

_TINY_SENTENCES = (
    "Dear customer, thank you for your order.",
    "Your refund will reach you on Monday.",
    "The cat sat on the mat and looked at the garden.",
    "We shipped the parcel to your home address yesterday.",
    "Kind regards, the support team.",
    "Please reply to this letter before the end of the week.",
    "The weather was cold, but the children played outside.",
    "She wrote a short story about a dog and a boat.",
    "Call us at any time if you have a question.",
    "The meeting starts at nine and ends at noon.",
    'He said "hello" and walked into the kitchen.',
    "Prices rose by 3.5 percent in the last quarter.",
    "Our office is closed on Sunday and on public holidays.",
    "The train to London leaves from platform two.",
    "I would like to thank everyone who helped with the project.",
    "A small bird sang in the tree near the window.",
    "The invoice lists every item you bought from the shop.",
    "Hello world! This is a test of the editor.",
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees.",
)


def _tiny_corpus() -> list[str]:
    """A few hundred lines of plain English with numbers, quotes and punctuation."""
    lines = []
    for number in range(300):
        first = _TINY_SENTENCES[number % len(_TINY_SENTENCES)]
        second = _TINY_SENTENCES[(number * 7 + 3) % len(_TINY_SENTENCES)]
        lines.append(f"{first} Order {number * 13 % 1000} costs ${number % 97}.{number % 10}0. {second}")
    return lines


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """Byte-level BPE with specials pad/eos, bos and mask, trained by the bundled model's own recipe."""
    corpus = tmp_path_factory.mktemp("tiny_corpus") / "corpus.txt"
    corpus.write_text("\n".join(_tiny_corpus()) + "\n", encoding="utf-8")
    return train_tokenizer(corpus, vocab_size=TINY_VOCAB)


def _tiny_checkpoint(directory: Path, tokenizer: PreTrainedTokenizerFast, *, shifted: bool, seed: int) -> Path:
    config = TransformerConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = BidirectionalTransformer(config).eval()
    special = SpecialIds(
        mask=int(tokenizer.convert_tokens_to_ids(TINY_MASK)),
        pad=int(tokenizer.convert_tokens_to_ids(TINY_PAD)),
        bos=int(tokenizer.convert_tokens_to_ids(TINY_BOS)),
        eos=int(tokenizer.convert_tokens_to_ids(TINY_PAD)),
    )
    return save_native(network, tokenizer, special, directory, dtype=torch.float32, logits_shifted=shifted)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """The checkpoint directory of `tiny_model` (for `--model` and `EDITOR_MODEL`)."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny_native"), tiny_tokenizer, shifted=False, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> NativeDiffusionModel:
    """A random 2-layer, hidden-32 native model (position i scored by output i)."""
    model = load_native(tiny_model_dir, name="tiny")
    assert not model.logits_shifted
    return model


@pytest.fixture(scope="session")
def tiny_shifted_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> NativeDiffusionModel:
    """The same architecture saved with `logits_shifted=True` (position i scored by output i-1)."""
    path = _tiny_checkpoint(tmp_path_factory.mktemp("tiny_shifted"), tiny_tokenizer, shifted=True, seed=1)
    model = load_native(path, name="tiny-shifted")
    assert model.logits_shifted
    return model


@pytest.fixture(scope="module")
def tiny_one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model fills (use with `pytest.mark.usefixtures`): a
    tiny model gains nothing from intra-op threads, and on a busy machine OpenMP's spinning makes
    each forward pass many times slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
