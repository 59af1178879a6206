"""A round trained on pairs of the model's own replies, ranked by the feedback-trained
scorer, against the same round trained on the users' edits (the experiment that led to
``retrain.onpolicy``, the default now; here each step can be varied on its own).

From one candidate that a ``bench_alignment.py --work-dir DIR`` run left (``--run``, e.g.
``dpo-detailed``, and ``--version``), the round's rows are rebuilt as the retraining
worker built them. The gate's scorer (``retrain.reward_model``) is fitted to the training
rows; the base samples ``--samples`` replies (as served, up to 256 tokens) to each prompt
of the round's pairs; the replies the scorer ranks highest and lowest become a pair when
their log-odds differ by more than ``--gap``. A round at the default ``TrainConfig`` but
with ``learning_rate`` ``--rate`` is trained with those pairs in place of the users' pairs
(the thumbs rows as they were), and judged as ``bench_regate.py`` judges (the judge's
score of 4 samples on the 24 held-out prompts, KL from the base). With ``--rate`` 5e-4
(DPO's default) the pairs' effect at the default rate is measured. With
``--keep-cheap NATS`` the users' pairs whose edit costs the base at most ``NATS`` per
token (its NLL of the chosen reply minus that of the rejected one, per token of the
chosen; ``bench_edit_cost.py``) are kept beside the new pairs.

    python benchmarks/bench_onpolicy_pairs.py --work-dir DIR --run dpo-detailed \\
        --version v0002 [--rate 3e-3] [--model DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.judges import JUDGES  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from bench_edit_cost import edit_cost  # noqa: E402
from bench_gate import _truth  # noqa: E402
from common import add_candidate_args, candidate_rows, machine_note, model_or_demo, write_json  # noqa: E402


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from alignment.sim import sample_replies
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.budget import probe_prompts
    from retrain.reward_model import last_user_text, train_reward_model
    from retrain.train import TrainConfig, train_round

    torch.set_num_threads(args.threads)
    judge = JUDGES[args.run.split("-", 1)[1]]
    rows = candidate_rows(args)
    # the pairs are built here, so the trainer's own refresh (the default since) is off
    config = replace(TrainConfig(), learning_rate=args.rate, refresh_pairs=False)
    probes = probe_prompts([*rows.heldout_kto, *rows.heldout_dpo,
                            *({"prompt": p} for p in rows.asked)],
                           config.kl_probe_prompts, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model).eval()
    scorer = train_reward_model(rows.kto, rows.dpo)
    prompts = sorted({last_user_text(r["prompt"]) for r in rows.dpo})
    samples = sample_replies(base, tokenizer, prompts, args.samples, seed=args.seed,
                             max_new_tokens=256)
    pairs, judge_agrees = [], 0
    for prompt, group in zip(prompts, samples, strict=True):
        odds = scorer.log_odds([(prompt, r) for r in group])
        hi = max(range(len(group)), key=odds.__getitem__)
        lo = min(range(len(group)), key=odds.__getitem__)
        if odds[hi] - odds[lo] <= args.gap or group[hi] == group[lo]:
            continue
        judge_agrees += judge.score(prompt, group[hi]) > judge.score(prompt, group[lo])
        pairs.append({"prompt": [{"role": "user", "content": prompt}],
                      "chosen": [{"role": "assistant", "content": group[hi]}],
                      "rejected": [{"role": "assistant", "content": group[lo]}]})
    print(f"{len(rows.kto)} thumbs rows, {len(rows.dpo)} users' pairs on {len(prompts)} "
          f"prompts; {len(pairs)} pairs of the base's replies, the judge agreeing on "
          f"{judge_agrees}", file=sys.stderr, flush=True)
    kept = []
    if args.keep_cheap is not None:
        kept = [r for r in rows.dpo if edit_cost(base, tokenizer, r["prompt"], r["chosen"][0]["content"],
                                   r["rejected"][0]["content"]) <= args.keep_cheap]
        print(f"{len(kept)} of the users' pairs cost at most {args.keep_cheap:g} nats/token: "
              "kept", file=sys.stderr, flush=True)
    heldout = list(build_prompt_sets(24).heldout)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_round(base_model=args.model, parent_adapter=None, kto_rows=rows.kto,
                             dpo_rows=kept + pairs, out_dir=Path(tmp) / "adapter", config=config,
                             probe_messages=probes)
        seconds = time.perf_counter() - t0
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model),
                                          str(Path(tmp) / "adapter")).eval()
        score, _, kl, degenerate, _, _ = _truth(model, tokenizer, heldout, judge,
                                                [0.0] * len(heldout), 0.0, True)
    base_score, *_ = _truth(base, tokenizer, heldout, judge, [0.0] * len(heldout), 0.0, False)
    out = {"run": args.run, "version": args.version, "rate": args.rate,
           "thumbs_rows": len(rows.kto), "users_pairs": len(rows.dpo),
           "own_reply_pairs": len(pairs), "judge_agrees": judge_agrees,
           "keep_cheap": args.keep_cheap, "users_pairs_kept": len(kept),
           "base_score": base_score, "score": score, "kl": kl, "degenerate": degenerate,
           "train_seconds": seconds,
           "train_metrics": {k: v for k, v in result.metrics.items()
                             if k.endswith(("steps", "kl_sampled", "kl_backoffs"))}}
    print(f"{args.run} {args.version}: judge {score:.3f} (base {base_score:.3f}) at KL "
          f"{kl:.3f}, degenerate {degenerate:.0%}; {len(pairs)} pairs of the model's own "
          f"replies and {len(kept)} of the users', DPO rate {args.rate:g}, {seconds:.0f} s")
    print(machine_note())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_candidate_args(parser, run_help="<condition>-<judge>, e.g. dpo-detailed")
    parser.add_argument("--rate", type=float, default=3e-3, help="the DPO phase's rate")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--keep-cheap", type=float, metavar="NATS",
                        help="keep the users' pairs that cost the base at most NATS per token")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (args.work_dir / args.run / "feedback.db").exists():
        parser.error(f"no run {args.run!r} in {args.work_dir}")
    args.model = model_or_demo(args.model)
    write_json(args.json, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
