"""The evaluation gate's measurements: does a candidate adapter give better replies than
the active one?

:func:`evaluate_behaviour` samples replies from the candidate and from the active
version on held-out prompts (and a few fixed generic prompts) as the chat server
would, scores them with a reward model trained on the training split's feedback
(:mod:`retrain.reward_model`), and measures KL from the base and degenerate replies
(:func:`is_degenerate`); :func:`retrain.gate.gate_decision` turns that into promote /
hold / reject with reasons. The implicit rewards of both versions on the held-out rows
(:mod:`retrain.implicit`) are reported for information only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from feedback_store.datasets import prompt_key
from retrain import modeling
from retrain.gate import GateConfig
from retrain.implicit import implicit_metrics
from retrain.reward_model import (
    ScorerAccuracy,
    cross_validated_accuracy,
    last_user_text,
    train_reward_model,
)
from retrain.sampling import encode_prompt, kl_to_base, sample_replies, stop_token_ids

FIXED_PROMPTS: list[list[dict]] = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three short tips for sleeping better."}],
    [{"role": "user", "content": "Explain in one sentence what a computer program is."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a polite two-line reply declining a meeting."},
    ],
    [{"role": "user", "content": "What is 12 times 7?"}],
]

DEGENERATE_THRESHOLD = 0.5


def repeated_ngram_fraction(units: Sequence[str], n: int) -> float:
    """Share of the ``n``-grams of ``units`` that repeat an earlier one:
    ``1 - distinct / total``; 0.0 when there are fewer than ``n`` units."""
    total = len(units) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(units[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


def is_degenerate(text: str, *, threshold: float = DEGENERATE_THRESHOLD) -> bool:
    """True when ``text`` is empty/blank, or more than ``threshold`` of its word
    trigrams (lower-cased) or of its character 8-grams (whitespace removed, which
    catches replies with no spaces such as ``"!!!!!!!!"``) repeat earlier ones.

    Ordinary prose repeats few trigrams (well under 0.2); loops such as
    ``"the the the ..."`` or a sentence said five times score above 0.5.
    """
    if not text.strip():
        return True
    words = text.lower().split()
    chars = list("".join(words))
    score = max(repeated_ngram_fraction(words, 3), repeated_ngram_fraction(chars, 8))
    return score > threshold


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class BehaviourReport:
    """What :func:`evaluate_behaviour` saw, candidate against the active version.

    Rows and prompts: ``n_heldout_thumbs`` / ``n_heldout_pairs`` held-out rows,
    ``n_heldout_prompts`` distinct held-out prompts (of those rows, and answered but never
    rated) of which ``n_prompts`` were sampled
    (``samples_per_prompt`` replies each, plus ``n_fixed`` fixed generic prompts used
    for KL and degeneration only). ``scorer``: the feedback-trained scorer's held-out
    accuracy. Scores are the mean log-odds of a thumbs-up by that scorer
    (:meth:`retrain.reward_model.RewardModel.log_odds`); ``score_diff`` the mean
    over prompts of (candidate - active), ``score_lower_bound`` that minus
    ``improvement_z`` standard errors (None under two prompts). ``kl`` / ``active_kl``
    nats per token from the base. ``implicit`` holds the implicit-reward metrics of
    :func:`retrain.implicit.implicit_metrics` on the held-out rows (``active/`` keys for the active version),
    for information only. ``samples`` maps prompt text to one candidate and one active
    reply, for people to read. ``changed_share``: the share of held-out sampled replies
    that differ from the active's drawn with the same seed (None without held-out prompts).
    ``scorer_half``: the scorer was fitted to the half of the ``n_train_rows`` training
    rows that did not rank the round's own-reply pairs.
    """

    active_label: str
    n_heldout_thumbs: int
    n_heldout_pairs: int
    n_heldout_prompts: int
    n_prompts: int
    samples_per_prompt: int
    n_fixed: int
    scorer: ScorerAccuracy
    n_train_rows: int
    candidate_score: float | None
    active_score: float | None
    score_diff: float | None
    score_lower_bound: float | None
    confidence_z: float
    kl: float
    active_kl: float
    degenerate_share: float
    active_degenerate_share: float
    implicit: dict[str, float | None]
    samples: tuple[tuple[str, str, str], ...] = ()
    changed_share: float | None = None
    scorer_half: bool = False
    improvement_z: float = 1.645

    @property
    def n_heldout_rows(self) -> int:
        return self.n_heldout_thumbs + self.n_heldout_pairs

    def metrics(self) -> dict[str, Any]:
        """A flat JSON-ready dict: the run's and the version's gate metrics."""
        out: dict[str, Any] = {
            **self.implicit,
            "scorer_accuracy": self.scorer.accuracy,
            "scorer_thumb_accuracy": self.scorer.thumb_accuracy,
            "scorer_pair_accuracy": self.scorer.pair_accuracy,
            "scorer_rows": self.scorer.n_rows,
            "scorer_accuracy_lower_bound": self.scorer.lower_bound(self.confidence_z),
            "score": self.candidate_score, "active/score": self.active_score,
            "score_diff": self.score_diff, "score_lower_bound": self.score_lower_bound,
            "changed_share": self.changed_share,
            "kl": self.kl, "active/kl": self.active_kl,
            "degenerate_share": self.degenerate_share,
            "active/degenerate_share": self.active_degenerate_share,
            "heldout_thumbs": self.n_heldout_thumbs, "heldout_pairs": self.n_heldout_pairs,
            "heldout_prompts": self.n_heldout_prompts, "sampled_prompts": self.n_prompts,
            "samples_per_prompt": self.samples_per_prompt, "train_rows_scorer": self.n_train_rows,
            "scorer_half": self.scorer_half,
        }
        return out

    def to_dict(self) -> dict:
        """Every field, JSON-ready (for the manifest)."""
        out = asdict(self)
        out["samples"] = [list(s) for s in self.samples]
        return out


def _heldout_prompts(kto: Sequence[dict], dpo: Sequence[dict], cap: int,
                     asked: Sequence[list[dict]] = ()) -> tuple[list[list[dict]], int]:
    """Distinct held-out prompts (by :func:`prompt_key`): those of the held-out rows and
    the ``asked`` ones (held-out prompts answered but not rated); at most ``cap`` of them
    chosen by a hash of the key (not by age), and how many distinct ones there were."""
    first: dict[str, list[dict]] = {}
    for prompt in [*(row["prompt"] for row in [*kto, *dpo]), *asked]:
        first.setdefault(prompt_key(prompt), prompt)
    order = sorted(first, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    return [first[k] for k in order[:cap]], len(first)


def evaluate_behaviour(
    *,
    base_model: str,
    candidate_path: Path,
    active_path: Path | None,
    train_kto: list[dict],
    train_dpo: list[dict],
    heldout_kto: list[dict],
    heldout_dpo: list[dict],
    asked_prompts: Sequence[list[dict]] = (),
    scorer_kto: list[dict] | None = None,
    scorer_dpo: list[dict] | None = None,
    config: GateConfig = GateConfig(),
    fixed_prompts: list[list[dict]] = FIXED_PROMPTS,
    beta: float = 0.1,
    device: str | None = None,
    quantize_4bit: bool | None = None,
    max_input_tokens: int = 2048,
    batch_size: int = 8,
    max_length: int = 512,
    active_label: str | None = None,
) -> BehaviourReport:
    """Compare the adapter in ``candidate_path`` with ``active_path`` (None: the bare base)
    on held-out prompts, as the chat server would answer them.

    1. A reward model is trained on ``train_kto`` / ``train_dpo``
       (:func:`retrain.reward_model.train_reward_model`), or on ``scorer_kto`` /
       ``scorer_dpo`` when given: the half of the training rows that did not rank the
       round's own-reply pairs (:meth:`retrain.rows.RoundRows.gate_rows`). Its accuracy is measured by
       cross-validation over all the rows, training and held-out, in folds by prompt
       (:func:`retrain.reward_model.cross_validated_accuracy`): each row predicted by a
       scorer trained on the rows of other prompts, as the held-out split would be, on
       five times the rows (thumbs of one label do not count).
    2. The model loads as served (4-bit NF4 on CUDA unless ``quantize_4bit`` says
       otherwise; prompts cut to ``max_input_tokens`` by dropping the oldest turns),
       with both adapters side by side. Each distinct held-out prompt, of the held-out
       rows or ``asked_prompts`` (held-out prompts answered but never rated; at most
       ``config.max_prompts`` in all), and each fixed prompt gets ``config.samples_per_prompt``
       sampled replies from each version, with the same seed per prompt for both.
    3. Held-out replies are scored in log-odds of a thumbs-up (not probabilities: when
       nearly every thumb went one way, the probabilities
       all sit in one flat tail of the sigmoid and a real gain reads as +0.002); per
       prompt ``d_i = mean candidate score - mean active score``; ``score_diff =
       mean(d)``, ``score_lower_bound = mean(d) - z * sd(d) / sqrt(n)`` (normal
       approximation, ``z = config.confidence_z``, sd with n - 1). KL and degenerate
       shares cover all sampled replies (held-out + fixed).
    """
    config.validate()
    for i, messages in enumerate(fixed_prompts):
        modeling.check_messages(messages, "messages", f"fixed prompt {i}")
    torch_device = modeling.resolve_device(device)
    quantize = modeling.resolve_quantize(quantize_4bit, torch_device)
    tokenizer = modeling.load_tokenizer(base_model)
    thumbs = modeling.encode_kto_rows(tokenizer, heldout_kto)
    pairs = modeling.encode_dpo_rows(tokenizer, heldout_dpo, max_length=max_length)
    own_half = scorer_kto is not None or scorer_dpo is not None
    scorer_rows = ((scorer_kto or [], scorer_dpo or []) if own_half else (train_kto, train_dpo))
    reward_model = train_reward_model(*scorer_rows, seed=config.seed)
    # every row checked by a scorer that never saw its prompt, not the held-out split
    # alone: on the held-out fifth, random ratings read up to 59% and a thumbs rule 58%
    # (README, "Does the loop make the model better?")
    scorer_acc = cross_validated_accuracy([*train_kto, *heldout_kto],
                                          [*train_dpo, *heldout_dpo], seed=config.seed)
    prompts, n_distinct = _heldout_prompts(heldout_kto, heldout_dpo, config.max_prompts,
                                           asked_prompts)

    model = modeling.load_eval_model(base_model, adapter_path=candidate_path,
                                     device=torch_device, quantize_4bit=quantize)
    if active_path is not None:
        model.load_adapter(str(active_path), adapter_name="active")
    model.requires_grad_(False)  # set_adapter would otherwise mark an adapter trainable
    stops = stop_token_ids(model, tokenizer)
    implicit = implicit_metrics(model, tokenizer, thumbs, pairs, beta, "default", batch_size,
                                max_length)
    active_implicit = implicit_metrics(model, tokenizer, thumbs, pairs, beta,
                                "active" if active_path is not None else None, batch_size,
                                max_length)

    everything = [*prompts, *fixed_prompts]
    prompt_ids = [encode_prompt(tokenizer, messages, max_input_tokens) for messages in everything]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def replies_of(adapter: str | None) -> tuple[list[list[str]], float, int]:
        """Every prompt's replies from ``adapter`` (None: the base), the same seed for
        both versions; and the KL sum and token count from the base."""
        kwargs = dict(temperature=config.temperature, top_p=config.top_p,
                      max_new_tokens=config.max_new_tokens, stop_ids=stops,
                      seed=config.seed * 1_000_003)
        if adapter is None:
            with model.disable_adapter():
                out = sample_replies(model, prompt_ids, config.samples_per_prompt, **kwargs)
            kl, count = 0.0, 0
        else:
            model.set_adapter(adapter)
            out = sample_replies(model, prompt_ids, config.samples_per_prompt, **kwargs)
            kl, count = kl_to_base(model, [(ids, r) for ids, group in zip(prompt_ids, out,
                                                                           strict=True)
                                           for r in group], pad_id)
        texts = [[tokenizer.decode(r, skip_special_tokens=True).strip() for r in group]
                 for group in out]
        return texts, kl, count

    cand_all, cand_kl, cand_n = replies_of("default")
    act_all, act_kl, act_n = replies_of("active" if active_path is not None else None)
    diffs: list[float] = []
    cand_scores: list[float] = []
    act_scores: list[float] = []
    samples = []
    changed = [c != a for cand, act in zip(cand_all[:len(prompts)], act_all[:len(prompts)],
                                          strict=True) for c, a in zip(cand, act, strict=True)]
    for messages, cand, act in zip(prompts, cand_all, act_all, strict=False):
        user = last_user_text(messages)
        c = _mean(reward_model.log_odds([(user, r) for r in cand]))
        a = _mean(reward_model.log_odds([(user, r) for r in act]))
        cand_scores.append(c)
        act_scores.append(a)
        diffs.append(c - a)
        samples.append((user, cand[0], act[0]))
    texts = {"cand": [r for g in cand_all for r in g], "act": [r for g in act_all for r in g]}
    kl = {"cand": [cand_kl, cand_n], "act": [act_kl, act_n]}

    diff = _mean(diffs) if diffs else None
    lower = None
    if len(diffs) >= 2 and diff is not None:
        sd = math.sqrt(sum((d - diff) ** 2 for d in diffs) / (len(diffs) - 1))
        lower = diff - config.improvement_z * sd / math.sqrt(len(diffs))

    def share(replies: list[str]) -> float:
        return sum(is_degenerate(r) for r in replies) / len(replies) if replies else 0.0

    return BehaviourReport(
        active_label=active_label or ("active" if active_path is not None else "base"),
        n_heldout_thumbs=len(heldout_kto),
        n_heldout_pairs=len(heldout_dpo),
        n_heldout_prompts=n_distinct,
        n_prompts=len(prompts),
        samples_per_prompt=config.samples_per_prompt,
        n_fixed=len(fixed_prompts),
        scorer=scorer_acc,
        n_train_rows=len(scorer_rows[0]) + len(scorer_rows[1]),
        scorer_half=own_half,
        candidate_score=_mean(cand_scores) if cand_scores else None,
        active_score=_mean(act_scores) if act_scores else None,
        score_diff=diff,
        score_lower_bound=lower,
        confidence_z=config.confidence_z,
        improvement_z=config.improvement_z,
        kl=kl["cand"][0] / kl["cand"][1] if kl["cand"][1] else 0.0,
        active_kl=kl["act"][0] / kl["act"][1] if kl["act"][1] else 0.0,
        degenerate_share=share(texts["cand"]),
        active_degenerate_share=share(texts["act"]),
        implicit={**implicit, **{f"active/{k}": v for k, v in active_implicit.items()}},
        samples=tuple(samples),
        changed_share=sum(changed) / len(changed) if changed else None,
    )
