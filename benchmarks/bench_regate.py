"""Judge again, with the gate of this checkout, every candidate adapter that a
``bench_alignment.py --work-dir DIR`` run left behind, and set each decision beside the
truth.

For each run folder of ``DIR`` (``<condition>-<judge>``, its SQLite store and adapter
versions) and each version in it, the gate's inputs are rebuilt as the retraining worker
built them (the rows up to the version's ``last_event_id``, split by prompt, edits also
counted as down-votes; the held-out prompts answered; the gate's scorer fitted to the half
of the rows that did not rank the version's own-reply pairs, if it had any),
``evaluate_behaviour`` and
``gate_decision`` run with ``GateConfig`` (defaults, or ``--gate NAME=VALUE``), and the
decision recorded in the version's manifest is shown next to the new one. The prompts
answered later than the version are among the held-out prompts too, so the gate may draw
other prompts than it did in the run.

Truth: the judge's score of 4 sampled replies (as served, up to 256 tokens) to each of the
benchmark's held-out prompts, candidate against its parent (the version serving when it
was trained, or the base), with the rule of ``bench_gate.py``: better means a rise of at
least 0.05 and 2 standard errors, within 0.3 nats/token of the base, without more
degenerate replies. The control run's candidates (random ratings) are never better: the
gate must not promote them. ``--truth-cache FILE`` keeps those samples' scores between
runs (written as they are computed), so two checkouts' gates can be compared on one truth.

    python benchmarks/bench_regate.py --work-dir DIR [--seed N] [--model DIR] [--scorer split|all|heldout] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.judges import JUDGES  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from bench_gate import _truth, truly_better  # noqa: E402
from common import machine_note, model_or_demo, print_table, write_json  # noqa: E402


def _gate_config(items: list[str]) -> Any:
    from dataclasses import fields

    from retrain.gate import GateConfig

    types = {f.name: f.type for f in fields(GateConfig)}
    values: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"--gate: no setting {name!r}")
        values[name] = int(value) if types[name] in ("int", int) else float(value)
    return GateConfig(**values)


_HALF_NOTE = "training rows of the prompts that did not rank the round's own-reply pairs"


def gate_rows(feedback: Any, manifest: dict, scorer: str) -> dict[str, Any]:
    """The gate's inputs for ``--scorer``: ``split`` as the worker builds them, ``all``
    the scorer fitted to every training row, ``heldout`` to the held-out rows alone."""
    from retrain.rows import ranked_own_pairs

    if scorer == "heldout":
        rows = feedback.gate_rows()
        rows["scorer_kto"], rows["scorer_dpo"] = feedback.heldout_kto, feedback.heldout_dpo
        return rows
    return feedback.gate_rows(ranked_pairs=scorer == "split"
                              and ranked_own_pairs(manifest["train_metrics"]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from feedback_store.store import FeedbackStore
    from retrain.evaluate import evaluate_behaviour
    from retrain.gate import gate_decision
    from retrain.rows import round_rows

    torch.set_num_threads(args.threads)
    config = _gate_config(args.gate)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = list(build_prompt_sets(args.heldout, seed=args.seed).heldout)
    cache: dict[str, Any] = {}
    if args.truth_cache and args.truth_cache.exists():
        cache = json.loads(args.truth_cache.read_text())
    results, rows = [], []
    for data in sorted(p for p in args.work_dir.iterdir() if (p / "feedback.db").exists()):
        # the control's ratings are random: its candidates are random-label ones, which
        # no judge prefers and the gate must never promote
        name = data.name.split("-", 1)
        judge = JUDGES[name[1]] if len(name) == 2 else None
        store = FeedbackStore.open(f"sqlite:///{data / 'feedback.db'}")

        def truth(version: str | None, data: Path = data, judge: Any = judge) -> dict:
            key = f"{data.name}/{version}"
            if judge is None:
                return {"score": float("nan"), "kl": float("nan"), "degenerate": 0.0,
                        "scores": []}
            if key not in cache:
                model = AutoModelForCausalLM.from_pretrained(args.model).eval()
                if version is not None:
                    model = PeftModel.from_pretrained(model, str(data / "adapters" / version))
                score, _, kl, degenerate, _, scores = _truth(
                    model.eval(), tokenizer, heldout, judge, [0.0] * len(heldout), 0.0,
                    version is not None)
                cache[key] = {"score": score, "kl": kl, "degenerate": degenerate,
                              "scores": scores}
                if args.truth_cache:
                    args.truth_cache.write_text(json.dumps(cache))
            return cache[key]

        for folder in sorted((data / "adapters").glob("v*")):
            manifest = json.loads((folder / "manifest.json").read_text())
            parent = manifest["parent_version"]
            t0 = time.perf_counter()
            feedback = round_rows(store, manifest["last_event_id"], args.eval_fraction)
            report = evaluate_behaviour(
                base_model=args.model, candidate_path=folder,
                active_path=(data / "adapters" / parent) if parent else None,
                active_label=parent or "base",
                **gate_rows(feedback, manifest, args.scorer),
                config=config,
                beta=manifest["config"]["beta"], device="cpu",
                max_length=manifest["config"]["max_length"])
            decision, reasons = gate_decision(report, config)
            if args.scorer == "heldout":
                reasons = [r.replace(_HALF_NOTE, "held-out rows (never trained on)")
                           for r in reasons]
            gate_s = time.perf_counter() - t0
            cand, act = truth(folder.name), truth(parent)
            rise = cand["score"] - act["score"]
            better = judge is not None and truly_better(
                cand["scores"], act["scores"], cand["kl"], cand["degenerate"],
                act["degenerate"])
            results.append({"run": data.name, "version": folder.name, "parent": parent,
                            "recorded": manifest["gate"]["decision"], "decision": decision,
                            "reasons": reasons, "score_diff": report.score_diff,
                            "score_lower_bound": report.score_lower_bound,
                            "parent_score": act["score"], "score": cand["score"],
                            "rise": rise, "kl": cand["kl"], "truth_better": better,
                            "gate_s": gate_s})
            bound = ("-" if report.score_lower_bound is None
                     else f"{report.score_diff:+.3f} / {report.score_lower_bound:+.3f}")
            rows.append([data.name, folder.name, parent or "base", f"{act['score']:.3f}",
                         f"{cand['score']:.3f}", f"{rise:+.3f}", "better" if better else "not",
                         manifest["gate"]["decision"], decision, bound, f"{gate_s:.0f}"])
            print(f"[{data.name}/{folder.name}] {decision}: {reasons[0][:200]}",
                  file=sys.stderr, flush=True)
    print_table(["run", "version", "parent", "parent score", "score", "rise", "truth",
                 "recorded", "gate now", "diff / bound", "gate s"], rows)
    better = [r for r in results if r["truth_better"]]
    summary = {
        "better_promoted": sum(r["decision"] == "promote" for r in better),
        "better": len(better),
        "others_promoted": sum(r["decision"] == "promote" for r in results
                               if not r["truth_better"]),
        "others": len(results) - len(better),
    }
    print(f"truly better promoted: {summary['better_promoted']} of {summary['better']}; "
          f"others promoted: {summary['others_promoted']} of {summary['others']}")
    print(machine_note())
    return {"gate": vars(config), "scorer": args.scorer, "results": results, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="the --work-dir of a bench_alignment.py run")
    parser.add_argument("--model", help="the run's model folder (default: the demo model, "
                        "built into ./data when missing)")
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0,
                        help="the run's --seed, which drew its held-out prompts (default 0)")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--truth-cache", type=Path)
    parser.add_argument("--scorer", choices=("split", "all", "heldout"), default="split",
                        help="split (as the worker does): after a round that ranked its own "
                             "replies, the gate's scorer fits the other half of the rows; "
                             "all: every training row, as the gate did before; heldout: "
                             "only the held-out rows, which no candidate trained on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.work_dir.is_dir():
        parser.error(f"no folder {args.work_dir}")
    args.model = model_or_demo(args.model)
    write_json(args.json, run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
