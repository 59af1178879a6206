"""How far from the base are the users' edits? Per judge of the alignment benchmark, the
base model's log-likelihood cost of the edit a simulated user makes of a reply it dislikes.

The base samples replies to train prompts (as served: temperature 0.7, top-p 0.95, up to
256 tokens); for each reply a judge dislikes (score < 0.5), the judge's ``improve`` gives
the edited reply. Reported: the base's NLL of the edit minus its NLL of the original,
per token of the edit (nats/token), averaged over up to ``--edits`` edits per judge, and
the share of the edit's tokens that are not in the original reply.

Why it matters: the round's KL budget (0.15 nats/token on sampled replies, the gate's
limit 0.3) bounds how far the adapter may move from the base. An adapter that said the
users' edits would pay about that cost in KL on every reply it changes; when it is
several nats/token, DPO toward the edits reaches the budget long before the replies
change (the ``dpo`` rows of ``on_subject`` and ``detailed`` in the README).

    python benchmarks/bench_edit_cost.py [--model DIR] [--prompts 120] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.judges import JUDGES  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from common import machine_note, model_or_demo, print_table, write_json  # noqa: E402


def _nll(model: Any, tokenizer: Any, messages: list[dict], reply: str) -> tuple[float, int]:
    """The base's summed NLL of ``reply`` (and its end) after the chat ``messages``, and
    its tokens."""
    import torch

    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": reply}], tokenize=False)
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    nll = -logps[torch.arange(len(targets)), targets][start - 1:]
    return nll.sum().item(), len(nll)


def edit_cost(model: Any, tokenizer: Any, messages: list[dict], edit: str,
              original: str) -> float:
    """The base's NLL of ``edit`` minus that of ``original`` after ``messages``, per
    token of the edit (nats/token)."""
    edit_nll, n = _nll(model, tokenizer, messages, edit)
    original_nll, _ = _nll(model, tokenizer, messages, original)
    return (edit_nll - original_nll) / n


def run(args: argparse.Namespace) -> dict[str, Any]:
    import random

    import torch
    from alignment.sim import chat, sample_replies
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    train = [p for group in build_prompt_sets(24).train for p in group]
    prompts = random.Random(args.seed).sample(train, min(args.prompts, len(train)))
    replies = sample_replies(model, tokenizer, prompts, 2, seed=args.seed, max_new_tokens=256)
    results, rows = [], []
    for name, judge in JUDGES.items():
        costs, new_shares = [], []
        for prompt, group in zip(prompts, replies, strict=True):
            for reply in group:
                if len(costs) >= args.edits or judge.score(prompt, reply) >= 0.5:
                    continue
                edit = judge.improve(prompt, reply)
                if edit == reply:
                    continue
                costs.append(edit_cost(model, tokenizer, chat(prompt), edit, reply))
                old = set(reply.lower().split())
                words = edit.lower().split()
                new_shares.append(sum(w not in old for w in words) / max(1, len(words)))
        mean = sum(costs) / len(costs) if costs else float("nan")
        share = sum(new_shares) / len(new_shares) if new_shares else float("nan")
        results.append({"judge": name, "kind": judge.kind, "edits": len(costs),
                        "nll_cost_per_token": mean, "new_word_share": share})
        rows.append([name, judge.kind, len(costs), f"{mean:+.2f}", f"{share:.0%}"])
    print_table(["judge", "kind", "edits", "edit NLL - original, nats/token",
                 "new words in the edit"], rows)
    print(machine_note())
    return {"benchmark": "edit_cost", "setup": {"model": args.model, "prompts": len(prompts),
                                                "samples_per_prompt": 2, "seed": args.seed},
            "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the demo model, built into "
                        "./data when missing)")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--edits", type=int, default=40, help="at most this many per judge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.model = model_or_demo(args.model)
    write_json(args.json, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
