"""Simulated users in-process, without a server: sample replies, rate them by a hidden
rule, turn the ratings into the store's KTO/DPO row shapes, and measure behaviour on
held-out prompts. Used by ``bench_gate.py`` and ``tests/test_learning.py``.

Everything runs on a transformers model (with or without a PEFT adapter). The rule is
the ground truth; training only ever sees the thumbs and pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Rule = Callable[[str, str], float]


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def sample_replies(
    model, tokenizer, prompts: Sequence[str], n: int, *, temperature: float = 0.7,
    top_p: float = 0.95, max_new_tokens: int = 64, seed: int = 0,
) -> list[list[str]]:
    """``n`` sampled replies to each prompt (as served: temperature and top-p)."""
    torch.manual_seed(seed)
    out: list[list[str]] = []
    eos = tokenizer.eos_token_id
    for prompt in prompts:
        text = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]] * n,
                           device=model.device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos)
        out.append([tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip()
                    for row in gen])
    return out


def kl_from_base(model, tokenizer, prompts: Sequence[str], replies: Sequence[Sequence[str]]
                 ) -> float:
    """Mean per-token KL(adapter || base) over the tokens of ``replies``, nats/token."""
    total, count = 0.0, 0
    for prompt, group in zip(prompts, replies, strict=True):
        head = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True,
                                             tokenize=False)
        p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        for reply in group:
            r_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id]
            ids = torch.tensor([p_ids + r_ids], device=model.device)
            with torch.no_grad():
                lp = F.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float(), -1)
                with model.disable_adapter():
                    lq = F.log_softmax(
                        model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float(), -1)
            total += (lp.exp() * (lp - lq)).sum().item()
            count += len(r_ids)
    return total / max(1, count)


@dataclass
class Feedback:
    kto: list[dict]
    dpo: list[dict]


def rate(prompts: Sequence[str], replies: Sequence[Sequence[str]], rule: Rule, *,
         improve: Callable[[str, str], str] | None = None, flip: float = 0.1,
         edit_share: float = 0.3, random_labels: bool = False, seed: int = 0) -> Feedback:
    """Thumbs by ``rule`` (up when it scores >= 0.5; each flipped with ``flip``), edits of
    some disliked replies by ``improve`` (edit = chosen, original = rejected)."""
    rng = random.Random(seed)
    kto: list[dict] = []
    dpo: list[dict] = []
    for prompt, group in zip(prompts, replies, strict=True):
        for reply in group:
            up = rule(prompt, reply) >= 0.5
            if random_labels:
                up = rng.random() < 0.5
            elif rng.random() < flip:
                up = not up
            kto.append({"prompt": chat(prompt),
                        "completion": [{"role": "assistant", "content": reply}], "label": up})
            if not up and improve is not None and rng.random() < edit_share:
                better = improve(prompt, reply)
                if better and better != reply:
                    dpo.append({"prompt": chat(prompt),
                                "chosen": [{"role": "assistant", "content": better}],
                                "rejected": [{"role": "assistant", "content": reply}]})
    return Feedback(kto, dpo)


def edit_into_another_reply(prompts: Sequence[str], replies: Sequence[Sequence[str]]
                            ) -> Callable[[str, str], str]:
    """An ``improve`` for users who follow no rule: a reply is "edited" into another reply
    the model gave to the same prompt (as the alignment benchmark's control users do), so
    the pairs carry no direction a judge would reward."""
    pool: dict[str, list[str]] = {}
    for prompt, group in zip(prompts, replies, strict=True):
        pool.setdefault(prompt, []).extend(group)

    def edit(prompt: str, reply: str) -> str:
        return next((other for other in pool.get(prompt, ()) if other != reply), reply)

    return edit


def mean_score(prompts: Sequence[str], replies: Sequence[Sequence[str]], rule: Rule) -> float:
    scores = [rule(p, r) for p, group in zip(prompts, replies, strict=True) for r in group]
    return sum(scores) / len(scores)


def best_of(prompts: Sequence[str], replies: Sequence[Sequence[str]], rule: Rule) -> float:
    return sum(max(rule(p, r) for r in group)
               for p, group in zip(prompts, replies, strict=True)) / len(prompts)
