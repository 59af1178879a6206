"""The evaluation gate's rule: what it asks of a candidate (:class:`GateConfig`) and its
decision, promote, hold or reject, with reasons in plain words (:func:`gate_decision`),
on what :func:`retrain.evaluate.evaluate_behaviour` measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrain.evaluate import BehaviourReport

_EPS = 1e-6


@dataclass(frozen=True)
class GateConfig:
    """What :func:`gate_decision` asks for, and how :func:`retrain.evaluate.evaluate_behaviour` samples.

    Evidence (below it the candidate is held, neither promoted nor rejected):
    the feedback-trained scorer's accuracy checked on at least ``min_heldout_rows`` rows
    (all the deduplicated rows, cross-validated in folds by prompt) and at least
    ``min_heldout_prompts`` distinct held-out prompts to compare replies on (of held-out
    rows, or answered there and never rated); that accuracy above
    ``min_scorer_accuracy`` and its lower confidence bound (Wilson, ``confidence_z``)
    above one half, chance (else the ratings do not predict themselves); at least ``min_changed_share`` of the candidate's sampled replies on
    held-out prompts different from the active's drawn with the same seed (else the
    candidate is a near no-op: the few replies that did change can make a paired
    comparison look significant while users would hardly see a difference); and the
    candidate's mean score above the active's with the lower confidence bound ``mean
    difference - improvement_z * stderr > 0`` (paired by prompt; one-sided 95% at 1.645).

    Safety (a failure rejects): mean per-token ``KL(candidate || base)`` on its sampled
    replies at most ``max_kl`` nats/token; the share of degenerate sampled replies at
    most ``max_degenerate_share`` and at most ``max_degenerate_increase`` above the
    active's. ``max_canary_kl`` is the older name of ``max_kl``, still read (and then
    it wins) so existing ``FEEDBACK_CHAT_GATE_MAX_CANARY_KL`` settings keep working.

    Sampling, as served (``chat_app.engine.params`` defaults): ``samples_per_prompt``
    replies to each of at most ``max_prompts`` held-out prompts, at ``temperature`` and
    ``top_p``, up to ``max_new_tokens`` tokens, seeded from ``seed``.
    """

    # 10, not 20: the accuracy's lower bound already asks more of a scorer checked on few
    # rows (9 of 10 right is enough, 8 is not), and an edits-only first round has about 20
    min_heldout_rows: int = 10
    min_heldout_prompts: int = 8
    min_scorer_accuracy: float = 0.6
    min_changed_share: float = 0.1
    confidence_z: float = 1.96
    # 1.645, a one-sided 95% bound (it was 1.96, one-sided 97.5%): promotion asks a
    # one-sided question. The 30 candidates of a full alignment benchmark judged again:
    # 7 of the 8 truly better promoted instead of 6, no other one more (README, "Does
    # the loop make the model better?"); the scorer's accuracy keeps ``confidence_z``
    improvement_z: float = 1.645
    max_kl: float = 0.3
    max_degenerate_share: float = 0.2
    max_degenerate_increase: float = 0.05
    # 48 rather than 24: the same 30 candidates of a full alignment benchmark, judged
    # again, 7 of the 8 truly better ones promoted instead of 4 (README, "Does the loop
    # make the model better?")
    max_prompts: int = 48
    samples_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    max_canary_kl: float | None = None

    @property
    def kl_limit(self) -> float:
        return self.max_kl if self.max_canary_kl is None else self.max_canary_kl

    def validate(self) -> None:
        """Raise one ValueError listing every bad field."""
        bad = []
        for name, value in asdict(self).items():
            if name == "max_canary_kl" and value is None:
                continue
            if name in ("min_heldout_rows", "min_heldout_prompts", "max_prompts",
                        "samples_per_prompt", "max_new_tokens", "seed"):
                low = 1 if name in ("max_prompts", "samples_per_prompt", "max_new_tokens") else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    bad.append(f"{name} must be an int >= {low}, got {value!r}")
            elif not (isinstance(value, int | float) and not isinstance(value, bool)
                      and math.isfinite(value) and value >= 0):
                bad.append(f"{name} must be a finite number >= 0, got {value!r}")
            elif name in ("min_scorer_accuracy", "min_changed_share", "top_p") and value > 1:
                bad.append(f"{name} must be at most 1, got {value!r}")
        if self.top_p == 0:
            bad.append("top_p must be > 0")
        if bad:
            raise ValueError("invalid GateConfig: " + "; ".join(bad))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _level(z: float) -> str:
    """The two-sided confidence level of ``z`` standard errors, e.g. '95%' for 1.96."""
    return f"{math.erf(z / math.sqrt(2)):.0%}"


def _one_sided(z: float) -> str:
    """The one-sided level of a lower bound ``z`` standard errors down, e.g. 'one-sided
    95%' for 1.645."""
    return f"one-sided {(1 + math.erf(z / math.sqrt(2))) / 2:.1%}".replace(".0%", "%")


def gate_decision(
    report: BehaviourReport, config: GateConfig = GateConfig()
) -> tuple[str, list[str]]:
    """Decide on the candidate of ``report``: ``("promote" | "hold" | "reject", reasons)``.

    Reject when it is unsafe, whatever the evidence: a non-finite measurement, KL from
    the base above the limit, or too many degenerate replies (absolutely, or risen above
    the active's by more than the margin). Otherwise hold when the evidence is missing:
    too few held-out rows or prompts, a scorer that does not predict held-out feedback,
    or a score difference whose lower confidence bound is not above 0 (a no-op adapter
    lands here); a hold's last line gives the candidate's KL and degenerate share, which
    were within the limits. Otherwise promote. Every reason starts with its decision and
    says what was measured; a promotion has one summary line.
    """
    config.validate()
    r = report
    active = r.active_label
    numbers = {"KL": r.kl, "degenerate share": r.degenerate_share,
               "score difference": r.score_diff, "score lower bound": r.score_lower_bound,
               "candidate score": r.candidate_score, "active score": r.active_score}
    rejects = [f"reject: {name} is not a finite number ({value})"
               for name, value in numbers.items() if value is not None and not math.isfinite(value)]
    if rejects:
        return "reject", rejects
    if r.kl > config.kl_limit + _EPS:
        rejects.append(f"reject: KL {r.kl:.3g} nats/token from the base on sampled replies "
                       f"exceeds {config.kl_limit:.2f}")
    if r.degenerate_share > config.max_degenerate_share + _EPS:
        rejects.append(f"reject: {r.degenerate_share:.0%} of the candidate's sampled replies "
                       f"are degenerate, over the limit {config.max_degenerate_share:.0%} "
                       f"({active} {r.active_degenerate_share:.0%})")
    rise = r.degenerate_share - r.active_degenerate_share
    if rise > config.max_degenerate_increase + _EPS:
        rejects.append(f"reject: degenerate sampled replies rose from "
                       f"{r.active_degenerate_share:.0%} ({active}) to {r.degenerate_share:.0%}, "
                       f"more than the allowed {config.max_degenerate_increase:.0%}")
    if rejects:
        return "reject", rejects

    holds = []
    acc = r.scorer.accuracy
    acc_bound = r.scorer.lower_bound(r.confidence_z)
    measured_on = (f"{r.scorer.n_rows} held-out rows" if r.scorer.method == "held-out" else
                   f"{r.scorer.n_rows} rows cross-validated by prompt ({r.n_heldout_rows} "
                   f"held-out)")
    if r.scorer.n_rows < config.min_heldout_rows or r.n_heldout_prompts < config.min_heldout_prompts:
        holds.append(
            f"hold: not enough evidence: the scorer was checked on {measured_on} "
            f"({r.scorer.n_thumbs} thumbs, {r.scorer.n_pairs} pairs) and there are "
            f"{r.n_heldout_prompts} distinct held-out prompts; the gate needs at least "
            f"{config.min_heldout_rows} rows and {config.min_heldout_prompts} prompts")
    elif acc is None or acc_bound is None or acc <= config.min_scorer_accuracy \
            or acc_bound <= 0.5:
        seen = "no rows to check it on" if acc is None or acc_bound is None else (
            f"{acc:.0%} of {measured_on} right "
            f"(thumbs {_fmt(r.scorer.thumb_accuracy)}, pairs {_fmt(r.scorer.pair_accuracy)}; "
            f"{_level(r.confidence_z)} lower bound {acc_bound:.0%})")
        holds.append(
            f"hold: the feedback does not predict itself on held-out prompts: a scorer trained "
            f"on {r.n_train_rows} training rows got {seen}, needs more than "
            f"{config.min_scorer_accuracy:.0%} with a lower bound above 50% (chance): "
            f"ratings look inconsistent or too few")
    samples = f"{r.n_prompts} held-out prompts × {r.samples_per_prompt} samples"
    if r.changed_share is not None and r.changed_share < config.min_changed_share - _EPS:
        holds.append(
            f"hold: near no-op: only {r.changed_share:.0%} of the candidate's replies on "
            f"{samples} differ from {active}'s drawn with the same seed; at least "
            f"{config.min_changed_share:.0%} must change for users to see a difference")
    level = _one_sided(r.improvement_z)
    scorer_note = (f" fitted to the {r.n_train_rows} training rows of the prompts that did "
                   f"not rank the round's own-reply pairs" if r.scorer_half else "")
    if r.score_diff is None or r.score_lower_bound is None:
        holds.append(f"hold: cannot compare replies: {samples} (at least 2 prompts needed)")
        comparison = ""
    else:
        comparison = (
            f"candidate replies scored {r.candidate_score:.3f} vs {active} "
            f"{r.active_score:.3f} in log-odds by the feedback-trained scorer{scorer_note} "
            f"(difference "
            f"{r.score_diff:+.3f}, {level} lower bound {r.score_lower_bound:+.3f}")
        if r.score_lower_bound <= 0:
            holds.append(f"hold: {comparison} ≤ 0) on {samples}: no evidence of improvement")
    if holds:
        holds.append(f"hold: within the safety limits: KL {r.kl:.3f} ≤ {config.kl_limit:.2f} "
                     f"nats/token from the base; degenerate {r.degenerate_share:.0%} "
                     f"({active} {r.active_degenerate_share:.0%})")
        return "hold", holds
    return "promote", [
        f"promote: {comparison} > 0) on {samples}; KL {r.kl:.3f} ≤ {config.kl_limit:.2f} "
        f"nats/token; degenerate {r.degenerate_share:.0%} ({active} "
        f"{r.active_degenerate_share:.0%}); scorer accuracy {acc:.0%} on {measured_on}"]
