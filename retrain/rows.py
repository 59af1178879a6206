"""The rows of one retraining round, as the worker builds them and the gate takes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from feedback_store import (
    FeedbackStore,
    RowFilter,
    build_asked_prompts,
    build_dpo_rows,
    build_kto_rows,
)


@dataclass(frozen=True)
class RoundRows:
    """The rows of one round, as of one event: the training split's (to train on and to
    fit the gate's scorer) and the held-out split's (to check it), edits also counted as
    their authors' down-votes; the held-out prompts answered, rated or not (the
    candidate never saw them either); and the training split's (``train_asked``: where
    the round may rank pairs of the model's own replies)."""

    kto: list[dict]
    dpo: list[dict]
    heldout_kto: list[dict]
    heldout_dpo: list[dict]
    asked: list[list[dict]]
    train_asked: list[list[dict]] = field(default_factory=list)

    def gate_rows(self, *, ranked_pairs: bool = False) -> dict[str, Any]:
        """The rows as :func:`retrain.evaluate.evaluate_behaviour` takes them. When the
        round trained on pairs of its own replies ranked by a scorer (the metric
        ``pairs/own`` above 0), ``ranked_pairs``: the gate's scorer is fitted to the other
        half of the training rows (:func:`retrain.reward_model.split_halves`)."""
        rows: dict[str, Any] = {"train_kto": self.kto, "train_dpo": self.dpo,
                                "heldout_kto": self.heldout_kto,
                                "heldout_dpo": self.heldout_dpo, "asked_prompts": self.asked}
        if ranked_pairs:
            from retrain.reward_model import split_halves  # torch: not for the store alone

            rows["scorer_kto"], rows["scorer_dpo"] = split_halves(self.kto, self.dpo)[1]
        return rows


def ranked_own_pairs(train_metrics: dict[str, Any]) -> bool:
    """Whether a round's training (its metrics) ranked pairs of the model's own replies
    with a scorer of its own (:mod:`retrain.onpolicy`)."""
    return float(train_metrics.get("pairs/own") or 0) > 0


def round_rows(store: FeedbackStore, last_event_id: int, eval_fraction: float) -> RoundRows:
    """The :class:`RoundRows` of the feedback up to event ``last_event_id``, and of the
    prompts answered by then: read again later, a round's rows are the ones it had."""
    snap = {"up_to_event_id": last_event_id, "eval_fraction": eval_fraction}

    def kto(split: str) -> list[dict]:
        # an edit is also its author's thumbs-down on the reply they corrected
        return build_kto_rows(store, RowFilter(split=split, **snap), edits_as_votes=True)

    return RoundRows(
        kto=kto("train"), dpo=build_dpo_rows(store, RowFilter(split="train", **snap)),
        heldout_kto=kto("eval"), heldout_dpo=build_dpo_rows(store, RowFilter(split="eval", **snap)),
        asked=build_asked_prompts(store, split="eval", **snap),
        train_asked=build_asked_prompts(store, split="train", **snap))
