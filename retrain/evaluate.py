"""Evaluate an adapter on held-out feedback and canary prompts, and gate its promotion.

Implicit reward (DPO's, also KTO's): ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``
with log-probabilities summed over the completion's tokens, ``pi`` the base + adapter
and ``pi_ref`` the base (the adapter disabled). The bare base therefore has reward 0
everywhere; an adapter's rewards say how far it moved toward or away from each reply.

Canaries are fixed generic prompts. Each is answered greedily by the policy; the
report gives the mean per-token ``KL(pi || pi_ref)`` over the reply tokens (how far
the adapter drifted on ordinary chat) and the share of replies that are empty or
degenerate (:func:`is_degenerate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from retrain import modeling
from retrain.losses import sequence_logps

DEFAULT_CANARY_PROMPTS: list[list[dict]] = [
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
_EPS = 1e-6


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


@dataclass(frozen=True)
class EvalReport:
    """Metrics of one adapter (or of the bare base, where every reward is 0).

    ``pair_accuracy``: share of held-out pairs whose chosen reply gets the higher
    implicit reward (a tie counts one half, so the base scores 0.5); ``pair_margin``:
    mean reward margin chosen - rejected; ``pair_logp_margin``: mean policy log-prob
    margin chosen - rejected (not relative to the base). ``kto_separation``: mean reward
    of desirable minus undesirable held-out thumbs (None unless both are present);
    ``kto_logp_separation`` the same with policy log-probs. ``canary_kl`` in nats per
    token; ``degenerate_share`` in [0, 1]; ``canary_replies`` the decoded replies.
    """

    pair_accuracy: float | None
    pair_margin: float | None
    kto_separation: float | None
    canary_kl: float
    degenerate_share: float
    n_pairs: int
    n_thumbs: int
    n_canary: int
    pair_logp_margin: float | None = None
    kto_logp_separation: float | None = None
    canary_replies: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field (replies as a list)."""
        out = asdict(self)
        out["canary_replies"] = list(self.canary_replies)
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class _Scorer:
    """Completion log-probs under the policy and the reference, in batches."""

    def __init__(
        self, model: Any, tokenizer: Any, has_adapter: bool, batch_size: int, max_length: int
    ) -> None:
        self.model, self.has_adapter, self.batch_size = model, has_adapter, batch_size
        self.pad_id = tokenizer.pad_token_id
        self.max_length = max_length
        self.device = next(model.parameters()).device

    def logps(self, turns: Sequence[modeling.Turn]) -> tuple[list[float], list[float]]:
        """``(policy_logps, reference_logps)``, one per turn; equal without an adapter."""
        policy: list[float] = []
        reference: list[float] = []
        for start in range(0, len(turns), self.batch_size):
            chunk = turns[start : start + self.batch_size]
            batch = modeling.collate(
                [(t.prompt_ids, t.completion_ids) for t in chunk],
                pad_id=self.pad_id,
                max_length=self.max_length,
                device=self.device,
            )
            with torch.no_grad():
                pol = sequence_logps(modeling.forward_logits(self.model, batch), batch.labels)
                if self.has_adapter:
                    with self.model.disable_adapter():
                        ref = sequence_logps(
                            modeling.forward_logits(self.model, batch), batch.labels
                        )
                else:
                    ref = pol
            policy += pol.tolist()
            reference += ref.tolist()
        return policy, reference


def _pair_metrics(
    scorer: _Scorer, pairs: list[modeling.DPOExample], beta: float
) -> tuple[float | None, float | None, float | None]:
    if not pairs:
        return None, None, None
    pol_c, ref_c = scorer.logps([p.chosen for p in pairs])
    pol_r, ref_r = scorer.logps([p.rejected for p in pairs])
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r, strict=True)
    ]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    logp_margin = _mean([c - r for c, r in zip(pol_c, pol_r, strict=True)])
    return _mean(wins), _mean(margins), logp_margin


def _thumb_metrics(
    scorer: _Scorer, thumbs: list[modeling.KTOExample], beta: float
) -> tuple[float | None, float | None]:
    good = [e.turn for e in thumbs if e.desirable]
    bad = [e.turn for e in thumbs if not e.desirable]
    if not good or not bad:
        return None, None
    pol_g, ref_g = scorer.logps(good)
    pol_b, ref_b = scorer.logps(bad)
    reward_g = _mean([beta * (p - r) for p, r in zip(pol_g, ref_g, strict=True)])
    reward_b = _mean([beta * (p - r) for p, r in zip(pol_b, ref_b, strict=True)])
    return reward_g - reward_b, _mean(pol_g) - _mean(pol_b)


def _canaries(
    model: Any, tokenizer: Any, prompts: list[list[dict]], has_adapter: bool, max_new_tokens: int
) -> tuple[float, list[str]]:
    """Greedy replies to ``prompts`` and the mean per-token KL(policy || base) on them:
    ``KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v))`` averaged over all reply tokens."""
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    turns: list[tuple[list[int], list[int]]] = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        reply = out[0, len(prompt_ids) :].tolist()
        if eos_id is not None and eos_id in reply:
            reply = reply[: reply.index(eos_id) + 1]
        turns.append((prompt_ids, reply))
    replies = [tokenizer.decode(reply, skip_special_tokens=True) for _, reply in turns]
    if not has_adapter:
        return 0.0, replies
    total, count = 0.0, 0
    for prompt_ids, reply in turns:
        if not reply:
            continue
        batch = modeling.collate(
            [(prompt_ids, reply)],
            pad_id=pad_id,
            max_length=len(prompt_ids) + len(reply),
            device=device,
        )
        mask = batch.labels[:, 1:] != modeling.IGNORE_INDEX
        with torch.no_grad():
            log_p = F.log_softmax(modeling.forward_logits(model, batch)[:, :-1][mask].float(), -1)
            with model.disable_adapter():
                log_q = F.log_softmax(
                    modeling.forward_logits(model, batch)[:, :-1][mask].float(), -1
                )
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        total += kl.sum().item()
        count += kl.numel()
    return (total / count if count else 0.0), replies


def evaluate_adapter(
    *,
    base_model: str,
    adapter_path: Path | None,
    heldout_kto: list[dict],
    heldout_dpo: list[dict],
    canary_prompts: list[list[dict]],
    beta: float = 0.1,
    max_new_tokens: int = 48,
    seed: int = 0,
    device: str | None = None,
    quantize_4bit: bool | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> EvalReport:
    """Score ``adapter_path`` (None = the bare base) on held-out rows and canaries.

    Rows are TRL conversational rows as for training; canaries are lists of messages
    (:data:`DEFAULT_CANARY_PROMPTS` for a generic set). Replies are greedy, so the
    report is deterministic for a given device (``seed`` fixes the rest). The model
    loads as it is served: 4-bit on CUDA unless ``quantize_4bit`` says otherwise.
    Compare two adapters only on reports from the same rows and canaries.
    """
    problems = []
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        problems.append(f"beta must be a finite number > 0, got {beta!r}")
    for name, value, low in (
        ("max_new_tokens", max_new_tokens, 1),
        ("batch_size", batch_size, 1),
        ("max_length", max_length, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(canary_prompts, list):
        problems.append("canary_prompts must be a list of message lists")
    if problems:
        raise ValueError("invalid evaluation settings: " + "; ".join(problems))
    for i, messages in enumerate(canary_prompts):
        modeling.check_messages(messages, "messages", f"canary prompt {i}")
    torch_device = modeling.resolve_device(device)
    quantize = modeling.resolve_quantize(quantize_4bit, torch_device)
    tokenizer = modeling.load_tokenizer(base_model)
    thumbs = modeling.encode_kto_rows(tokenizer, heldout_kto)
    pairs = modeling.encode_dpo_rows(tokenizer, heldout_dpo)
    torch.manual_seed(seed)
    model = modeling.load_eval_model(
        base_model, adapter_path=adapter_path, device=torch_device, quantize_4bit=quantize
    )
    has_adapter = adapter_path is not None
    scorer = _Scorer(model, tokenizer, has_adapter, batch_size, max_length)
    accuracy, margin, logp_margin = _pair_metrics(scorer, pairs, beta)
    separation, logp_separation = _thumb_metrics(scorer, thumbs, beta)
    canary_kl, replies = _canaries(model, tokenizer, canary_prompts, has_adapter, max_new_tokens)
    degenerate = sum(is_degenerate(r) for r in replies)
    return EvalReport(
        pair_accuracy=accuracy,
        pair_margin=margin,
        kto_separation=separation,
        canary_kl=canary_kl,
        degenerate_share=degenerate / len(replies) if replies else 0.0,
        n_pairs=len(pairs),
        n_thumbs=len(thumbs),
        n_canary=len(replies),
        pair_logp_margin=logp_margin,
        kto_logp_separation=logp_separation,
        canary_replies=tuple(replies),
    )


@dataclass(frozen=True)
class GateConfig:
    """Limits of :func:`gate_decision`.

    Relative (candidate against the active adapter, on the same held-out rows): pair
    accuracy, pair margin and KTO separation may drop by at most the ``max_*_drop``
    margins, the degenerate share may rise by at most ``max_degenerate_increase``.
    Absolute: ``canary_kl <= max_canary_kl`` and ``degenerate_share <=
    max_degenerate_share``. ``max_canary_kl`` is 0.5 nats per token: a LoRA tuned on
    preferences with beta 0.1 usually stays well below 0.1 on ordinary prompts, and at
    0.5 a 48-token reply is already ~24 nats (a factor e^24) away from the base, which
    is a change of character, not of tone.
    """

    max_accuracy_drop: float = 0.0
    max_margin_drop: float = 0.0
    max_separation_drop: float = 0.0
    max_canary_kl: float = 0.5
    max_degenerate_share: float = 0.2
    max_degenerate_increase: float = 0.0

    def validate(self) -> None:
        """Raise one ValueError listing every negative or non-finite limit."""
        bad = [
            f"{name} must be a finite number >= 0, got {value!r}"
            for name, value in asdict(self).items()
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0)
        ]
        if bad:
            raise ValueError("invalid GateConfig: " + "; ".join(bad))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def gate_decision(
    candidate: EvalReport, active: EvalReport | None, config: GateConfig = GateConfig()
) -> tuple[bool, list[str]]:
    """Decide whether ``candidate`` replaces ``active``; return ``(promote, reasons)``.

    ``active`` is the serving adapter's report (the bare base's for a first version);
    ``None`` applies the absolute limits only. A relative check runs only when both
    reports have the metric. ``reasons`` names every failed check, or on promotion is
    one summary line.
    """
    config.validate()
    failures: list[str] = []
    for name in ("pair_accuracy", "pair_margin", "kto_separation", "canary_kl", "degenerate_share"):
        value = getattr(candidate, name)
        if value is not None and not math.isfinite(value):
            failures.append(f"{name} is not a finite number ({value})")
    if failures:
        return False, failures
    if candidate.canary_kl > config.max_canary_kl + _EPS:
        failures.append(
            f"canary KL {candidate.canary_kl:.3f} nats/token exceeds the limit "
            f"{config.max_canary_kl:.3f}"
        )
    if candidate.degenerate_share > config.max_degenerate_share + _EPS:
        failures.append(
            f"degenerate canary replies {candidate.degenerate_share:.2f} exceed "
            f"the limit {config.max_degenerate_share:.2f}"
        )
    if active is not None:
        for name, label, allowed in (
            ("pair_accuracy", "pair accuracy", config.max_accuracy_drop),
            ("pair_margin", "pair reward margin", config.max_margin_drop),
            ("kto_separation", "KTO separation", config.max_separation_drop),
        ):
            new, old = getattr(candidate, name), getattr(active, name)
            if new is not None and old is not None and new < old - allowed - _EPS:
                failures.append(
                    f"{label} fell from {old:.3f} to {new:.3f} (allowed drop {allowed:.3f})"
                )
        rise = candidate.degenerate_share - active.degenerate_share
        if rise > config.max_degenerate_increase + _EPS:
            failures.append(
                f"degenerate canary replies rose from {active.degenerate_share:.2f} "
                f"to {candidate.degenerate_share:.2f}"
            )
    if failures:
        return False, failures

    def versus(name: str) -> str:
        old = getattr(active, name) if active is not None else None
        return f"{_fmt(getattr(candidate, name))} (active {_fmt(old)})"

    summary = (
        f"promote: pair accuracy {versus('pair_accuracy')}, pair margin {versus('pair_margin')}, "
        f"KTO separation {versus('kto_separation')}, "
        f"canary KL {candidate.canary_kl:.3f} <= {config.max_canary_kl:.3f}, "
        f"degenerate {candidate.degenerate_share:.2f} <= {config.max_degenerate_share:.2f}"
    )
    return True, [summary]
