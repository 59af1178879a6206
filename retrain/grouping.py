"""Forward passes over rows of mixed lengths, in groups of similar length.

A batch padded to its longest row spends work on padding. Sampled replies vary a lot in
length (64 replies of the demo model to 16 probe questions ran from 4 to 67 tokens),
so a batch of 16 rows can be half padding. The log-probability of a row does not depend on the other rows of
its batch (right padding, attention masked per row), so the rows can go through the
model in groups of similar length and be put back in their order: the same values and
gradients (up to float rounding), for fewer padded tokens.

The grouping minimises ``sum over groups (rows x longest row) + groups x cost``, where
``cost`` is a forward pass's fixed cost counted in tokens of work. On CUDA each batch
stays one pass: the split was measured on CPUs only, and a GPU pass's fixed cost (kernel
launches) is a larger share of its time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from retrain import modeling
from retrain.losses import completion_token_counts, sequence_logps

# the fixed cost of one more forward pass on a CPU, in tokens of work: on the demo model
# (4 layers, LoRA on every linear layer, one thread), a line fitted to passes of 1-16
# rows of 16-70 tokens gave 11.5 ms + 0.27 ms a token with gradients and 5.3 ms + 0.12 ms
# a token without: 43-44 tokens either way
CPU_GROUP_COST_TOKENS = 44
MAX_GROUPS = 4


def length_groups(lengths: Sequence[int], *, cost: int = CPU_GROUP_COST_TOKENS,
                  max_groups: int = MAX_GROUPS) -> list[list[int]]:
    """Indices of ``lengths`` in at most ``max_groups`` groups of neighbouring lengths
    that minimise the padded tokens plus ``cost`` per group; every index exactly once."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    size = [lengths[i] for i in order]
    inf = float("inf")
    # best[k][j]: least cost of the j shortest rows in k groups; cut[k][j]: where the
    # last of those groups starts
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                value = best[k - 1][i] + (j - i) * size[j - 1] + cost
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    k = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    groups: list[list[int]] = []
    j = n
    while k:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def grouped_logps(model: torch.nn.Module,
                  collate: Callable[[list[tuple[Sequence[int], Sequence[int]]]], Any],
                  turns: Sequence[tuple[Sequence[int], Sequence[int]]],
                  *, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, counts)`` of ``turns`` (``(prompt_ids, completion_ids)``) under
    ``model``, in their order: each completion's summed log-probability
    (:func:`retrain.losses.sequence_logps`) and its number of scored tokens. The rows
    go through the model in :func:`length_groups` (one group on CUDA); differentiable
    when gradients are on."""
    device = next(model.parameters()).device
    if not turns:
        empty = torch.zeros(0, device=device)
        return empty, empty.long()
    lengths = [min(max_length, len(p) + len(c)) for p, c in turns]
    groups = length_groups(lengths, max_groups=1 if device.type == "cuda" else MAX_GROUPS)
    if len(groups) <= 1:  # one pass, in the given order
        groups = [list(range(len(turns)))]
    logps, counts = [], []
    for group in groups:
        batch = collate([turns[i] for i in group])
        logps.append(sequence_logps(modeling.forward_logits(model, batch), batch.labels))
        counts.append(completion_token_counts(batch.labels))
    if len(groups) == 1:
        return logps[0], counts[0]
    order = torch.tensor([i for group in groups for i in group], device=device)
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=device)
    return torch.cat(logps)[back], torch.cat(counts)[back]
