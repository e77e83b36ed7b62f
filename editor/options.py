"""The sampler's options and its cancellation signal: plain pydantic, no torch, so that the CLI,
the API schema and `import editor` can use them without loading the model stack."""

from __future__ import annotations

from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Floors that keep every division and comparison in float32 finite: a temperature of 1e-300 turns
# logits into inf - inf = NaN, and a top_p below float32's resolution drops every token.
MIN_TEMPERATURE = 0.01  # temperature and alg_temp: 0 (off) or at least this
MIN_PROBABILITY = 0.001  # top_p and threshold: at least this
MAX_BLOCK_LENGTH = 65536
MAX_CANDIDATES = 16

Schedule: TypeAlias = Literal[
    "random", "left-to-right", "confidence", "margin", "entropy", "blocks", "threshold", "factor"
]
SCHEDULES: tuple[Schedule, ...] = (
    "random",
    "left-to-right",
    "confidence",
    "margin",
    "entropy",
    "blocks",
    "threshold",
    "factor",
)

Reference: TypeAlias = Literal["dream", "llada"]
# The schedules each reference sampler has (editor/reference_schedules.py): Dream's alg origin,
# maskgit_plus, topk_margin, entropy; LLaDA's low-confidence remasking in one block or in blocks.
REFERENCE_SCHEDULES: dict[str, tuple[Schedule, ...]] = {
    "dream": ("random", "confidence", "margin", "entropy"),
    "llada": ("confidence", "blocks"),
}
MAX_CFG_SCALE = 100.0


class SamplerOptions(BaseModel):
    """Every knob of a fill. Shared by the CLI, the API and the batch runner."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    schedule: Schedule = Field("confidence", description="which masked positions to commit each step")
    steps: int | None = Field(None, ge=1, description="denoising steps; default: one per masked token")
    temperature: float = Field(
        0.0, ge=0.0, le=10.0, description=f"0 picks the most likely token; otherwise at least {MIN_TEMPERATURE}"
    )
    top_p: float = Field(1.0, ge=MIN_PROBABILITY, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="keep the k most likely tokens; 0 keeps all")
    alg_temp: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description=f"> 0 samples positions from softmax(confidence / alg_temp); 0 or at least {MIN_TEMPERATURE}",
    )
    block_length: int = Field(
        32, ge=1, le=MAX_BLOCK_LENGTH, description="masked positions per block for the blocks schedule"
    )
    threshold: float = Field(
        0.9, ge=MIN_PROBABILITY, le=1.0, description="confidence to commit at for the threshold schedule"
    )
    single_spaces: bool = Field(
        True,
        description="a fill never puts a space token beside another space (no 'last  week'); "
        "turn off for code, where runs of spaces indent",
    )
    repetition_penalty: float = Field(
        1.5,
        ge=1.0,
        le=10.0,
        description="the word right beside a blank (any spelling, past one punctuation token) is this much less "
        "likely there (no 'team team'); 1 = off",
    )
    no_repeat_ngram: int = Field(
        3,
        ge=0,
        le=8,
        description="a fill never repeats an n-gram with a letter in it, or a 2n-gram of anything, that a fill "
        "wrote within 64 tokens (no loops; copying the literal text is allowed); 0 = off",
    )
    factor: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="factor schedule: commit the top n while (n + 1) * (1 - nth confidence) < factor",
    )
    cache: bool = Field(True, description="reuse keys/values of positions whose input did not change (docs/engine.md)")
    cache_refresh_every: int | None = Field(
        4, ge=1, description="with cache: a full pass every k steps (and at block starts); none: block starts only"
    )
    candidates: int | None = Field(
        None,
        ge=1,
        le=MAX_CANDIDATES,
        description="fills run side by side (the first at this temperature, the others sampled at 0.7) of which "
        "the model's judge keeps the best; the others are offered as each span's alternatives. Default: the "
        "model's own (4 for the default model, 1 otherwise)",
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="fixes the fill")
    reference: Reference | None = Field(
        None,
        description="follow a published sampler's step counts (docs/models.md): 'dream' (its int(n(1 - s/t)) per "
        "step; schedule random/confidence/margin/entropy = its alg origin/maskgit_plus/topk_margin/entropy) or "
        "'llada' (low-confidence remasking, schedule confidence: one block, blocks: block_length each); full "
        "passes every step, as the references run",
    )
    cfg_scale: float = Field(
        0.0,
        ge=0.0,
        le=MAX_CFG_SCALE,
        description="classifier-free guidance as LLaDA's: logits un + (cfg_scale + 1)(cond - un), un from the "
        "canvas with its text masked; two full passes a step; 0 = off",
    )

    @field_validator(
        "steps",
        "temperature",
        "top_p",
        "top_k",
        "alg_temp",
        "block_length",
        "threshold",
        "factor",
        "no_repeat_ngram",
        "candidates",
        "seed",
        "cfg_scale",
        mode="before",
    )
    @classmethod
    def _no_booleans(cls, value: object) -> object:
        # pydantic would read true/false as 1/0; the schema says number, so refuse them.
        if isinstance(value, bool):
            raise ValueError("a number is expected, not true or false")
        return value

    @field_validator("temperature", "alg_temp")
    @classmethod
    def _off_or_above_the_floor(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (off) or at least {MIN_TEMPERATURE}")
        return value

    @model_validator(mode="after")
    def _reference_has_the_schedule(self) -> SamplerOptions:
        if self.reference is not None and self.schedule not in REFERENCE_SCHEDULES[self.reference]:
            wanted = ", ".join(REFERENCE_SCHEDULES[self.reference])
            raise ValueError(f"reference {self.reference!r} has no {self.schedule!r} schedule; it has {wanted}")
        return self


class FillCancelled(RuntimeError):
    """Raised when the cancel check says stop (a client went away)."""


__all__ = [
    "MAX_BLOCK_LENGTH",
    "MAX_CANDIDATES",
    "MAX_CFG_SCALE",
    "MIN_PROBABILITY",
    "MIN_TEMPERATURE",
    "REFERENCE_SCHEDULES",
    "SCHEDULES",
    "FillCancelled",
    "Reference",
    "SamplerOptions",
    "Schedule",
]
