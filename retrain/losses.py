"""Preference losses for training the LoRA adapter: DPO/IPO on pairs, KTO on thumbs.

Every loss takes per-sequence log-probabilities (one number per example, from
:func:`sequence_logps`) of the policy (the model with the adapter being trained) and
of the reference (the same model with the adapter disabled), and returns the scalar
loss together with detached metrics for logging. Nothing here reads global
configuration or touches a model; the formulas are in the docstrings.

The numbers agree with TRL 1.16 (``DPOTrainer`` with ``loss_type`` ``"sigmoid"`` or
``"ipo"``, ``KTOTrainer`` with ``loss_type="kto"``) on the same inputs; the test
suite checks it. Differences in convention are stated where they occur.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo")
# The KTO paper (Ethayarajh et al. 2024, eq. 8) recommends
# lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
KTO_RATIO_LOW = 1.0
KTO_RATIO_HIGH = 4.0 / 3.0


def sequence_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Sum of the log-probabilities of the labelled tokens of each sequence.

    ``logits`` is ``[B, T, V]`` and ``labels`` ``[B, T]``, aligned as in Hugging Face
    causal LMs: ``logits[:, t]`` predicts ``labels[:, t + 1]``. For each row ``b``::

        logp_b = sum_{t >= 1, labels[b, t] != ignore_index} log_softmax(logits[b, t - 1])[labels[b, t]]

    Only the labelled positions are scored, so memory grows with the number of
    completion tokens, not with the prompt. The result is ``[B]``, in float32 (or
    float64 when the logits are float64) whatever the logits' dtype; a row without a
    labelled token gets 0.0. Differentiable with respect to ``logits``.

    Raises ``TypeError`` for non-tensor inputs or wrong dtypes and ``ValueError`` for
    wrong shapes or label ids outside ``[0, V)``.
    """
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("logits and labels must be torch tensors")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, time, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels.dim() != 2 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be [batch, time] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    targets = labels[:, 1:]
    mask = targets != ignore_index
    picked = targets[mask]
    vocab = logits.shape[-1]
    if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= vocab):
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got values in [{int(picked.min())}, {int(picked.max())}]"
        )
    scored = logits[:, :-1][mask].to(compute_dtype)  # [N, V], N = labelled tokens
    token_logps = scored.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - scored.logsumexp(-1)
    rows = mask.nonzero(as_tuple=True)[0]
    zeros = torch.zeros(logits.shape[0], dtype=compute_dtype, device=logits.device)
    return zeros.index_add(0, rows, token_logps)


def completion_token_counts(labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Number of tokens :func:`sequence_logps` scores in each row: ``[B]`` int64.

    That is ``(labels[:, 1:] != ignore_index).sum(-1)``; pass it as ``chosen_lengths``
    / ``rejected_lengths`` to :func:`dpo_loss` for length-normalised IPO.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError("labels must be a [batch, time] tensor")
    return (labels[:, 1:] != ignore_index).sum(-1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise preference loss over a batch of ``B`` (chosen, rejected) pairs.

    With log-ratios ``rho_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and
    ``rho_l = log pi(y_l|x) - log pi_ref(y_l|x)`` (all inputs ``[B]``):

    - ``"sigmoid"`` (DPO, Rafailov et al. 2023; label smoothing ``eps`` is the
      conservative DPO of Mitchell 2023)::

          h = beta * (rho_w - rho_l)
          loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    - ``"ipo"`` (Azar et al. 2023, eq. 17, ``beta`` is the paper's tau)::

          loss = (rho_w / n_w - rho_l / n_l - 1 / (2 * beta)) ** 2

      where ``n_w``, ``n_l`` are ``chosen_lengths`` / ``rejected_lengths`` (clamped to
      at least 1) when given, else 1. TRL 1.16 always divides by the completion
      lengths; pass them (:func:`completion_token_counts`) to get its numbers, or pass
      already length-averaged log-probs and no lengths.

    The loss is the mean over the batch. Metrics (detached scalars; rewards use the
    log-ratios as given, unnormalised, as TRL does): ``rewards/chosen`` =
    mean(beta * rho_w), ``rewards/rejected`` = mean(beta * rho_l),
    ``rewards/margins`` = mean(beta * (rho_w - rho_l)), ``rewards/accuracies`` =
    fraction of pairs with rho_w > rho_l.

    Gradients flow to the policy inputs only; the reference inputs are detached.
    Raises ``ValueError`` for an unknown ``loss_type``, ``beta <= 0``,
    ``eps`` outside ``[0, 0.5)`` (or non-zero with IPO), lengths with ``"sigmoid"``
    or only one of them, mismatched shapes or non-finite log-probs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    _check_positive("beta", beta)
    if not (isinstance(label_smoothing, int | float) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
    inputs = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _check_logps(inputs)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None and loss_type != "ipo":
        raise ValueError("chosen_lengths/rejected_lengths are used by loss_type='ipo' only")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    if loss_type == "sigmoid":
        h = beta * (chosen_logratios - rejected_logratios)
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    else:
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
        if chosen_lengths is not None:
            shape = tuple(policy_chosen_logps.shape)
            for name, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
                if not isinstance(lengths, Tensor) or tuple(lengths.shape) != shape:
                    raise ValueError(f"{name}_lengths must be a tensor of shape {shape}")
            chosen_scores = chosen_logratios / chosen_lengths.clamp(min=1)
            rejected_scores = rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (chosen_scores - rejected_scores - 1 / (2 * beta)) ** 2

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards)
            .to(chosen_rewards.dtype)
            .mean(),
        }
    return losses.mean(), metrics


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss (Ethayarajh et al. 2024, eq. 7) over ``B`` thumbs-rated completions.

    With ``r_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)`` and the reference point
    estimated from mismatched pairs ``(x_i, y_j)`` (see :func:`mismatched_indices`)::

        z0 = max(0, mean_k(policy_kl_logps_k - ref_kl_logps_k))      (detached)
        loss_i = lambda_D * (1 - sigmoid(beta * (r_i - z0)))   if desirable_i
        loss_i = lambda_U * (1 - sigmoid(beta * (z0 - r_i)))   otherwise
        loss = mean_i loss_i                                   (over all B)

    as in TRL 1.16 and HALOs (TRL also averages z0 across processes before the clamp;
    here the batch is one process's). Each term is a sigmoid of a finite number, so
    the loss and its gradient are finite for any finite input: a batch of one, a batch
    with one class only (the mean is over the whole batch, never over an empty class)
    and identical completions (r = z0 = 0 gives lambda / 2).

    Metrics (detached scalars): ``kl`` = z0; ``rewards/desirable`` and
    ``rewards/undesirable`` = mean of ``beta * r_i`` over that class (0.0 when the
    class is empty); ``rewards/margins`` = their difference (0.0 unless both classes
    are present); ``count/desirable``, ``count/undesirable`` as float tensors.

    ``reference_point``: ``z0`` itself (a scalar, e.g. averaged over several processes'
    shares of a batch), used instead of the estimate from the KL inputs.

    ``desirable`` is a bool tensor ``[B]``; the KL inputs are 1-D of any non-zero
    length. Gradients flow to ``policy_logps`` only. Raises ``TypeError`` for a
    non-bool ``desirable`` and ``ValueError`` for bad shapes, non-finite log-probs,
    ``beta <= 0`` or negative weights.
    """
    _check_positive("beta", beta)
    for name, weight in (
        ("desirable_weight", desirable_weight),
        ("undesirable_weight", undesirable_weight),
    ):
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
    _check_logps({"policy_logps": policy_logps, "ref_logps": ref_logps})
    _check_logps({"policy_kl_logps": policy_kl_logps, "ref_kl_logps": ref_kl_logps})
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool:
        raise TypeError("desirable must be a bool tensor")
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable must have shape {tuple(policy_logps.shape)}, got {tuple(desirable.shape)}"
        )

    if reference_point is None:
        kl = (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)
    else:
        kl = reference_point.detach().to(policy_logps.dtype).reshape(()).clamp(min=0)
    logratios = policy_logps - ref_logps.detach()
    desirable = desirable.to(logratios.device)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)

    with torch.no_grad():
        rewards = beta * logratios.detach()
        n_desirable = desirable.sum().to(rewards.dtype)
        n_undesirable = (~desirable).sum().to(rewards.dtype)
        zero = rewards.new_zeros(())
        rewards_desirable = torch.where(desirable, rewards, zero).sum() / n_desirable.clamp(min=1)
        rewards_undesirable = torch.where(desirable, zero, rewards).sum() / n_undesirable.clamp(
            min=1
        )
        both = (n_desirable > 0) & (n_undesirable > 0)
        metrics = {
            "kl": kl,
            "rewards/desirable": rewards_desirable,
            "rewards/undesirable": rewards_undesirable,
            "rewards/margins": torch.where(both, rewards_desirable - rewards_undesirable, zero),
            "count/desirable": n_desirable,
            "count/undesirable": n_undesirable,
        }
    return losses.mean(), metrics


def balanced_kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """``(desirable_weight, undesirable_weight)`` balancing the two classes for KTO.

    The KTO paper (eq. 8) recommends ``lambda_D * n_D / (lambda_U * n_U)`` in
    ``[1, 4/3]``. The undesirable weight stays 1.0 and the desirable weight is the
    one closest to 1.0 that puts the ratio in that interval::

        lambda_D = clamp(1, n_U / n_D, (4/3) * n_U / n_D)

    so balanced data keeps ``(1.0, 1.0)``, a desirable minority is weighted up to
    ratio 1 and a desirable majority down to ratio 4/3. When either count is zero
    there is nothing to balance and ``(1.0, 1.0)`` is returned. The weight is not
    capped: 1 desirable against 1000 undesirable gives 1000.0.

    Raises ``TypeError`` for non-integer counts and ``ValueError`` for negative ones.
    """
    for name, count in (("n_desirable", n_desirable), ("n_undesirable", n_undesirable)):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"{name} must be an int, got {type(count).__name__}")
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    base = n_undesirable / n_desirable  # the lambda_D giving ratio 1
    return min(max(1.0, base * KTO_RATIO_LOW), base * KTO_RATIO_HIGH), 1.0


def mismatched_indices(batch_size: int) -> list[int]:
    """Completion index ``j`` to pair with prompt ``i`` for the KTO reference point.

    A rotation by one, the pairing TRL uses: prompt ``i`` gets completion
    ``(i - 1) mod B``, so ``[B-1, 0, 1, ..., B-2]`` and ``j != i`` whenever ``B > 1``.
    For ``B == 1`` there is no other completion and ``[0]`` is returned: the KL
    estimate is then the example's own log-ratio ``r`` (clamped at 0), which is
    biased but finite, so :func:`kto_loss` stays finite (every term is a sigmoid of
    ``beta * (r - max(r, 0))`` or its mirror). Raises ``ValueError`` for
    ``batch_size < 1`` and ``TypeError`` for a non-int.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(i - 1) % batch_size for i in range(batch_size)]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_logps(tensors: dict[str, Tensor]) -> None:
    """Same-shape, non-empty, 1-D, finite floating tensors, or a typed error naming the culprit."""
    shape = None
    for name, value in tensors.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if value.dim() != 1 or value.numel() == 0:
            raise ValueError(f"{name} must be 1-D and non-empty, got shape {tuple(value.shape)}")
        if shape is not None and value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        shape = value.shape
        if not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"{name} contains NaN or infinite values")


def per_token_nll(logps: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """``-logps / n_tokens`` per sequence: the length-normalised negative log-likelihood
    of each completion (``logps`` from :func:`sequence_logps`, ``n_tokens`` from
    :func:`completion_token_counts`, at least 1). Differentiable in ``logps``.

    Used as the NLL term on preferred completions (chosen replies, thumbs-up replies), as
    in RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
    ``rpo_alpha``): DPO and KTO alone can lower the likelihood of the preferred reply
    too, moving mass to text neither reply contains ("likelihood displacement"); the
    NLL term keeps the preferred replies likely."""
    return nll_per_token(logps, completion_token_counts(labels, ignore_index=ignore_index))


def nll_per_token(logps: Tensor, counts: Tensor) -> Tensor:
    """:func:`per_token_nll` from the scored token counts (at least 1 each) instead of the
    labels."""
    return -logps / counts.clamp(min=1).to(logps.dtype)
