"""How much of the best-of-n ceiling the feedback-trained scorer reaches by picking among
the base's own replies to held-out prompts, next to the judge's own pick.

A round's own-reply pairs (:mod:`retrain.onpolicy`) teach the model the scorer's pick of
``pair_samples`` replies on the prompts users asked. This measures that pick where the
training never looks: for the rows a ``bench_alignment.py --work-dir DIR`` run had when
it trained ``--version`` of ``--run``, the scorer is fitted as the round fitted it (the
ranking half of the rows, :func:`retrain.reward_model.split_halves`), the base samples
``--samples`` replies (as served, up to 256 tokens) to each of ``--heldout`` held-out
prompts, and for n = 1, 2, 4, ... the judge scores the mean reply, the scorer's pick of
the first n and the judge's own pick of them (the best-of-n ceiling). If the scorer's
pick is close to the judge's, the scorer is not what holds a round back; what a trained
candidate reaches (``bench_round.py``) against the scorer's pick says how much is lost
in carrying the pick over to prompts the round never saw. ``--candidate`` measures that
directly: the judge's score of 4 replies of the base and of the version ``--version``
itself, on the held-out prompts and on as many of the prompts its round trained on (the
training split's, rated or only asked), the held-out ones split into new questions and
known phrases in question frames no user used, and the judge's score of the reply the
serving scorer (:func:`retrain.reward_model.serving_scorer`, all the round's rows) picks
among the version's 4: what the service sends.

    python benchmarks/bench_selection.py --work-dir DIR --run kto-on_subject --version v0003 \\
        [--heldout 72] [--samples 8] [--candidate] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment import sim  # noqa: E402
from alignment.judges import JUDGES  # noqa: E402
from alignment.measure import prompt_means  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from common import (  # noqa: E402
    add_candidate_args,
    candidate_rows,
    check_candidate_args,
    machine_note,
    model_or_demo,
    write_json,
)


def picks(prompts: list[str], replies: list[list[str]], judge_score, scorer_odds,
          n: int) -> dict[str, float]:
    """Mean judge score over ``prompts`` of: every one of the first ``n`` replies
    (``mean``), the one ``scorer_odds`` rates highest (``scorer``), and the one the judge
    rates highest (``judge``)."""
    totals = {"mean": 0.0, "scorer": 0.0, "judge": 0.0}
    for prompt, group in zip(prompts, replies, strict=True):
        group = group[:n]
        scores = [judge_score(prompt, r) for r in group]
        odds = scorer_odds([(prompt, r) for r in group])
        totals["mean"] += sum(scores) / len(scores)
        totals["scorer"] += scores[max(range(len(group)), key=odds.__getitem__)]
        totals["judge"] += max(scores)
    return {k: v / len(prompts) for k, v in totals.items()}


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from retrain import modeling
    from retrain.reward_model import split_halves, train_reward_model

    torch.set_num_threads(args.threads)
    judge = JUDGES[args.judge or args.run.split("-", 1)[-1]]
    rows = candidate_rows(args)
    ranking, _ = split_halves(rows.kto, rows.dpo)
    scorer = train_reward_model(*ranking, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = modeling.load_eval_model(args.model, adapter_path=None,
                                    device=torch.device("cpu"), quantize_4bit=False)
    prompts = list(build_prompt_sets(args.heldout).heldout)
    replies = sim.sample_replies(base, tokenizer, prompts, args.samples, seed=args.seed,
                                 max_new_tokens=256)
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.samples]
    table = {n: picks(prompts, replies, judge.score, scorer.log_odds, n) for n in sizes}
    floor, top = table[sizes[-1]]["mean"], table[sizes[-1]]["judge"]
    print(f"{args.run} {args.version}: {judge.name} on {len(prompts)} held-out prompts, "
          f"scorer fitted to {len(ranking[0])} thumbs and {len(ranking[1])} pairs")
    print(f"{'n':>3}  {'mean':>6}  {'scorer':>6}  {'judge':>6}  scorer's share of the way")
    for n in sizes:
        row = table[n]
        share = (row["scorer"] - floor) / (top - floor) if top > floor else float("nan")
        print(f"{n:>3}  {row['mean']:6.3f}  {row['scorer']:6.3f}  {row['judge']:6.3f}  "
              f"{share:.2f}")
    print(f"(the share is of the way from the mean reply, {floor:.3f}, to the judge's "
          f"best of {sizes[-1]}, {top:.3f})")
    out = {"run": args.run, "version": args.version, "judge": judge.name,
           "heldout_prompts": len(prompts), "samples": args.samples, "seed": args.seed,
           "scorer_thumbs": len(ranking[0]), "scorer_pairs": len(ranking[1]),
           "picks": {str(n): v for n, v in table.items()}}
    if args.candidate:
        out["transfer"] = transfer(args, base, tokenizer, judge, prompts, rows)
    note = machine_note()
    print(note)
    return {**out, "note": note}


def transfer(args: argparse.Namespace, base, tokenizer, judge, heldout: list[str],
             rows) -> dict[str, dict[str, float]]:
    """The judge's mean score of 4 replies of the base and of the candidate, on prompts
    its round trained on (as many as ``heldout``, drawn at random) and on ``heldout``."""
    import random

    import torch

    from retrain import modeling
    from retrain.reward_model import last_user_text, serving_scorer

    asked = sorted({last_user_text(p) for p in rows.train_asked}
                   | {last_user_text(r["prompt"]) for r in [*rows.kto, *rows.dpo]})
    random.Random(args.seed).shuffle(asked)
    sets = {"trained": asked[:len(heldout)], "heldout": heldout}
    candidate = modeling.load_eval_model(
        args.model, adapter_path=args.work_dir / args.run / "adapters" / args.version,
        device=torch.device("cpu"), quantize_4bit=False)
    scorer, info = serving_scorer([*rows.kto, *rows.heldout_kto], [*rows.dpo, *rows.heldout_dpo],
                                  min_accuracy=0.5)
    out: dict[str, dict[str, float]] = {}
    for name, prompts in sets.items():
        scores, means = {}, {}
        for who, model in (("base", base), ("candidate", candidate)):
            replies = sim.sample_replies(model, tokenizer, prompts, 4, seed=4321,
                                         max_new_tokens=256)
            means[who] = prompt_means(judge, prompts, replies)
            scores[who] = sum(means[who]) / len(prompts)
            if who == "candidate" and scorer is not None:
                # what serving sends: the serving scorer's pick of the 4
                scores["served_pick"] = sum(
                    judge.score(p, group[scorer.best(p, group)])
                    for p, group in zip(prompts, replies, strict=True)) / len(prompts)
        out[name] = {**scores, "prompts": float(len(prompts))}
        pick = (f", the serving scorer's pick of its 4 {scores['served_pick']:.3f}"
                if "served_pick" in scores else "")
        print(f"{name:>8} prompts ({len(prompts)}): base {scores['base']:.3f}, "
              f"{args.version} {scores['candidate']:.3f}, rise "
              f"{scores['candidate'] - scores['base']:+.3f}{pick}")
        if name == "heldout":  # new questions, and known phrases in frames no user used
            for kind in ("question", "framed"):
                idx = [i for i, p in enumerate(prompts) if prompt_kind(p) == kind]
                if idx:
                    b, c = (sum(means[w][i] for i in idx) / len(idx) for w in means)
                    out[f"heldout_{kind}"] = {"base": b, "candidate": c,
                                              "prompts": float(len(idx))}
                    print(f"{'':>10}{kind} ({len(idx)}): base {b:.3f}, {args.version} "
                          f"{c:.3f}, rise {c - b:+.3f}")
    if scorer is None:
        print(info["reason"])
    return out


def prompt_kind(prompt: str) -> str:
    """``question``: a fact's held-out question; ``framed``: one of its subjects or tasks
    in a question frame users never used (:mod:`alignment.prompts`)."""
    from alignment.prompts import normalise

    from chat_app.demo_model.corpus_data import TOPICS

    questions = {normalise(f.questions[-1]) for facts in TOPICS.values() for f in facts
                 if len(f.questions) > 1}
    return "question" if normalise(prompt) in questions else "framed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_candidate_args(parser, run_help="<condition>-<judge> or control")
    parser.add_argument("--judge", choices=sorted(JUDGES),
                        help="the judge (default: the run's; required for control)")
    parser.add_argument("--heldout", type=int, default=72, help="held-out prompts (72)")
    parser.add_argument("--samples", type=int, default=8, help="replies per prompt (8)")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--candidate", action="store_true",
                        help="also judge --version itself on trained and held-out prompts")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.heldout < 1:
        parser.error("--samples and --heldout must be at least 1")
    check_candidate_args(parser, args)
    args.model = model_or_demo(args.model)
    write_json(args.json, {"benchmark": "bench_selection", **run(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
