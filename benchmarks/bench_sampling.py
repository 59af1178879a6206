"""Speed of the trainer's and the gate's sampler (``retrain.sampling.sample_replies``):
finished rows leave the batch, against decoding every row until the batch's longest
reply ends.

The KL probe of every training check (16 prompts x 4 replies), the own-reply pairs of a
round (up to 200 prompts x 4) and the gate (48 prompts x 4, for the candidate and for the
version in service) all sample through it, up to 256 tokens per reply. Most replies of a
chat model end long before the longest of their batch; decoding them on to its end is
work for nothing.

Both ways run here on the same model, adapter, prompts and seed, in the same process, in
alternation (``--repeats`` times each): ``pruned`` is the project's sampler; ``full``
is the same loop (the same random numbers, the same draw of each token) with no row ever
leaving the batch, as it was before. Figures per batch shape:

* s = the median wall time of one call;
* row-steps = the rows fed through the model, summed over decoding steps (the work);
* same replies = the share of replies equal between the two ways (they differ only where
  a different batch size rounds a logit differently and that moves a draw);
* ratio = pruned / full, measured in the same run.

The model is the demo model (``--model`` for another) with a random LoRA adapter, so the
replies are those of a moved model, as in training.

    python benchmarks/bench_sampling.py [--model PATH] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.prompts import build_prompt_sets  # noqa: E402
from common import (  # noqa: E402
    add_common_args,
    check_common_args,
    machine_note,
    model_or_demo,
    print_table,
    save_random_adapter,
    write_json,
)

SHAPES = (("KL probe check", 16), ("gate, one version", 48))
SAMPLES, MAX_NEW_TOKENS, TEMPERATURE, TOP_P = 4, 256, 0.7, 0.95


def _full_rows(model: Any, rows: list[list[int]], *, temperature: float, top_p: float,
               max_new_tokens: int, stop_ids: set[int], generator: Any) -> list[list[int]]:
    """The sampler's loop with every row decoded to the end of the batch's longest reply."""
    import torch

    from retrain.sampling import _draw, prefill

    device = next(model.parameters()).device
    out, mask, positions = prefill(model, rows)
    draws = torch.rand((max_new_tokens, len(rows), 1), generator=generator, device=device)
    replies: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for t in range(max_new_tokens):
        tokens = _draw(out.logits[:, -1].float(), temperature, top_p, draws[t])
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                replies[row].append(token)
                done[row] = token in stop_ids
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return replies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, model_help="model id or path (default: the demo model)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain import sampling

    torch.set_num_threads(args.threads)
    model_path = model_or_demo(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_random_adapter(model_path, Path(tmp) / "adapter", seed=0)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_path), str(adapter)).eval()
        model.to(args.device)
    stops = sampling.stop_token_ids(model, tokenizer)
    heldout = build_prompt_sets(max(n for _, n in SHAPES)).heldout

    counter = [0]  # rows fed through the model in decoding steps (one token each)

    def count(_module: Any, _args: Any, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[1] == 1:
            counter[0] += kwargs["input_ids"].shape[0]

    model.register_forward_pre_hook(count, with_kwargs=True)
    original = sampling._sample_rows

    def run(way: str, prompt_ids: list[list[int]]) -> tuple[float, int, list]:
        counter[0] = 0
        if way == "full":
            sampling._sample_rows = _full_rows
        try:
            start = time.perf_counter()
            replies = sampling.sample_replies(
                model, prompt_ids, SAMPLES, temperature=TEMPERATURE, top_p=TOP_P,
                max_new_tokens=MAX_NEW_TOKENS, stop_ids=stops, seed=0)
            return time.perf_counter() - start, counter[0], replies
        finally:
            sampling._sample_rows = original

    table, results = [], []
    for name, n_prompts in SHAPES:
        prompt_ids = [sampling.encode_prompt(tokenizer, [{"role": "user", "content": p}], 256)
                      for p in heldout[:n_prompts]]
        times: dict[str, list[float]] = {"pruned": [], "full": []}
        work: dict[str, int] = {}
        replies: dict[str, list] = {}
        for _ in range(args.repeats):
            for way in ("full", "pruned"):
                seconds, steps, out = run(way, prompt_ids)
                times[way].append(seconds)
                work[way], replies[way] = steps, out
        flat = {way: [r for group in out for r in group] for way, out in replies.items()}
        same = sum(a == b for a, b in zip(flat["full"], flat["pruned"], strict=True))
        lengths = sorted(len(r) for r in flat["pruned"])
        row = {
            "shape": name, "prompts": n_prompts, "replies": len(lengths),
            "median_tokens": lengths[len(lengths) // 2], "max_tokens": lengths[-1],
            "full_s": statistics.median(times["full"]),
            "pruned_s": statistics.median(times["pruned"]),
            "full_row_steps": work["full"], "pruned_row_steps": work["pruned"],
            "same_replies": same / len(lengths),
        }
        row["ratio_s"] = row["pruned_s"] / row["full_s"]
        row["ratio_row_steps"] = row["pruned_row_steps"] / max(1, row["full_row_steps"])
        results.append(row)
        table.append([name, f"{n_prompts} x {SAMPLES}", row["median_tokens"], row["max_tokens"],
                      row["full_s"], row["pruned_s"], row["ratio_s"], row["full_row_steps"],
                      row["pruned_row_steps"], row["ratio_row_steps"], row["same_replies"]])
    print_table(["batch", "prompts", "median tok", "max tok", "full s", "pruned s", "ratio s",
                 "full row-steps", "pruned row-steps", "ratio", "same replies"], table,
                title=f"sampler, {model_path}, {args.threads} thread(s), {args.device}")
    note = machine_note()
    print(note)
    write_json(args.json, {"benchmark": "bench_sampling", "model": model_path,
                           "threads": args.threads, "device": args.device,
                           "results": results, "note": note})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
