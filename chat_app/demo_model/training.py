"""The demo model's training loop: chat-templated tokens, loss on the assistant's turns.

One plain torch loop (AdamW, linear warm-up then cosine decay, gradient clipping,
optionally an exponential moving average of the weights), seeded, no framework. Batches are conversations of similar length padded on the right
(a causal model never attends forward, so right padding needs no attention mask; the
pad positions are simply left out of the loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chat_app.demo_model.tokenizer import IM_END, IM_START

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of one chat-templated conversation and its training labels.

    ``labels[i]`` is ``input_ids[i]`` on the assistant's content and the ``<|im_end|>``
    that closes it (so the model learns to stop), and ``IGNORE_INDEX`` elsewhere.
    """

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TrainResult:
    """What a training run reports: the smoothed loss at the end and the work done."""

    final_loss: float
    steps: int
    assistant_tokens: int


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], max_length: int
) -> EncodedConversation:
    """Encode ``messages`` exactly as the ChatML template renders them, truncated to ``max_length``.

    Each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Special tokens split
    the text, so encoding the pieces one by one gives the same ids as encoding the whole
    rendered conversation (a test checks this against ``apply_chat_template``).
    """
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        head = tokenizer.encode(f"{IM_START}{message['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(message["content"], add_special_tokens=False) + [im_end]
        learn = message["role"] == "assistant"
        ids += head + body + newline
        labels += [IGNORE_INDEX] * len(head)
        labels += body if learn else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(newline)
    return EncodedConversation(ids[:max_length], labels[:max_length])


def length_grouped_batches(
    examples: Sequence[EncodedConversation],
    batch_size: int,
    pad_id: int,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids, labels)`` batches forever, one shuffled epoch after another.

    Each epoch: a random order, cut into windows of 16 batches, each window sorted by
    length (so a batch pads little), then the batches of the epoch shuffled again.
    """
    window = batch_size * 16
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].input_ids))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield _pad([examples[i] for i in batches[b]], pad_id)


def _pad(batch: list[EncodedConversation], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
    return ids, labels


def lr_at(step: int, *, steps: int, peak: float, warmup: int, floor: float) -> float:
    """Learning rate at ``step`` (0-based).

    ``peak * (step + 1) / warmup`` during warm-up, then cosine from ``peak`` down to
    ``floor * peak``: ``floor*peak + (1-floor)*peak * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup) / max(1, steps - warmup)``.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor * peak + (1 - floor) * peak * (1 + math.cos(math.pi * t)) / 2


def train_causal_lm(
    model: PreTrainedModel,
    examples: Sequence[EncodedConversation],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    pad_id: int,
    progress: bool,
    ema_decay: float | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` AdamW steps on the assistant tokens of ``examples``.

    The loss is the mean next-token cross-entropy over assistant tokens in the batch.
    Weight decay applies to matrices only (not norms). Gradients are clipped to norm 1.
    ``final_loss`` is the mean loss of the last ``min(20, steps)`` steps.

    With ``ema_decay``, an exponential moving average of the parameters is kept from a
    third of the way in, and the model ends with the averaged weights. When a prompt has
    several right answers, the last few batches otherwise tilt the model towards
    whichever it saw most recently; the average evens that out.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    batches = length_grouped_batches(examples, batch_size, pad_id, generator)
    warmup = max(1, steps // 20)
    recent: list[float] = []
    seen = 0
    ema: list[torch.Tensor] | None = None
    model.train()
    bar = tqdm(total=steps, desc="demo model", unit="step", disable=not progress)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps=steps, peak=lr, warmup=warmup, floor=0.1)
        input_ids, labels = next(batches)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema_decay is not None and step >= steps // 3:
            with torch.no_grad():
                if ema is None:
                    ema = [p.detach().clone() for p in model.parameters()]
                else:
                    for avg, p in zip(ema, model.parameters(), strict=True):
                        avg.lerp_(p.detach(), 1.0 - ema_decay)
        seen += int((labels != IGNORE_INDEX).sum())
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    if ema is not None:
        with torch.no_grad():
            for avg, p in zip(ema, model.parameters(), strict=True):
                p.copy_(avg)
    model.eval()
    return TrainResult(final_loss=sum(recent) / len(recent), steps=steps, assistant_tokens=seen)
