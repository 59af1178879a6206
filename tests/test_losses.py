"""The preference losses by hand: formulas checked against hand computation, typed errors
for bad input, finite losses and gradients on tiny, one-sided and extreme batches, and the
balanced KTO class weights.

Parity with TRL 1.16 (real DPOTrainer/KTOTrainer) is proven in ``test_losses_trl.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from retrain.losses import (
    balanced_kto_weights,
    completion_token_counts,
    dpo_loss,
    kto_loss,
    mismatched_indices,
    sequence_logps,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- sequence_logps


def test_sequence_logps_sums_log_softmax_of_next_token_over_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 6, 1], [-100, 2, -100, 0, -100]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(1, 5):
            if labels[b, t] != -100:
                row = logits[b, t - 1].tolist()
                log_norm = math.log(sum(math.exp(v) for v in row))
                total += row[labels[b, t]] - log_norm
        expected.append(total)
    got = sequence_logps(logits, labels)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert completion_token_counts(labels).tolist() == [3, 2]


def test_sequence_logps_ignores_first_label_and_unlabelled_rows_and_custom_ignore_index():
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([[2, -1, -1], [-1, -1, -1]])  # label at t=0 has no predicting logit
    assert sequence_logps(logits, labels, ignore_index=-1).tolist() == [0.0, 0.0]


def test_sequence_logps_gradient_reaches_only_the_logits_that_predict_labels():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.tensor([[-100, -100, 5, 1]])
    sequence_logps(logits, labels).sum().backward()
    scored = logits.grad.abs().sum(-1)[0]
    assert (
        scored[0] == 0 and scored[3] == 0
    )  # position 0 predicts a prompt token; 3 predicts nothing
    assert scored[1] > 0 and scored[2] > 0


def test_sequence_logps_upcasts_half_precision_logits_to_float32():
    logits = torch.randn(2, 6, 11) * 4
    labels = torch.randint(0, 11, (2, 6))
    got = sequence_logps(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    reference = sequence_logps(logits.bfloat16().double(), labels)
    torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "logits, labels, error",
    [
        (torch.randn(2, 3, 4), torch.tensor([[0, 1, 4], [0, 1, 2]]), ValueError),  # id >= vocab
        (torch.randn(2, 3, 4), torch.tensor([[0, 1, -5], [0, 1, 2]]), ValueError),  # negative id
        (torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ValueError),  # shape
        (torch.randn(3, 4), torch.zeros(3, dtype=torch.long), ValueError),  # not [B,T,V]
        (torch.randn(2, 3, 4), torch.zeros(2, 3), TypeError),  # float labels
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), TypeError),
    ],
)
def test_sequence_logps_rejects_bad_input_with_typed_error(logits, labels, error):
    with pytest.raises(error):
        sequence_logps(logits, labels)


# ---------------------------------------------------------------- DPO / IPO by hand


def _pairs(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Random (policy chosen, policy rejected, ref chosen, ref rejected) sequence log-probs."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2, batch, generator=g, dtype=dtype) * 60 - 5
    ref = policy + torch.randn(2, batch, generator=g, dtype=dtype) * 3
    return [policy[0], policy[1], ref[0], ref[1]]


def test_dpo_sigmoid_with_label_smoothing_matches_the_conservative_dpo_formula():
    pc, pr, rc, rr = _pairs(6)
    beta, eps = 0.3, 0.2
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    h = (beta * ((pc - rc) - (pr - rr))).tolist()
    expected = sum(
        -(1 - eps) * math.log(1 / (1 + math.exp(-x))) - eps * math.log(1 / (1 + math.exp(x)))
        for x in h
    ) / len(h)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["rewards/accuracies"].item() == pytest.approx(sum(x > 0 for x in h) / len(h))


def test_dpo_gradients_reach_policy_logps_only_and_leave_reference_untouched():
    for loss_type in ("sigmoid", "ipo"):
        tensors = [t.clone().requires_grad_(True) for t in _pairs(4)]
        before = [t.detach().clone() for t in tensors]
        loss, metrics = dpo_loss(*tensors, loss_type=loss_type)
        loss.backward()
        assert tensors[0].grad.abs().sum() > 0 and tensors[1].grad.abs().sum() > 0
        assert tensors[2].grad is None and tensors[3].grad is None
        assert all(torch.equal(t.detach(), b) for t, b in zip(tensors, before, strict=True))
        assert all(not m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize(
    "case",
    ["batch_of_one", "identical_completions", "extreme_logps"],
)
def test_dpo_loss_and_gradients_stay_finite(loss_type, case):
    if case == "batch_of_one":
        tensors = _pairs(1)
    elif case == "identical_completions":
        same = _pairs(3)[0]
        tensors = [same.clone(), same.clone(), same.clone(), same.clone()]
    else:
        tensors = [
            torch.tensor([-1e4, -1.0]),
            torch.tensor([-1.0, -1e4]),
            torch.tensor([-1.0, -1e4]),
            torch.tensor([-1e4, -1.0]),
        ]
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    loss, metrics = dpo_loss(*tensors, loss_type=loss_type, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in tensors[:2])
    assert all(torch.isfinite(m) for m in metrics.values())
    if case == "identical_completions":  # zero margin: log 2 for DPO, (1/(2 beta))^2 for IPO
        assert loss.item() == pytest.approx(math.log(2) if loss_type == "sigmoid" else 1.0)


def test_dpo_loss_rejects_bad_arguments_with_typed_errors():
    pc, pr, rc, rr = _pairs(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(pc, pr[:2], rc, rr)
    with pytest.raises(ValueError, match="NaN"):
        dpo_loss(pc, pr, rc, torch.full_like(rr, float("nan")))
    with pytest.raises(TypeError):
        dpo_loss(pc.long(), pr, rc, rr)
    lengths = torch.ones(3, dtype=torch.long)
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(pc, pr, rc, rr, chosen_lengths=lengths, rejected_lengths=lengths)
    with pytest.raises(ValueError, match="both"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lengths)


# ---------------------------------------------------------------- KTO by hand


def _thumbs(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Random (policy, ref, policy KL, ref KL) sequence log-probs, float64."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2, batch, generator=g, dtype=torch.float64) * 60 - 5
    ref = policy + torch.randn(2, batch, generator=g, dtype=torch.float64) * 3
    return [policy[0], ref[0], policy[1], ref[1]]


@pytest.mark.parametrize(
    "desirable",
    [[True], [False], [True, True, True], [False, False, False, False], [True, False, True]],
    ids=["one_desirable", "one_undesirable", "all_desirable", "all_undesirable", "mixed"],
)
def test_kto_loss_and_gradients_stay_finite_for_tiny_and_one_sided_batches(desirable):
    batch = len(desirable)
    policy, ref, policy_kl, ref_kl = _thumbs(batch)
    order = mismatched_indices(batch)
    policy = policy.clone().requires_grad_(True)
    loss, metrics = kto_loss(
        policy, ref, policy_kl[order], ref_kl[order], torch.tensor(desirable), desirable_weight=1.5
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.grad).all()
    assert policy.grad.abs().sum() > 0
    assert all(torch.isfinite(m) for m in metrics.values())
    assert metrics["count/desirable"].item() == sum(desirable)
    assert metrics["count/undesirable"].item() == batch - sum(desirable)
    if all(desirable) or not any(desirable):
        assert metrics["rewards/margins"].item() == 0.0


def test_kto_identical_completions_give_half_the_class_weight():
    same = torch.full((4,), -12.5, dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    loss, metrics = kto_loss(
        same, same, same, same, desirable, desirable_weight=2.0, undesirable_weight=1.0
    )
    assert loss.item() == pytest.approx((2 * 2.0 * 0.5 + 2 * 1.0 * 0.5) / 4)
    assert metrics["kl"].item() == 0.0


def test_kto_gradients_reach_policy_logps_only():
    tensors = [t.clone().requires_grad_(True) for t in _thumbs(4)]
    loss, metrics = kto_loss(*tensors, torch.tensor([True, False, False, True]))
    loss.backward()
    assert tensors[0].grad.abs().sum() > 0
    assert all(t.grad is None for t in tensors[1:])  # reference and both KL inputs
    assert all(not m.requires_grad for m in metrics.values())


def test_kto_reference_point_is_the_clamped_mean_mismatched_log_ratio():
    policy, ref, _, _ = _thumbs(3)
    desirable = torch.tensor([True, False, True])
    _, up = kto_loss(
        policy, ref, torch.tensor([-10.0, -11.0]), torch.tensor([-12.0, -12.0]), desirable
    )
    _, down = kto_loss(
        policy, ref, torch.tensor([-13.0, -14.0]), torch.tensor([-12.0, -12.0]), desirable
    )
    assert up["kl"].item() == pytest.approx(1.5)
    assert down["kl"].item() == 0.0


def test_kto_loss_rejects_bad_arguments_with_typed_errors():
    policy, ref, policy_kl, ref_kl = _thumbs(3)
    with pytest.raises(TypeError, match="bool"):
        kto_loss(policy, ref, policy_kl, ref_kl, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        kto_loss(policy, ref, policy_kl, ref_kl, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(policy, ref, policy_kl, ref_kl, torch.tensor([True] * 3), desirable_weight=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        kto_loss(policy, ref, policy_kl[:0], ref_kl[:0], torch.tensor([True] * 3))
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, policy_kl, ref_kl, torch.tensor([True] * 3), beta=float("inf"))


@pytest.mark.parametrize(
    "counts, expected",
    [
        ((10, 90), 9.0),
        ((90, 10), 4 / 3 * 10 / 90),
        ((0, 5), 1.0),
        ((5, 0), 1.0),
        ((0, 0), 1.0),
        ((50, 50), 1.0),
        ((60, 50), 1.0),
        ((1, 1000), 1000.0),
    ],
)
def test_balanced_kto_weights_put_the_class_ratio_in_the_papers_interval(counts, expected):
    n_d, n_u = counts
    lam_d, lam_u = balanced_kto_weights(n_d, n_u)
    assert lam_u == 1.0
    assert lam_d == pytest.approx(expected)
    if n_d and n_u:
        assert 1.0 - 1e-12 <= lam_d * n_d / (lam_u * n_u) <= 4 / 3 + 1e-12


def test_balanced_kto_weights_reject_bad_counts():
    with pytest.raises(ValueError):
        balanced_kto_weights(-1, 3)
    with pytest.raises(TypeError):
        balanced_kto_weights(2.5, 3)


def test_mismatched_indices_pair_every_prompt_with_another_completion():
    for batch in range(2, 9):
        order = mismatched_indices(batch)
        assert sorted(order) == list(range(batch))
        assert all(j != i for i, j in enumerate(order))
    assert mismatched_indices(1) == [0]
    with pytest.raises(ValueError):
        mismatched_indices(0)
    with pytest.raises(TypeError):
        mismatched_indices(2.0)
