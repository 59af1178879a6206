"""A small reward model learned from the feedback itself, to score generated replies.

Its features of a (prompt, reply) pair (word unigrams and bigrams, length, ``!``, ``?``
and list lines, the share of the prompt's words repeated, hashed into ``DIMENSIONS``
buckets) are :func:`feedback_store.reply_scorer.features`, shared with the engine, which
reads a round's scorer from the file :meth:`RewardModel.to_reply_scorer` gives.

The score is linear, ``s(x, y) = w . phi(x, y)``, and one set of weights serves both
kinds of feedback:

- thumbs (KTO rows): ``P(up | x, y) = sigmoid(s(x, y) + b)``, a logistic regression
  whose two classes are weighted equally (so the bias learns no label prior);
- pairs (DPO rows): ``P(chosen > rejected) = sigmoid(s(x, y_c) - s(x, y_r))``,
  Bradley-Terry.

The loss is the mean of both negative log-likelihoods (each kind weighted by its row
count) plus ``l2 * |w|^2``, minimised by full-batch Adam; a few thousand rows train in
about a second on one CPU thread.

Thumbs count only when both labels have at least ``MIN_THUMBS_PER_LABEL`` rows, in
training and in measuring alike. Thumbs of one label say which replies users disliked
(or liked), not what they prefer to them: users who only edit leave only down-votes
(each edited reply counts as one). A scorer fitted to those learns "unlike the rated
replies" and scores any change as a gain; the gate then promoted a candidate that had
merely moved away from the disliked replies, to others no better by the users' rule
(the content judge of the alignment benchmark: 0.307 against the base's 0.312, scored
+0.59 in log-odds). Such a round is scored by its pairs alone (or not at all).

Held-out accuracy: for thumbs the balanced accuracy of ``P(up) > 0.5`` (the mean of the
recall of each label, so always answering "up" scores 0.5); for pairs the share where
the chosen reply scores higher (a tie counts one half). The overall accuracy is their
mean weighted by the counts of rows that count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from feedback_store.datasets import prompt_key
from feedback_store.reply_scorer import DIMENSIONS, ReplyScorer, features, last_user_text

MIN_THUMBS_PER_LABEL = 3


def two_sided(labels: Sequence[bool]) -> bool:
    """Whether thumbs with these labels count: at least ``MIN_THUMBS_PER_LABEL`` of each."""
    ups = sum(bool(label) for label in labels)
    return min(ups, len(labels) - ups) >= MIN_THUMBS_PER_LABEL


def _reply_text(messages: list[dict]) -> str:
    return " ".join(m.get("content", "") for m in messages)


@dataclass
class Outcomes:
    """The scorer's prediction on each evaluated row: thumbs as (label, right), pairs as
    wins (1.0, 0.5 on a tie, 0.0)."""

    thumbs: list[tuple[bool, bool]] = field(default_factory=list)
    pairs: list[float] = field(default_factory=list)

    def extend(self, other: Outcomes) -> None:
        self.thumbs.extend(other.thumbs)
        self.pairs.extend(other.pairs)


@dataclass(frozen=True)
class ScorerAccuracy:
    """How well the scorer predicts feedback it was not trained on (see the module doc for
    the rules).

    ``thumb_accuracy`` is None without thumbs of both labels (:func:`two_sided`; then
    ``n_thumbs`` is 0 and the thumbs do not count), ``pair_accuracy`` without pairs,
    ``accuracy`` without either. ``method``: ``"held-out"`` (the held-out split) or
    ``"cross-validated"`` (each row predicted by a scorer trained on the other folds,
    folds by prompt, see :func:`cross_validated_accuracy`). ``effective_rows``: the
    number of independent right-or-wrong rows that would measure ``accuracy`` as
    precisely (balanced thumbs count as ``4 / (1/ups + 1/downs)``, fewer than their
    number when one label is rare); None: ``n_rows``."""

    accuracy: float | None
    thumb_accuracy: float | None
    pair_accuracy: float | None
    n_thumbs: int
    n_pairs: int
    method: str = "held-out"
    effective_rows: float | None = None

    @property
    def n_rows(self) -> int:
        return self.n_thumbs + self.n_pairs

    def lower_bound(self, z: float) -> float | None:
        """The Wilson score lower bound of ``accuracy`` at ``z`` standard errors over
        ``effective_rows`` (None without an accuracy): a scorer no better than chance
        stays under 0.5 however lucky a few rows were."""
        n = self.n_rows if self.effective_rows is None else self.effective_rows
        if self.accuracy is None or n <= 0:
            return None
        p, z2 = self.accuracy, z * z
        centre = p + z2 / (2 * n)
        spread = z * math.sqrt(max(0.0, p * (1 - p) / n + z2 / (4 * n * n)))
        return (centre - spread) / (1 + z2 / n)

    @classmethod
    def of(cls, outcomes: Outcomes, method: str = "held-out") -> ScorerAccuracy:
        thumb_acc, n_t, eff_t = None, 0, 0.0
        if two_sided([label for label, _ in outcomes.thumbs]):
            recalls, counts = [], []
            for label in (True, False):
                hits = [right for lab, right in outcomes.thumbs if lab is label]
                recalls.append(sum(hits) / len(hits))
                counts.append(len(hits))
            thumb_acc, n_t = sum(recalls) / len(recalls), len(outcomes.thumbs)
            # a mean of two recalls varies as p(1-p)/4 * (1/ups + 1/downs)
            eff_t = 4 / sum(1 / c for c in counts)
        pair_acc = sum(outcomes.pairs) / len(outcomes.pairs) if outcomes.pairs else None
        n_p = len(outcomes.pairs)
        overall, effective = None, None
        if n_t or n_p:
            overall = ((thumb_acc or 0.0) * n_t + (pair_acc or 0.0) * n_p) / (n_t + n_p)
            # the overall accuracy weighs the two by their counts; so do their variances
            effective = (n_t + n_p) ** 2 / ((n_t * n_t / eff_t if n_t else 0.0) + n_p)
        return cls(overall, thumb_acc, pair_acc, n_t, n_p, method, effective)

    def to_dict(self) -> dict:
        return asdict(self)


class RewardModel:
    """A trained scorer: :meth:`score` a reply, :meth:`accuracy` on held-out rows."""

    def __init__(self, weight: torch.Tensor, bias: float) -> None:
        self.weight, self.bias = weight, bias

    def _logits(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        if not pairs:
            return torch.zeros(0)
        return _EmbeddedRows([features(p, r) for p, r in pairs]).dot(self.weight) + self.bias

    def score(self, prompt: str, reply: str) -> float:
        """``P(thumbs up)`` for ``reply`` to a user message ``prompt``, in (0, 1)."""
        return self.scores([(prompt, reply)])[0]

    def scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """:meth:`score` of many ``(prompt, reply)`` pairs at once."""
        return torch.sigmoid(self._logits(pairs)).tolist()

    def log_odds(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """The linear score ``s(x, y) + b`` of many pairs: the log-odds of a thumbs-up.
        Differences of it are Bradley-Terry log-odds that users prefer one reply to the
        other, whatever share of the thumbs was up; :meth:`scores` squashes them where
        nearly all thumbs went one way."""
        return self._logits(pairs).tolist()

    def to_reply_scorer(self, accuracy: dict | None = None) -> ReplyScorer:
        """The same scorer in the serving form (its non-zero weights), to save beside an
        adapter."""
        index = torch.nonzero(self.weight).flatten().tolist()
        return ReplyScorer(dict(zip(index, self.weight[index].tolist(), strict=True)),
                           self.bias, accuracy)

    def accuracy(self, kto_rows: Sequence[dict], dpo_rows: Sequence[dict]) -> ScorerAccuracy:
        """Held-out accuracy on TRL rows (thumbs: balanced; pairs: ranking)."""
        return ScorerAccuracy.of(self.outcomes(kto_rows, dpo_rows))

    def outcomes(self, kto_rows: Sequence[dict], dpo_rows: Sequence[dict]) -> Outcomes:
        """Per row: each thumb's (label, predicted right) and each pair's win (1, or
        one half on a tie)."""
        thumbs: list[tuple[bool, bool]] = []
        if kto_rows:
            logits = self._logits([(last_user_text(r["prompt"]), _reply_text(r["completion"]))
                                   for r in kto_rows])
            thumbs = [(bool(r["label"]), (z > 0) == bool(r["label"]))
                      for z, r in zip(logits.tolist(), kto_rows, strict=True)]
        wins: list[float] = []
        if dpo_rows:
            chosen = self._logits([(last_user_text(r["prompt"]), _reply_text(r["chosen"]))
                                   for r in dpo_rows])
            rejected = self._logits([(last_user_text(r["prompt"]), _reply_text(r["rejected"]))
                                     for r in dpo_rows])
            wins = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).tolist()
        return Outcomes(thumbs, wins)


class _EmbeddedRows:
    """Sparse unit-length feature vectors as (index, offset, weight) for ``embedding_bag``."""

    def __init__(self, rows: Sequence[list[int]]) -> None:
        flat = [i for row in rows for i in row]
        self.index = torch.tensor(flat, dtype=torch.long)
        offsets, at = [], 0
        for row in rows:
            offsets.append(at)
            at += len(row)
        self.offsets = torch.tensor(offsets, dtype=torch.long)
        self.values = torch.tensor([1 / math.sqrt(len(row)) for row in rows for _ in row])

    def dot(self, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(self.index, weight.unsqueeze(1), self.offsets, mode="sum",
                               per_sample_weights=self.values).squeeze(1)


def train_reward_model(
    kto_rows: Sequence[dict],
    dpo_rows: Sequence[dict],
    *,
    l2: float = 1e-4,
    steps: int = 300,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> RewardModel:
    """Fit the scorer to TRL thumbs rows and preference rows (see the module doc; thumbs
    count only when :func:`two_sided`).

    With no rows that count, the scorer gives every reply 0.5."""
    torch.manual_seed(seed)
    weight = torch.zeros(DIMENSIONS, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    if not two_sided([bool(r["label"]) for r in kto_rows]):
        kto_rows = []
    if not kto_rows and not dpo_rows:
        return RewardModel(weight.detach(), 0.0)
    thumbs = _EmbeddedRows([features(last_user_text(r["prompt"]), _reply_text(r["completion"]))
                            for r in kto_rows])
    labels = torch.tensor([float(r["label"]) for r in kto_rows])
    n_up = labels.sum()
    n_down = len(kto_rows) - n_up
    # each label class weighs half of the thumbs, whatever its count
    class_weight = torch.where(labels > 0, 0.5 / n_up.clamp(min=1), 0.5 / n_down.clamp(min=1))
    chosen = _EmbeddedRows([features(last_user_text(r["prompt"]), _reply_text(r["chosen"]))
                            for r in dpo_rows])
    rejected = _EmbeddedRows([features(last_user_text(r["prompt"]), _reply_text(r["rejected"]))
                              for r in dpo_rows])
    total = len(kto_rows) + len(dpo_rows)
    optimiser = torch.optim.Adam([weight, bias], lr=learning_rate)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = l2 * weight.square().sum()
        if kto_rows:
            logits = thumbs.dot(weight) + bias
            nll = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            loss = loss + (nll * class_weight).sum() * len(kto_rows) / total
        if dpo_rows:
            margin = chosen.dot(weight) - rejected.dot(weight)
            loss = loss + F.softplus(-margin).mean() * len(dpo_rows) / total
        loss.backward()
        optimiser.step()
    return RewardModel(weight.detach(), float(bias.detach()))


def _prompt_digest(row: dict, salt: str = "") -> bytes:
    """A stable hash of a row's prompt key (``salt`` first), to place rows by prompt."""
    return hashlib.blake2b((salt + prompt_key(row["prompt"])).encode(), digest_size=8).digest()


def _fold_of(row: dict, folds: int) -> int:
    return int.from_bytes(_prompt_digest(row), "big") % folds


def split_halves(kto_rows: Sequence[dict], dpo_rows: Sequence[dict]
                 ) -> tuple[tuple[list[dict], list[dict]], tuple[list[dict], list[dict]]]:
    """The rows in two halves by a hash of their prompt key: ``((kto, dpo) to rank a
    round's own-reply pairs, (kto, dpo) for the gate's scorer)``.

    A round that trains toward replies one scorer ranked must not be judged by a scorer
    fitted to the same rows: the candidate learns that scorer's mistakes (words that
    happened to sit in liked replies) as well as what users asked for, and the same
    scorer then reads its mistakes as gains. On the refreshed pairs the gate promoted 6 of
    11 candidates that the benchmark's judge did not find better (README, "Pairs the model
    can reach"). Two scorers fitted to rows of different prompts share what the feedback
    says and not each other's mistakes."""
    halves: tuple[tuple[list[dict], list[dict]], ...] = (([], []), ([], []))
    for kind, rows in enumerate((kto_rows, dpo_rows)):
        for row in rows:
            halves[_prompt_digest(row, "half:")[0] % 2][kind].append(row)
    return halves[0], halves[1]


def cross_validated_accuracy(kto_rows: Sequence[dict], dpo_rows: Sequence[dict], *,
                             folds: int = 5, seed: int = 0) -> ScorerAccuracy:
    """The scorer's accuracy on every row, each predicted by a scorer trained on the
    other ``folds - 1`` folds. Rows are put in folds by a hash of their prompt key
    (:func:`feedback_store.datasets.prompt_key`), so no fold is predicted by a scorer that
    saw its prompts: the estimate is held out by prompt, as the held-out split is, but
    uses all the rows. That matters when a round has few rows, e.g. edits only."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    kto_folds = [_fold_of(r, folds) for r in kto_rows]
    dpo_folds = [_fold_of(r, folds) for r in dpo_rows]
    outcomes = Outcomes()
    for k in range(folds):
        if k not in kto_folds and k not in dpo_folds:
            continue
        model = train_reward_model(
            [r for r, f in zip(kto_rows, kto_folds, strict=True) if f != k],
            [r for r, f in zip(dpo_rows, dpo_folds, strict=True) if f != k], seed=seed)
        outcomes.extend(model.outcomes(
            [r for r, f in zip(kto_rows, kto_folds, strict=True) if f == k],
            [r for r, f in zip(dpo_rows, dpo_folds, strict=True) if f == k]))
    return ScorerAccuracy.of(outcomes, method="cross-validated")


def serving_scorer(kto_rows: Sequence[dict], dpo_rows: Sequence[dict], *,
                   min_accuracy: float, z: float = 1.96, seed: int = 0,
                   checked: ScorerAccuracy | None = None) -> tuple[ReplyScorer | None, dict]:
    """The scorer the engine ranks a version's sampled replies by, fitted to all of a
    round's rows (training and held-out), and what its check found.

    It is written only when its accuracy cross-validated by prompt over those rows has a
    lower bound (``z`` standard errors) above ``min_accuracy``, the check a round's
    own-reply pairs pass (``TrainConfig.pair_min_accuracy``): a scorer fitted to random
    ratings ranks by a direction of its own, and the served replies would follow it.
    ``checked``: that accuracy when it is already known for these rows (the gate's report
    measures it the same way). Returns ``(scorer or None, {"written", "rows", "accuracy",
    "lower_bound", "reason"})``."""
    if checked is None:
        checked = cross_validated_accuracy(kto_rows, dpo_rows, seed=seed)
    bound = checked.lower_bound(z)
    info = {"rows": checked.n_rows, "accuracy": checked.accuracy, "lower_bound": bound,
            "method": checked.method}
    if bound is None or bound <= min_accuracy:
        seen = "no rows to check it on" if bound is None else (
            f"accuracy {checked.accuracy:.0%} on {checked.n_rows} rows cross-validated by "
            f"prompt, lower bound {bound:.2f}, not above {min_accuracy:.2f}")
        return None, {**info, "written": False, "reason": f"no reply scorer: {seen}"}
    model = train_reward_model(kto_rows, dpo_rows, seed=seed)
    return model.to_reply_scorer(info), {
        **info, "written": True,
        "reason": (f"reply scorer fitted to {len(kto_rows)} thumbs and {len(dpo_rows)} pairs "
                   f"(accuracy {checked.accuracy:.0%} on {checked.n_rows} rows "
                   f"cross-validated by prompt, lower bound {bound:.2f})")}
