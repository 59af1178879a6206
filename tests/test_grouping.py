"""Rows through the model in groups of similar length (``retrain.grouping``): the same
log-probabilities and gradients as one padded batch, in the rows' own order."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from retrain import modeling
from retrain.grouping import grouped_logps, length_groups
from retrain.losses import completion_token_counts, sequence_logps


def padded(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def test_groups_cover_every_row_once_in_runs_of_neighbouring_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(40)]
    groups = length_groups(lengths, cost=20, max_groups=4)
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert 1 < len(groups) <= 4
    # neighbouring: no row of a group is longer than a row of the next group
    for a, b in zip(groups, groups[1:], strict=False):
        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)
    assert padded(lengths, groups) < padded(lengths, [list(range(40))])


def test_the_split_pays_for_its_passes_only_when_it_saves_more() -> None:
    same = [30] * 16
    assert len(length_groups(same, cost=1)) == 1  # nothing to save
    two_kinds = [5] * 8 + [100] * 8
    assert len(length_groups(two_kinds, cost=10)) == 2  # saves 8 x 95 for one more pass
    assert len(length_groups(two_kinds, cost=10_000)) == 1  # a pass costs more than that
    assert length_groups([]) == []
    assert length_groups([7]) == [[0]]
    assert len(length_groups(list(range(1, 30)), cost=0, max_groups=3)) == 3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_model(tmp_path_factory.mktemp("grouping") / "m")
    base = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    peft = get_peft_model(base, modeling.fresh_lora_config(
        r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft


def test_grouped_logps_and_gradients_match_one_padded_batch(model) -> None:
    rng = random.Random(1)
    vocab = model.config.vocab_size
    turns = [(tuple(rng.randrange(4, vocab) for _ in range(rng.randint(3, 9))),
              tuple(rng.randrange(4, vocab) for _ in range(length)))
             for length in (2, 40, 3, 38, 5, 41, 1, 39)]
    collate = functools.partial(modeling.collate, pad_id=0, max_length=64,
                                device=torch.device("cpu"))
    lengths = [len(p) + len(c) for p, c in turns]
    assert len(length_groups(lengths)) > 1  # the case under test really splits

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, params)

    batch = collate(turns)
    whole = sequence_logps(modeling.forward_logits(model, batch), batch.labels)
    whole_counts = completion_token_counts(batch.labels)
    weights = torch.linspace(-1, 1, len(turns))  # a loss that depends on the row order
    whole_grads = grads((whole * weights).sum())

    logps, counts = grouped_logps(model, collate, turns, max_length=64)
    assert torch.equal(counts, whole_counts)
    assert torch.allclose(logps, whole, atol=1e-4, rtol=1e-5)
    for g, w in zip(grads((logps * weights).sum()), whole_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4)


def test_rows_cut_to_the_longest_allowed_are_scored_as_one_batch_scores_them(model) -> None:
    turns = [((5, 6, 7), tuple(range(4, 60))), ((8, 9), (10, 11))]
    collate = functools.partial(modeling.collate, pad_id=0, max_length=16,
                                device=torch.device("cpu"))
    batch = collate(turns)
    with torch.no_grad():
        whole = sequence_logps(modeling.forward_logits(model, batch), batch.labels)
        logps, counts = grouped_logps(model, collate, turns, max_length=16)
    assert torch.allclose(logps, whole, atol=1e-4)
    assert counts.tolist() == completion_token_counts(batch.labels).tolist()
