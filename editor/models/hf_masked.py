"""Any `transformers` masked language model (BERT, RoBERTa, ModernBERT...) as a one-step
"diffusion" model: it scores every position at once and its logits are not shifted."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from editor.chat import Conversation, Instruction, plain_framing
from editor.models.base import SpecialIds
from editor.models.native import ModelLoadError, default_dtype
from editor.models.quantize import quantize_linears, weight_bytes


def special_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer itself wraps a single sequence in: ([CLS], [SEP]) for BERT,
    (<s>, </s>) for RoBERTa. Read from the tokenizer rather than assumed."""
    build = getattr(tokenizer, "build_inputs_with_special_tokens", None)
    if callable(build):  # slow (Python) tokenizers
        probe = -1  # never a real id, so it marks where the body goes
        ids = list(build([probe]))
        at = ids.index(probe)
        return ids[:at], ids[at + 1 :]
    # Fast tokenizers add specials in their post-processor; the special-tokens mask shows where.
    encoded = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
    ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    body = [i for i, flag in enumerate(special) if not flag]
    if not body:
        return [], []
    return ids[: body[0]], ids[body[-1] + 1 :]


class MaskedLMAdapter:
    """`DiffusionModel` over an `AutoModelForMaskedLM`."""

    logits_shifted = False

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str) -> None:
        if tokenizer.mask_token_id is None:
            raise ModelLoadError(f"{name}: the tokenizer has no mask token")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.sep_token_id
        if pad is None:
            raise ModelLoadError(f"{name}: the tokenizer has neither a pad nor a sep token")
        self._prefix, self._suffix = special_frame(tokenizer)
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.special = SpecialIds(mask=tokenizer.mask_token_id, pad=pad, bos=bos, eos=tokenizer.eos_token_id)
        output = model.get_output_embeddings()
        self.vocab_size = int(output.weight.shape[0]) if output is not None else int(model.config.vocab_size)
        self.quantize = "none"  # how the linear weights are stored (`quantize_weights`)

    def quantize_weights(self, mode: str) -> None:
        """Store the encoder's linear layers as `mode` ('none', 'int8', 'fp8'; editor.models.quantize);
        the output head keeps its precision."""
        quantize_linears(self.model, mode, keep=(self.model.get_output_embeddings(),))
        self.quantize = mode

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights in memory (quantized weights counted as stored)."""
        return weight_bytes(self.model)

    @classmethod
    def load(
        cls,
        spec: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> MaskedLMAdapter:
        """From a hub id or a local directory (then nothing is fetched)."""
        from transformers import AutoModelForMaskedLM  # imported here: it pulls in all of transformers' modelling

        local = Path(spec).expanduser().is_dir()
        source = str(Path(spec).expanduser()) if local else str(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=False)
            model = AutoModelForMaskedLM.from_pretrained(
                source, local_files_only=local, trust_remote_code=False, dtype=default_dtype(device, dtype)
            )
        except Exception as error:
            raise ModelLoadError(f"{source}: cannot load as a masked language model ({error})") from error
        return cls(model.to(device), tokenizer, name=name or str(spec))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] bool -> float32 logits [B, L, V]."""
        with torch.inference_mode():
            ids = input_ids.to(self.device)
            mask = attention_mask.to(self.device).long()
            return self.model(input_ids=ids, attention_mask=mask).logits.float()

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        # Masked LMs have no instruction format: an instruction is ignored, a conversation (the
        # chat API) is written out in the plain framing after [CLS].
        if isinstance(instruction, Conversation):
            text = plain_framing(instruction.messages)
            return list(self._prefix) + list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), list(
                self._suffix
            )
        return list(self._prefix), list(self._suffix)

    def __repr__(self) -> str:
        return f"MaskedLMAdapter(name={self.name!r}, device={self.device})"


def load_masked_lm(
    spec: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> MaskedLMAdapter:
    return MaskedLMAdapter.load(spec, device=device, dtype=dtype)
