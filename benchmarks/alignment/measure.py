"""What users get from the served model, on held-out prompts.

* ``sample_heldout``: ``k`` replies to each held-out prompt through ``/v1/chat/completions``
  at the service's default sampling (the replies are stored, never rated);
* judge scores: the mean over all replies, and each prompt's mean (``prompt_means``), from
  which ``paired_se`` gives the standard error of a rise over the base on the same
  prompts; best-of-n ceiling: per prompt the judge's favourite of its replies, averaged
  over prompts; spread: distinct replies per prompt;
* degenerate share: :func:`retrain.evaluate.is_degenerate` over all replies;
* ``KLMeter``: the mean per-token ``KL(policy || base) = sum_v p(v) (log p(v) - log q(v))``
  over the reply tokens of the sampled replies, teacher-forced through the base with the
  served adapter (``p``) and with the adapter disabled (``q``), in nats per token; when
  the served version picks the best of ``n`` samples by its reply scorer,
  ``selection_kl`` adds the bound on what the pick adds, ``log n - (n - 1) / n`` nats per
  reply over its tokens.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .judges import Judge
from .service import Service
from .users import FeedbackTally, chat

Samples = list[list[str]]  # replies per held-out prompt


def sample_heldout(service: Service, prompts: Sequence[str], k: int, *,
                   workers: int = 8) -> tuple[Samples, float]:
    """``k`` served replies per prompt, ``workers`` requests in flight; (replies, seconds)."""
    jobs = [(i, j) for i in range(len(prompts)) for j in range(k)]
    out: Samples = [[""] * k for _ in prompts]
    local = threading.local()
    clients = []
    lock = threading.Lock()
    tally = FeedbackTally()

    def one(job: tuple[int, int]) -> None:
        if not hasattr(local, "client"):
            local.client = service.client()
            with lock:
                clients.append(local.client)
        i, j = job
        out[i][j] = chat(local.client, prompts[i], "heldout-eval", tally)[1]

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, jobs))
    finally:
        for c in clients:
            c.close()
    return out, time.perf_counter() - t0


def prompt_means(judge: Judge, prompts: Sequence[str], samples: Samples) -> list[float]:
    """The judge's mean score of each prompt's replies, in the prompts' order."""
    return [sum(judge.score(p, r) for r in group) / len(group)
            for p, group in zip(prompts, samples, strict=True)]


def paired_se(after: Sequence[float], before: Sequence[float]) -> float:
    """Standard error of ``mean(after) - mean(before)`` over prompts, paired by prompt:
    the sample standard deviation of the per-prompt differences over sqrt(prompts).
    It counts the sampling noise of both sides and the spread between prompts; NaN
    with fewer than two prompts."""
    if len(after) != len(before):
        raise ValueError(f"{len(after)} prompts against {len(before)}")
    n = len(after)
    if n < 2:
        return math.nan
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    mean = sum(diffs) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def best_of(judge: Judge, prompts: Sequence[str], samples: Samples) -> float:
    return sum(max(judge.score(p, r) for r in group)
               for p, group in zip(prompts, samples, strict=True)) / len(prompts)


def spread(samples: Samples) -> float:
    return sum(len({r.strip() for r in group}) for group in samples) / len(samples)


def degenerate_share(samples: Samples) -> float:
    from retrain.evaluate import is_degenerate

    flat = [r for group in samples for r in group]
    return sum(is_degenerate(r) for r in flat) / len(flat)


def mean_words(samples: Samples) -> float:
    flat = [r for group in samples for r in group]
    return sum(len(r.split()) for r in flat) / len(flat)


def selection_kl(samples: int, tokens_per_reply: float) -> float:
    """The bound on what picking the best of ``samples`` replies adds to the KL from the
    policy, ``log n - (n - 1) / n`` nats per reply, spread over its tokens (nats/token)."""
    if samples <= 1 or tokens_per_reply <= 0:
        return 0.0
    return (math.log(samples) - (samples - 1) / samples) / tokens_per_reply


class KLMeter:
    """The base model loaded once (float32, CPU) in this process; each adapter on top."""

    def __init__(self, model: str, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.model_path = model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self._load = lambda: AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self._lock = threading.Lock()  # runs at once take turns (one tokenizer, few cores)

    def kl(self, adapter: Path, prompts: Sequence[str], samples: Samples) -> tuple[float, float]:
        """Mean per-token KL(base + ``adapter`` || base) over the replies' tokens, and the
        mean tokens per reply."""
        with self._lock:
            return self._kl(adapter, prompts, samples)

    def _kl(self, adapter: Path, prompts: Sequence[str], samples: Samples
            ) -> tuple[float, float]:
        import torch
        import torch.nn.functional as F
        from peft import PeftModel

        model = PeftModel.from_pretrained(self._load(), str(adapter)).eval()
        total, count, replies = 0.0, 0, 0
        for prompt, group in zip(prompts, samples, strict=True):
            for reply in group:
                replies += 1
                ids, start = self._encode(prompt, reply)
                if len(ids) <= start:
                    continue
                x = torch.tensor([ids])
                with torch.no_grad():
                    lp = F.log_softmax(model(input_ids=x).logits[0, start - 1:-1].float(), -1)
                    with model.disable_adapter():
                        lq = F.log_softmax(model(input_ids=x).logits[0, start - 1:-1].float(), -1)
                total += (lp.exp() * (lp - lq)).sum().item()
                count += len(ids) - start
        if not count:
            return float("nan"), 0.0
        return total / count, count / replies

    def _encode(self, prompt: str, reply: str) -> tuple[list[int], int]:
        """Token ids of prompt + reply as the chat template renders them (up to and with the
        end token), and where the reply starts."""
        messages = [{"role": "user", "content": prompt}]
        head = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": reply}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix")
        head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = self.tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos in tail_ids:  # what the template adds after the end token is never sampled
            tail_ids = tail_ids[: tail_ids.index(eos) + 1]
        return head_ids + tail_ids, len(head_ids)
