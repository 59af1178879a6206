"""Sample replies the way the chat server does, and measure how far an adapter moved them.

Serving (``chat_app.engine``) renders the prompt with the chat template and the
generation prompt, drops the oldest non-system turns when the prompt exceeds its
token budget, and samples each token from ``softmax(logits / temperature)`` restricted
to the top-``top_p`` nucleus (greedy at temperature 0), ignoring the model's own
``generation_config``; a reply ends at the tokenizer's EOS, any EOS id of the
generation config, or the special token the chat template closes an assistant turn
with. This module repeats those rules (``retrain`` may not import ``chat_app``), so
the gate judges the replies users would see.

KL: ``KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v))`` at each reply token position
(the end-of-turn token included), ``p`` the model with its adapter and ``q`` the base
(adapter disabled); :func:`kl_to_base` returns the sum and the token count so callers
can average over all replies' tokens (nats per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from retrain import modeling

_MARKER = "EVALEOTMARKER"


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a reply, as serving computes them."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list | tuple):
        ids.update(int(i) for i in gen_eos)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template may refuse this shape of chat; EOS ids still stop
        return ids
    if _MARKER in text:
        after = text.split(_MARKER, 1)[1].lstrip()
        best: tuple[int, int] | None = None
        for token_id, added in tokenizer.added_tokens_decoder.items():
            content = str(added)
            if added.special and content and after.startswith(content):
                if best is None or len(content) > best[1]:
                    best = (token_id, len(content))
        if best is not None:
            ids.add(best[0])
    return ids


def encode_prompt(tokenizer: Any, messages: list[dict], budget: int) -> list[int]:
    """Prompt token ids with the generation prompt; over ``budget`` the oldest non-system
    messages go first (the last message always stays, cut from the left if alone)."""
    kept = list(messages)
    while True:
        text = tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if len(ids) <= budget or not droppable:
            return ids[-budget:]
        del kept[droppable[0]]


_NUCLEUS_CANDIDATES = 64


def _nucleus(scores: torch.Tensor, top_p: float, candidates: int = _NUCLEUS_CANDIDATES
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's top-``top_p`` nucleus as ``(token ids, probabilities)`` over its
    ``candidates`` most likely tokens, likeliest first (probabilities 0 outside the
    nucleus), or None when some row's nucleus reaches past them. A token stays while the
    mass ranked above it is below ``top_p``: the nucleus of sorting the whole vocabulary
    and cutting its tail, without that sort at every token."""
    k = min(candidates, scores.shape[-1])
    top, ids = scores.topk(k, dim=-1)
    probs = (top - scores.logsumexp(dim=-1, keepdim=True)).exp()
    above = probs.cumsum(dim=-1) - probs
    if k < scores.shape[-1] and not bool((probs.sum(dim=-1) >= top_p).all()):
        return None
    return ids, probs.masked_fill(above >= top_p, 0.0)


def _draw(logits: torch.Tensor, temperature: float, top_p: float,
          u: torch.Tensor) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)`` cut to the top-``top_p``
    nucleus, by inverse transform of the row's uniform number in ``u`` (shape
    ``(rows, 1)``). The nucleus is always ranked likeliest first (the whole vocabulary
    sorted when the 64 likeliest tokens do not hold it), so a row's token depends on its
    own logits and number, not on which other rows share the batch."""
    scores = logits / temperature
    if top_p < 1.0:
        ids, probs = (_nucleus(scores, top_p)
                      or _nucleus(scores, top_p, candidates=scores.shape[-1]))
    else:
        ids, probs = None, scores.softmax(-1)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(1)


@torch.no_grad()
def sample_replies(
    model: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: set[int],
    seed: int,
    max_rows: int = 64,
) -> list[list[list[int]]]:
    """``n`` replies (token ids, the stop token kept when one ended the reply) to each
    prompt of ``prompts``: ``out[i][j]`` is the ``j``-th reply to prompt ``i``.

    Prompts are sampled together, left-padded, at most ``max_rows`` rows (prompt x
    sample) in one forward pass. The random numbers come from a generator seeded by
    ``seed``, so the same prompts, seed and model give the same replies, and two
    adapters sampled with the same seed share their random numbers."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    rows = [list(p) for p in prompts for _ in range(n)]
    flat: list[list[int]] = []
    for lo in range(0, len(rows), max(1, max_rows)):
        flat += _sample_rows(model, rows[lo:lo + max_rows], temperature=temperature,
                             top_p=top_p, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                             generator=generator)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def prefill(model: Any, rows: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Run the prompts ``rows`` (left-padded into one batch) through ``model`` with a KV
    cache; return its output (the last position's logits only), the attention mask and
    the positions (real tokens counted from 0 in each row)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, device=device)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    return out, mask, positions


def _sample_rows(
    model: Any,
    rows: list[list[int]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: set[int],
    generator: torch.Generator,
) -> list[list[int]]:
    """One reply per row of prompt ids, all rows decoded together (left padding: the
    attention mask hides the pads and positions count real tokens only).

    A row whose reply has ended leaves the batch (and the KV cache), so one long reply
    does not make every finished row run on to its end. The uniform numbers are drawn
    up front, one per row and token, so the ``t``-th token of a row uses the same
    number whatever the other rows' replies are, and two adapters sampled with the same
    seed differ only where their own distributions do."""
    device = next(model.parameters()).device
    out, mask, positions = prefill(model, rows)
    cache = out.past_key_values
    replies: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))  # the rows still decoding, in batch order
    draws = (None if temperature == 0 else
             torch.rand((max_new_tokens, len(rows), 1), generator=generator, device=device))
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if draws is None:
            tokens = logits.argmax(-1)
        else:
            tokens = _draw(logits, temperature, top_p, draws[t, active])
        keep = []
        for place, (row, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            replies[row].append(token)
            if token not in stop_ids:
                keep.append(place)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            active = [active[place] for place in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
    return replies


@torch.no_grad()
def kl_to_base(
    model: Any,
    turns: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    *,
    max_rows: int = 32,
) -> tuple[float, int]:
    """``(sum of per-token KL(model || base), number of tokens)`` over the reply tokens
    of ``turns`` (``(prompt_ids, reply_ids)`` pairs, ``max_rows`` per forward pass);
    ``model`` is a PEFT model whose active adapter is the one measured. The turns go
    through the model shortest first, so each pass pads its rows to a similar length
    (replies sampled from one model vary from a few tokens to hundreds)."""
    turns = sorted(((list(p), list(r)) for p, r in turns if r),
                   key=lambda turn: len(turn[0]) + len(turn[1]))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for lo in range(0, len(turns), max(1, max_rows)):
        chunk = turns[lo:lo + max_rows]
        width = max(len(p) + len(c) for p, c in chunk)
        batch = modeling.collate(chunk, pad_id=pad_id, max_length=width, device=device)
        mask = batch.labels[:, 1:] != modeling.IGNORE_INDEX
        log_p = F.log_softmax(modeling.forward_logits(model, batch)[:, :-1][mask].float(), -1)
        with model.disable_adapter():
            log_q = F.log_softmax(modeling.forward_logits(model, batch)[:, :-1][mask].float(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)
        total, count = total + kl.sum().item(), count + kl.numel()
    return total, count
