"""The sampler's options and its cancellation signal: plain pydantic, no torch, so that the CLI,
the API schema and `import editor` can use them without loading the model stack."""

from __future__ import annotations

from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

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


class SamplerOptions(BaseModel):
    """Every knob of a fill. Shared by the CLI, the API and the batch runner."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schedule: Schedule = Field("confidence", description="which masked positions to commit each step")
    steps: int | None = Field(None, ge=1, description="denoising steps")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 picks the most likely token")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    alg_temp: float = Field(0.0, ge=0.0, description="> 0 samples positions from softmax(confidence / alg_temp)")
    block_length: int = Field(32, ge=1, description="masked positions per block for the blocks schedule")
    threshold: float = Field(0.9, gt=0.0, le=1.0, description="confidence to commit at for the threshold schedule")
    repetition_penalty: float = Field(
        1.5,
        ge=1.0,
        le=10.0,
        description="the tokens right beside a blank are this much less likely there (no 'team team'); 1 = off",
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
    seed: int | None = Field(None, ge=0, lt=2**63, description="fixes the fill")


class FillCancelled(RuntimeError):
    """Raised when the cancel check says stop (a client went away)."""


__all__ = ["SCHEDULES", "FillCancelled", "SamplerOptions", "Schedule"]
