"""The canary's decision rule: compare two versions' share of good replies, sequentially.

Each reply that got a signal counts once for the version that wrote it: **good** when
its latest thumb is up and it was neither edited nor regenerated, **bad** when its
latest thumb is down, or a user edited it, or regenerated it. ``p_a`` and ``p_c`` are
the good shares of the active version and of the canary, ``d = p_c - p_a``.

The test is a mixture sequential probability ratio test (mSPRT; Johari, Pekelis and
Walsh, "Always valid inference", 2017) on the normal approximation of ``d_hat``:
with ``s^2 = p_c(1 - p_c)/n_c + p_a(1 - p_a)/n_a`` (shares smoothed as ``(good + 1) /
(n + 2)``) and a normal mixture of effects with standard deviation ``tau``, the
likelihood ratio against ``d = d0`` is

    L = sqrt(s^2 / (s^2 + tau^2)) * exp(tau^2 (d_hat - d0)^2 / (2 s^2 (s^2 + tau^2)))

and ``L >= 1 / alpha`` rejects ``d = d0``. Its error rate holds however often one
looks (that is what "always valid" means; the normal approximation and the plug-in
variance make it approximate, which ``benchmarks/bench_canary.py`` measures). The
same bound gives an always-valid confidence sequence ``d_hat +- w`` with

    w^2 = 2 s^2 (s^2 + tau^2) / tau^2 * (ln(1 / alpha) + ln((s^2 + tau^2) / s^2) / 2).

With ``d0 = -margin``: **promote** when the whole sequence lies above ``-margin`` (the
canary is better, or not worse by more than the margin), **roll back** when it lies
below, both once each version has ``min_ratings``; otherwise keep collecting. A
canary that runs out of time or ratings first ends undecided, and the active
version stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ArmCounts:
    """One version's signals over the canary's conversations."""

    replies: int = 0  # replies written (with or without a signal)
    up: int = 0
    down: int = 0
    edited: int = 0
    regenerated: int = 0
    good: int = 0
    bad: int = 0

    @property
    def rated(self) -> int:
        return self.good + self.bad

    @property
    def good_share(self) -> float | None:
        return self.good / self.rated if self.rated else None

    @property
    def up_rate(self) -> float | None:
        return self.up / (self.up + self.down) if self.up + self.down else None

    @property
    def fix_rate(self) -> float | None:
        """Share of replies edited or regenerated (signs of a bad reply)."""
        return (self.edited + self.regenerated) / self.replies if self.replies else None

    def to_dict(self) -> dict:
        lo, hi = wilson(self.good, self.rated)
        return {"replies": self.replies, "up": self.up, "down": self.down,
                "edited": self.edited, "regenerated": self.regenerated, "good": self.good,
                "bad": self.bad, "rated": self.rated, "good_share": self.good_share,
                "good_share_low": lo, "good_share_high": hi, "up_rate": self.up_rate,
                "fix_rate": self.fix_rate}


@dataclass(frozen=True)
class Rule:
    """``min_ratings`` per version; ``margin`` how much worse the canary may be and still
    be promoted; ``error_rate`` the chance of a wrong-direction decision (``alpha``);
    ``mixing_sd`` the effect size the test is most sensitive around (``tau``)."""

    min_ratings: int = 40
    margin: float = 0.0
    error_rate: float = 0.05
    mixing_sd: float = 0.1

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.min_ratings, bool) or not isinstance(self.min_ratings, int) \
                or self.min_ratings < 1:
            out.append(f"min_ratings must be an int >= 1, got {self.min_ratings!r}")
        if not finite_number(self.margin) or not 0 <= self.margin < 1:
            out.append(f"margin must be in [0, 1), got {self.margin!r}")
        if not finite_number(self.error_rate) or not 0 < self.error_rate < 0.5:
            out.append(f"error_rate must be in (0, 0.5), got {self.error_rate!r}")
        if not finite_number(self.mixing_sd) or not 0 < self.mixing_sd <= 1:
            out.append(f"mixing_sd must be in (0, 1], got {self.mixing_sd!r}")
        return out


@dataclass(frozen=True)
class Verdict:
    decision: str  # "promote" | "rollback" | "continue"
    diff: float | None  # d_hat = canary good share - active good share
    low: float | None  # the always-valid confidence sequence for d
    high: float | None
    reason: str


def finite_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _share(good: int, n: int) -> float:
    return (good + 1) / (n + 2)


def half_width(active: ArmCounts, canary: ArmCounts, rule: Rule) -> float:
    """``w`` of the confidence sequence (see the module docstring)."""
    pa, pc = _share(active.good, active.rated), _share(canary.good, canary.rated)
    s2 = pc * (1 - pc) / max(1, canary.rated) + pa * (1 - pa) / max(1, active.rated)
    t2 = rule.mixing_sd ** 2
    return math.sqrt(2 * s2 * (s2 + t2) / t2
                     * (math.log(1 / rule.error_rate) + 0.5 * math.log((s2 + t2) / s2)))


def decide(active: ArmCounts, canary: ArmCounts, rule: Rule) -> Verdict:
    """Promote, roll back or continue, with a reason in plain words."""
    if active.rated == 0 or canary.rated == 0:
        return Verdict("continue", None, None, None,
                       f"waiting for ratings: {canary.rated} on the canary, {active.rated} on "
                       f"the active version (at least {rule.min_ratings} each)")
    diff = canary.good / canary.rated - active.good / active.rated
    w = half_width(active, canary, rule)
    low, high = diff - w, diff + w
    figures = (f"good replies {canary.good}/{canary.rated} on the canary vs {active.good}/"
               f"{active.rated} on the active version, difference {diff:+.3f} "
               f"({1 - rule.error_rate:.0%} always-valid interval {low:+.3f} to {high:+.3f})")
    if min(active.rated, canary.rated) < rule.min_ratings:
        return Verdict("continue", diff, low, high,
                       f"waiting for {rule.min_ratings} ratings on each version: {figures}")
    margin = f"-{rule.margin:.2f}" if rule.margin else "0"
    if low > -rule.margin:
        return Verdict("promote", diff, low, high, f"promote: {figures} is above {margin}")
    if high < -rule.margin:
        return Verdict("rollback", diff, low, high, f"roll back: {figures} is below {margin}")
    return Verdict("continue", diff, low, high, f"no decision yet: {figures} contains {margin}")


def wilson(good: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """The Wilson score interval of a share (for display)."""
    if n == 0:
        return None, None
    p = good / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - spread), min(1.0, centre + spread)
