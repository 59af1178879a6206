"""A group of sequences decoded together: one left-padded KV cache, one forward per step.

Rows have different lengths, so the cache is left-padded to the longest row and a 2-D
attention mask marks the real tokens; each row's rotary position is its own token count.
Rows join (``merge``) and leave (``keep``) between steps; columns that are padding in every
row are cut off when rows leave, so a lone sequence decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class SequenceBatch:
    """A KV cache of ``rows`` sequences (``[rows, heads, columns, dim]`` per layer) and its
    attention mask ``[rows, columns]`` (1 for real tokens)."""

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        mask: torch.Tensor,
        next_tokens: torch.Tensor,
    ) -> None:
        self.cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))
        self.mask = mask
        self.next_tokens = next_tokens  # [rows] the sampled tokens not yet in the cache

    @property
    def keys(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.cache.layers]

    @property
    def values(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.cache.layers]

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens in the cache, per row (also the position of each row's next token)."""
        return self.mask.sum(dim=-1)

    @classmethod
    def prefill(
        cls, forward: Callable[..., Any], prompts: list[list[int]], pad_id: int, device: str
    ) -> tuple[SequenceBatch, torch.Tensor]:
        """Run the prompts (left-padded into one batch) through ``forward`` (the model, or a
        wrapper with the same keywords); return the batch and each row's last logits."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = forward(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        if not bool(mask.all()):
            # Padding columns are never attended to, but zero them so no NaN from a query
            # that saw only padding can leak through a 0 * NaN product later.
            pad = (mask == 0)[:, None, :, None]
            keys = [k.masked_fill(pad, 0) for k in keys]
            values = [v.masked_fill(pad, 0) for v in values]
        empty = torch.zeros(len(prompts), dtype=torch.long, device=device)
        return cls(keys, values, mask, empty), out.logits[:, -1, :]

    def step(self, forward: Callable[..., Any]) -> torch.Tensor:
        """Feed each row's next token through ``forward``; return the logits ``[rows, vocab]``."""
        positions = self.lengths[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        out = forward(
            input_ids=self.next_tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1, :]

    def merge(self, other: SequenceBatch) -> SequenceBatch:
        """A batch holding this batch's rows followed by ``other``'s."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        a, b = self._padded(width), other._padded(width)
        return SequenceBatch(
            keys=[torch.cat(pair, dim=0) for pair in zip(a[0], b[0], strict=True)],
            values=[torch.cat(pair, dim=0) for pair in zip(a[1], b[1], strict=True)],
            mask=torch.cat([a[2], b[2]], dim=0),
            next_tokens=torch.cat([self.next_tokens, other.next_tokens], dim=0),
        )

    def keep(self, rows: list[int]) -> SequenceBatch:
        """A batch of only ``rows``, with columns that are padding in all of them cut off."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.shape[1] - mask.sum(dim=-1)).min())
        return SequenceBatch(
            keys=[k.index_select(0, index)[:, :, start:] for k in self.keys],
            values=[v.index_select(0, index)[:, :, start:] for v in self.values],
            mask=mask[:, start:],
            next_tokens=self.next_tokens.index_select(0, index),
        )

    def _padded(
        self, width: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Keys, values and mask left-padded with zeros to ``width`` columns."""
        extra = width - self.mask.shape[1]
        if extra == 0:
            return self.keys, self.values, self.mask
        return (
            [F.pad(k, (0, 0, extra, 0)) for k in self.keys],
            [F.pad(v, (0, 0, extra, 0)) for v in self.values],
            F.pad(self.mask, (extra, 0)),
        )
