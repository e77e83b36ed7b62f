"""The no-repeat rule's gathered form (`forbid_repeated_ngrams_`, ~40 operations a call) bans
exactly what its loop over slots and shifts did (~1,000 operations a call at n = 3): the loop is
kept here as the reference and both run on random canvases, for n from 1 to 6."""

from __future__ import annotations

import pytest
import torch

from editor.sampler import forbid_repeated_ngrams_


def looped_forbid(
    logits: torch.Tensor,
    ids: torch.Tensor,
    candidates: torch.Tensor,
    known: torch.Tensor,
    free: torch.Tensor,
    lettered: torch.Tensor,
    n: int,
    window: int,
) -> torch.Tensor:
    """The rule as written before issue 24: one set of gathers per slot and shift."""
    width = ids.shape[1]
    band = torch.arange(-window, window + 1)
    at = candidates[..., None] + band

    def look(values: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = at + offset
        inside = (where >= 0) & (where < width)
        return values.gather(1, where.clamp(0, width - 1).flatten(1)).view(at.shape), inside

    def beside(offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        places = candidates + offset
        inside = (places >= 0) & (places < width)
        return ids.gather(1, places.clamp(0, width - 1)), inside

    own, on_canvas = look(ids, 0)
    own_known, _ = look(known, 0)
    base = on_canvas & own_known & (band != 0)
    found = torch.zeros_like(base)
    for slot in range(n):
        match, has_letter = base, lettered[own]
        written, _ = look(free, 0)
        holds_candidate = torch.zeros_like(base)
        for offset in [k - slot for k in range(n) if k != slot]:
            mine, inside = beside(offset)
            mine_known = inside & known.gather(1, (candidates + offset).clamp(0, width - 1))
            theirs, theirs_inside = look(ids, offset)
            theirs_known, _ = look(known, offset)
            theirs_free, _ = look(free, offset)
            match = match & mine_known[..., None] & (theirs == mine[..., None]) & theirs_known & theirs_inside
            has_letter = has_letter | lettered[mine][..., None]
            written = written | (theirs_free & theirs_inside)
            holds_candidate |= (band + offset) == 0
        found |= match & has_letter & written & ~holds_candidate
    block = torch.where(found, float("-inf"), float("inf")).to(logits.dtype)
    return logits.scatter_reduce_(2, own, block, reduce="amin")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_the_gathered_rule_bans_what_the_looped_one_did(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    vocab, length, window = 12, 40, 9
    lettered = torch.rand(vocab, generator=generator) > 0.3
    bans = 0
    for attempt in range(25):
        # Few tokens, and on every other canvas a period of 5, so that long n-grams repeat too.
        ids = torch.randint(vocab, (3, length), generator=generator)
        if attempt % 2:
            ids = ids[:, :5].repeat(1, length // 5)
        known = torch.rand(3, length, generator=generator) > 0.25
        free = torch.rand(3, length, generator=generator) > 0.5
        # Candidates anywhere, edges included, some repeated (a padded row) and some already holding
        # a known token (a step's own commits checked again).
        candidates = torch.randint(length, (3, 7), generator=generator)
        candidates[:, 0], candidates[:, 1], candidates[0, 2] = 0, length - 1, candidates[0, 3]
        logits = torch.randn(3, 7, vocab, generator=generator)
        expected = looped_forbid(logits.clone(), ids, candidates, known, free, lettered, n, window)
        got = forbid_repeated_ngrams_(logits.clone(), ids, candidates, known, free, lettered, n, window)
        assert torch.equal(got, expected)
        bans += int(torch.isneginf(expected).sum())
    assert bans > 0  # the comparisons saw bans, not only untouched logits
