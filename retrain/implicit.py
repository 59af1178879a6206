"""Implicit rewards: how far an adapter moved toward or away from held-out replies.

DPO's (and KTO's) implicit reward is ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``
with log-probabilities summed over the completion's tokens, ``pi`` the base + adapter
and ``pi_ref`` the base (the adapter disabled). The bare base has reward 0 everywhere.

These figures say the optimiser ran, not that replies changed: the gate
(:mod:`retrain.evaluate`) reports them for information and decides on sampled replies.
:func:`implicit_report` measures one adapter folder on held-out rows (training tests use
it); :func:`implicit_metrics` one adapter of a model already loaded (the gate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from retrain import modeling
from retrain.losses import sequence_logps


@dataclass(frozen=True)
class ImplicitReport:
    """``pair_accuracy``: share of held-out pairs whose chosen reply gets the higher
    implicit reward (a tie counts one half, so the base scores 0.5); ``pair_margin``:
    mean reward margin chosen - rejected; ``pair_logp_margin``: mean policy log-prob
    margin chosen - rejected (not relative to the base). ``kto_separation``: mean reward
    of desirable minus undesirable held-out thumbs (None unless both are present);
    ``kto_logp_separation`` the same with policy log-probs."""

    pair_accuracy: float | None
    pair_margin: float | None
    kto_separation: float | None
    n_pairs: int
    n_thumbs: int
    pair_logp_margin: float | None = None
    kto_logp_separation: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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


def implicit_metrics(model: Any, tokenizer: Any, thumbs: list, pairs: list, beta: float,
                     adapter: str | None, batch_size: int, max_length: int
                     ) -> dict[str, float | None]:
    """Implicit-reward metrics of the loaded ``adapter`` of ``model`` (None: the base,
    all neutral) on encoded held-out ``thumbs`` and ``pairs``."""
    if adapter is None:
        return {"pair_accuracy": 0.5 if pairs else None, "pair_margin": 0.0 if pairs else None,
                "kto_separation": 0.0 if thumbs and len({t.desirable for t in thumbs}) == 2
                else None}
    model.set_adapter(adapter)
    scorer = _Scorer(model, tokenizer, True, batch_size, max_length)
    accuracy, margin, _ = _pair_metrics(scorer, pairs, beta)
    separation, _ = _thumb_metrics(scorer, thumbs, beta)
    return {"pair_accuracy": accuracy, "pair_margin": margin, "kto_separation": separation}


def implicit_report(
    *,
    base_model: str,
    adapter_path: Path | None,
    heldout_kto: list[dict],
    heldout_dpo: list[dict],
    beta: float = 0.1,
    device: str | None = None,
    quantize_4bit: bool | None = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> ImplicitReport:
    """Score ``adapter_path`` (None = the bare base) on held-out TRL rows. The model
    loads as served (4-bit on CUDA unless ``quantize_4bit`` says otherwise)."""
    problems = []
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        problems.append(f"beta must be a finite number > 0, got {beta!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an int >= {low}, got {value!r}")
    if problems:
        raise ValueError("invalid evaluation settings: " + "; ".join(problems))
    torch_device = modeling.resolve_device(device)
    quantize = modeling.resolve_quantize(quantize_4bit, torch_device)
    tokenizer = modeling.load_tokenizer(base_model)
    thumbs = modeling.encode_kto_rows(tokenizer, heldout_kto)
    pairs = modeling.encode_dpo_rows(tokenizer, heldout_dpo, max_length=max_length)
    model = modeling.load_eval_model(
        base_model, adapter_path=adapter_path, device=torch_device, quantize_4bit=quantize
    )
    scorer = _Scorer(model, tokenizer, adapter_path is not None, batch_size, max_length)
    accuracy, margin, logp_margin = _pair_metrics(scorer, pairs, beta)
    separation, logp_separation = _thumb_metrics(scorer, thumbs, beta)
    return ImplicitReport(pair_accuracy=accuracy, pair_margin=margin, kto_separation=separation,
                          n_pairs=len(pairs), n_thumbs=len(thumbs),
                          pair_logp_margin=logp_margin, kto_logp_separation=logp_separation)
