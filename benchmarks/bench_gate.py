"""Does the promotion gate agree with the truth? A sweep of candidate adapters, each judged
by the gate (which sees only feedback) and by the ground-truth judge (which the gate never
sees), on the demo model.

For each judge (``benchmarks/alignment/judges.py``), simulated users rate the base's
sampled replies to rated prompts (thumbs by the judge with ``--flip`` noise, edits of some
disliked replies by the judge's ``improve``); the rows are split by prompt text into a
training and a held-out part (``feedback_store.datasets.split_of``), as the service does.
Candidates, each a fresh adapter trained in-process from the same rows:

* ``default``: ``TrainConfig()`` as shipped;
* ``second-seed``: the same with another seed (and another draw of the users' noise);
* ``no-op``: a learning rate of 1e-8 (the adapter exists but changes nothing);
* ``collapsed``: learning rate 5e-3, beta 0.1, no NLL term, no KL budget;
* ``random``: the default recipe on random ratings: random thumbs, and edits into another
  reply the model gave to the same prompt (as the alignment benchmark's control users).

Truth: the judge's mean score of 4 sampled replies (up to 256 tokens, as served) to each
held-out prompt (questions no user rated), against the base's on the same prompts;
"better" means a rise of at least 0.05 and 2 standard errors (paired by prompt), with KL
from the base <= 0.3 nats/token and no more degenerate replies than the base plus 0.05.
The gate is ``evaluate_behaviour`` + ``gate_decision`` with the default ``GateConfig``.

Verdicts: ``no-op``, ``collapsed`` and ``random`` must never be promoted, whatever their
score (a random-label round can drift toward a judge by chance: the feedback gave no
evidence of it); ``default`` and ``second-seed`` should be promoted exactly when the
truth says they are better. Agreement is the share of candidates where the gate did what
its verdict asks; "better promoted" the share of truly better recipe candidates promoted.

    python benchmarks/bench_gate.py [--model DIR] [--judges concise,calm] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment import sim  # noqa: E402
from alignment.judges import JUDGES  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from common import machine_note, print_table, write_json  # noqa: E402

CANDIDATES = {
    "default": {},
    "second-seed": {"seed": 1},
    "no-op": {"learning_rate": 1e-8, "kto_learning_rate": 1e-8},
    "collapsed": {"learning_rate": 5e-3, "kto_learning_rate": 5e-3, "beta": 0.1,
                  "sft_weight": 0.0, "kl_budget": None},
    "random": {},
}


def _split(fb: sim.Feedback, eval_fraction: float) -> tuple[sim.Feedback, sim.Feedback]:
    from feedback_store.datasets import split_of

    def side(rows: list[dict], want: str) -> list[dict]:
        return [r for r in rows if split_of(r["prompt"], eval_fraction) == want]

    return (sim.Feedback(side(fb.kto, "train"), side(fb.dpo, "train")),
            sim.Feedback(side(fb.kto, "eval"), side(fb.dpo, "eval")))


def _served_tokens() -> int:
    """The chat server's reply cap, for the users' rated replies and the truth alike: KL
    grows along a reply that drifts, so a shorter cap would read a different KL than users
    get and than the gate measures."""
    from chat_app.engine.params import SamplingParams

    return SamplingParams().max_new_tokens


def _truth(model, tokenizer, prompts, judge, base_scores, base_degenerate, is_peft):
    from retrain.evaluate import is_degenerate

    replies = sim.sample_replies(model, tokenizer, prompts, 4, seed=4321,
                                 max_new_tokens=_served_tokens())
    scores = [sum(judge.score(p, r) for r in g) / len(g) for p, g in zip(prompts, replies, strict=True)]
    mean = sum(a - b for a, b in zip(scores, base_scores, strict=True)) / len(scores)
    flat = [r for g in replies for r in g]
    degenerate = sum(map(is_degenerate, flat)) / len(flat)
    kl = sim.kl_from_base(model, tokenizer, prompts, replies) if is_peft else 0.0
    better = truly_better(scores, base_scores, kl, degenerate, base_degenerate)
    return sum(scores) / len(scores), mean, kl, degenerate, better, scores


def truly_better(scores: list[float], base_scores: list[float], kl: float, degenerate: float,
                 base_degenerate: float) -> bool:
    """The truth's verdict on per-prompt judge ``scores`` against ``base_scores``: a rise
    of at least 0.05 and 2 standard errors (paired by prompt), KL <= 0.3 nats/token, and
    no more than 0.05 more degenerate replies."""
    diffs = [a - b for a, b in zip(scores, base_scores, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1))
    return (mean >= max(0.05, 2 * sd / math.sqrt(len(diffs))) and kl <= 0.3
            and degenerate <= base_degenerate + 0.05)


MUST_NOT_PROMOTE = ("no-op", "collapsed", "random")


def run(args: argparse.Namespace) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.budget import probe_prompts
    from retrain.evaluate import evaluate_behaviour
    from retrain.gate import gate_decision
    from retrain.train import TrainConfig, train_round

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from chat_app.demo_model.build import ensure_demo_model

        model_dir = str(ensure_demo_model(Path("data")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sets = build_prompt_sets(args.heldout)
    heldout = list(sets.heldout)
    rng = random.Random(0)
    asked = [sets.pick_train(rng) for _ in range(args.ratings // 2)]
    replies = sim.sample_replies(base, tokenizer, asked, 2, seed=11,
                                 max_new_tokens=_served_tokens())
    random_edit = sim.edit_into_another_reply(asked, replies)
    work = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    rows, results = [], []
    try:
        for name in args.judges:
            judge = JUDGES[name]
            _, _, _, base_deg, _, base_scores = _truth(base, tokenizer, heldout, judge,
                                                       [0.0] * len(heldout), 0.0, False)
            base_mean = sum(base_scores) / len(base_scores)
            for cand, overrides in CANDIDATES.items():
                t0 = time.perf_counter()
                random_labels = cand == "random"
                fb = sim.rate(asked, replies, judge.score,
                              improve=random_edit if random_labels else judge.improve,
                              random_labels=random_labels, flip=args.flip,
                              seed=1 if cand == "second-seed" else 0)
                train, held = _split(fb, args.eval_fraction)
                out = work / f"{name}-{cand}"
                probes = probe_prompts(held.kto + held.dpo, 16, 0)
                train_round(base_model=model_dir, parent_adapter=None, kto_rows=train.kto,
                            dpo_rows=train.dpo, out_dir=out,
                            config=TrainConfig(device="cpu", **overrides),
                            probe_messages=probes)
                report = evaluate_behaviour(
                    base_model=model_dir, candidate_path=out, active_path=None,
                    train_kto=train.kto, train_dpo=train.dpo, heldout_kto=held.kto,
                    heldout_dpo=held.dpo, device="cpu")
                decision, reasons = gate_decision(report)
                model = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
                score, rise, kl, deg, better, _ = _truth(model, tokenizer, heldout, judge,
                                                         base_scores, base_deg, True)
                must_not = cand in MUST_NOT_PROMOTE
                agree = (decision != "promote") if must_not else (decision == "promote") == better
                seconds = time.perf_counter() - t0
                results.append({"judge": name, "candidate": cand, "base": base_mean,
                                "score": score, "rise": rise, "kl": kl, "degenerate": deg,
                                "truth_better": better, "must_not_promote": must_not,
                                "gate": decision, "agree": agree,
                                "reasons": reasons, "seconds": seconds})
                rows.append([name, cand, f"{base_mean:.3f}", f"{score:.3f}", f"{rise:+.3f}",
                             f"{kl:.3f}", f"{deg:.2f}",
                             "never" if must_not else "better" if better else "not",
                             decision, "yes" if agree else "NO", f"{seconds:.0f}"])
                print(f"[{name}/{cand}] {decision}: {reasons[0][:200]}", file=sys.stderr,
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(["judge", "candidate", "base", "score", "rise", "KL", "degen.", "truth",
                 "gate", "agree", "s"], rows)
    better = [r for r in results if r["truth_better"] and not r["must_not_promote"]]
    bad = [r for r in results if r["must_not_promote"]]
    summary = {
        "agreement": sum(r["agree"] for r in results) / len(results),
        "better_promoted": (sum(r["gate"] == "promote" for r in better) / len(better)
                            if better else None),
        "bad_promoted": sum(r["gate"] == "promote" for r in bad),
        "bad_candidates": len(bad),
    }
    print(f"agreement {summary['agreement']:.0%}; truly better promoted: "
          f"{summary['better_promoted']}; no-op/collapsed/random promoted: "
          f"{summary['bad_promoted']} of {summary['bad_candidates']}")
    print(machine_note())
    return {"results": results, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: the demo model, built "
                        "into ./data when missing)")
    parser.add_argument("--judges", default="concise,calm,on_subject")
    parser.add_argument("--ratings", type=int, default=240)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--flip", type=float, default=0.1)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.judges = [j.strip() for j in args.judges.split(",") if j.strip()]
    unknown = [j for j in args.judges if j not in JUDGES]
    if unknown:
        parser.error(f"unknown judges {unknown}; known: {sorted(JUDGES)}")
    result = run(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
