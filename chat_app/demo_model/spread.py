"""How varied a model's sampled replies are: several samples per prompt, counted.

`sample_spread` samples ``n`` replies per prompt (plain ``transformers`` generation on
the CPU, through the chat template); `distinct_replies` counts the different ones and
`reply_style` sorts a reply into a coarse style, so tests and benchmarks can check
that a base model samples a spread for preference learning to reweight.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def sample_spread(
    model_dir: str | Path,
    prompts: Sequence[str],
    n: int = 8,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    max_new_tokens: int = 96,
) -> dict[str, list[str]]:
    """``n`` sampled replies to each prompt (a single user turn), seeded: ``{prompt: replies}``.

    The defaults are the serving defaults (`chat_app.engine.params.SamplingParams`).
    The caller's torch RNG is left as it was.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: dict[str, list[str]] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            ids = enc["input_ids"].repeat(n, 1)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
            )
            new = gen[:, ids.shape[1] :]
            out[prompt] = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def distinct_replies(replies: Sequence[str]) -> int:
    """How many different replies there are (after trimming surrounding whitespace)."""
    return len({r.strip() for r in replies})


def reply_style(reply: str) -> str:
    """A coarse style label: ``list``, ``terse`` (under 8 words), ``exclaiming`` or ``plain``."""
    if re.search(r"^\s*- ", reply, flags=re.MULTILINE):
        return "list"
    if len(reply.split()) < 8:
        return "terse"
    return "exclaiming" if "!" in reply else "plain"
