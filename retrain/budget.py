"""The KL budget of a training round, measured on replies the adapter actually samples.

Why sampled replies: a round trains on a few hundred rated replies, and the per-token
KL from the base measured on those very replies (teacher-forced) says little about
what users will see. Measured on this project's demo model, it read 0.25 nats/token
while fresh replies to unseen prompts had moved by 0.007, and 1.2 while they had moved
by 1.9 and were breaking up. So the trainer samples, as serving does, a few replies to
probe prompts that it does not train on when it can (the held-out split's prompts),
and measures

    KL = sum over reply tokens t of sum_v p_t(v) (log p_t(v) - log q_t(v)) / tokens

with ``p`` the model with its adapter and ``q`` the base. The probe prompts are sampled
with the same fixed seed, so successive checks differ by the adapter, not by luck.

:class:`KLProbe` keeps a copy of the trainable (LoRA) weights from the last check
within the budget; when training ends on a check over the budget, that copy is put
back, so the adapter a round saves is never one the probe last saw beyond its budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from retrain import sampling

PROBE_TEMPERATURE = 0.7  # the serving defaults (chat_app/engine/params.py)
PROBE_TOP_P = 0.95


class KLProbe:
    """Sampled-reply KL from the base on ``prompts`` (lists of chat messages)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[list[dict]],
        *,
        budget: float | None,
        samples: int,
        max_new_tokens: int,
        max_prompt_tokens: int,
        seed: int = 0,
    ) -> None:
        self.budget, self.samples, self.max_new_tokens = budget, samples, max_new_tokens
        self.seed = seed
        self.prompt_ids = [
            sampling.encode_prompt(tokenizer, list(messages), max_prompt_tokens)
            for messages in prompts
        ]
        self.stop_ids = sampling.stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.snapshot = [p.detach().clone() for p in self.params]
        self.history: list[float] = []
        self.last_over = False

    def measure(self, model: Any) -> float:
        """Mean per-token KL(adapter || base) over fresh samples, nats per token."""
        was_training = model.training
        model.eval()
        try:
            replies = sampling.sample_replies(
                model,
                self.prompt_ids,
                self.samples,
                temperature=PROBE_TEMPERATURE,
                top_p=PROBE_TOP_P,
                max_new_tokens=self.max_new_tokens,
                stop_ids=self.stop_ids,
                seed=self.seed,
            )
            turns = [(ids, r) for ids, group in zip(self.prompt_ids, replies, strict=True)
                     for r in group]
            total, count = sampling.kl_to_base(model, turns, self.pad_id)
        finally:
            model.train(was_training)
        return total / count if count else 0.0

    def check(self, model: Any) -> tuple[float, bool]:
        """Measure; within budget keep the weights as the new snapshot and return
        ``(kl, False)``; over it return ``(kl, True)`` and leave the weights as they
        are (training may come back within budget: early high-rate steps can overshoot
        and recover). :meth:`restore` puts the last snapshot back."""
        kl = self.measure(model)
        self.history.append(kl)
        self.last_over = not (self.budget is None or (math.isfinite(kl) and kl <= self.budget))
        if not self.last_over:
            with torch.no_grad():
                for saved, p in zip(self.snapshot, self.params, strict=True):
                    saved.copy_(p)
        return kl, self.last_over

    def restore(self) -> bool:
        """Put back the weights of the last check within budget when the last check was
        over it; returns whether it did."""
        if not self.last_over:
            return False
        with torch.no_grad():
            for saved, p in zip(self.snapshot, self.params, strict=True):
                p.copy_(saved)
        self.last_over = False
        return True


def probe_prompts(rows: Sequence[dict], limit: int, seed: int) -> list[list[dict]]:
    """Up to ``limit`` distinct prompts of ``rows`` (TRL rows with a ``prompt`` list of
    messages), in a seeded random order."""
    seen: dict[str, list[dict]] = {}
    for row in rows:
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, list) and prompt:
            seen.setdefault(repr(prompt), prompt)
    prompts = list(seen.values())
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[i] for i in order[:limit]]
