"""Train the bundled model's tokenizer: cased byte-level BPE, so any text encodes."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from editor.training.data import read_paragraphs

BOS_TOKEN = "<|beginoftext|>"
PAD_TOKEN = "<|endoftext|>"  # padding and end of text: fills the unused tail of `[MASK a-b]`
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, MASK_TOKEN)


def train_tokenizer(corpus: Path, vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/Qwen style): every byte is in the base alphabet, so nothing is ever
    unknown, and a span decodes on its own with its leading space intact."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: literal segments are tokenized on their own and must not gain a space.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator((line + "\n" for line in read_paragraphs(corpus)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=PAD_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,
    )
