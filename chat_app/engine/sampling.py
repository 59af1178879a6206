"""Choose each row's next token from its logits, with that row's own settings and RNG.

Greedy rows (``temperature == 0``) take ``argmax(logits)``. Sampled rows draw from
``softmax(logits / temperature)`` after nucleus filtering: tokens are sorted by probability
and the least likely ones are removed while the probability mass removed stays at most
``1 - top_p`` (the most likely token always stays), as ``transformers``' top-p warper does.
"""

from __future__ import annotations

import secrets

import torch

from .params import SamplingParams


def make_generator(params: SamplingParams, device: str) -> torch.Generator | None:
    """A seeded RNG for a sampled request (random seed when none is given); None if greedy."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Next token id for each row of ``logits`` (shape ``[rows, vocab]``)."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.temperature == 0:
            continue
        scores = logits[row] / p.temperature
        if p.top_p < 1.0:
            scores = top_p_filter(scores, p.top_p)
        probs = torch.softmax(scores, dim=-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` with tokens outside the top-``top_p`` nucleus set to ``-inf``."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-1] = False
    return scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
