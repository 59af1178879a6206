"""What users get: does feedback from simulated users move the served model toward what they
like, how far from the base does it move, and what does a round cost in wall time.

The real service runs as ``feedback-chat serve`` (a subprocess, its own fresh data folder and
SQLite database per run, no adapter at the start, the schedule off) over the demo model
(built once into ``--data-dir`` when no ``--model`` is named). Simulated users (``--users``
threads, ``httpx``) ask the *train* prompts through ``POST /v1/chat/completions`` at the
service's default sampling and judge each reply with a ground-truth judge
(``benchmarks/alignment/judges.py``: concise, calm, on_subject and detailed, fixed in advance;
listed and no_filler, added later to check judges the defaults were not chosen on; never seen
by the training). What they send depends on the condition:

* ``kto``: thumbs only (up when the judge scores >= 0.5, each flipped with ``--flip``);
* ``dpo``: pairs only: edits of disliked replies (``--edit-share`` of them, the judge's
  ``improve``) and regenerate + pick by the judge (``--regen-share`` of the replies);
* ``both``: thumbs, edits and picks;
* ``control``: random thumbs, random edits (another reply to the same prompt) and random
  picks; it does not depend on the judge, so it runs once and is scored by every judge.

A round: ``--ratings`` replies judged, then ``feedback-chat retrain --now`` (as an operator
starts one) and its gate decision, then ``/healthz`` polled until the new version serves
when it was promoted. Measured after each round on the SERVED model, on held-out prompts
(``benchmarks/alignment/prompts.py``: paraphrases and question frames no user ever rated),
``--samples`` replies per prompt through the API:

* score: the judge's mean score; ceiling: the base's best-of-``--base-samples`` (per prompt
  the judge's favourite of the base's samples, averaged), measured in the same run; share
  of way: (score - base) / (ceiling - base), and beside it its standard error (the rise's
  over the base paired by held-out prompt, over the same gap): the noise of 24 prompts;
* KL: mean per-token KL(policy || base) over the sampled replies' tokens, teacher-forced in
  this process through the base + served adapter and the base with the adapter disabled;
* degenerate: share of replies ``retrain.evaluate.is_degenerate`` flags; words: mean length;
* decision and reasons of the gate (the run row), and wall times: users, retrain, retrain end
  to serving, and last feedback to serving (what a user waits for the round to show).

Round 0 is the base, measured once per run (``--base-samples`` per prompt; also the base's
spread: distinct replies per prompt). A rejected round leaves the previous version serving;
its figures are that version's (not re-sampled).

    python benchmarks/bench_alignment.py                 # full: 3 judges, 4 conditions
    python benchmarks/bench_alignment.py --quick         # concise; both + control
    python benchmarks/bench_alignment.py --judges calm --conditions kto,control --rounds 2 \\
        --ratings 120 --train learning_rate=1e-4 --train beta=0.2 --json out.json

``--train NAME=VALUE`` / ``--gate NAME=VALUE`` set FEEDBACK_CHAT_TRAIN_<NAME> /
FEEDBACK_CHAT_GATE_<NAME> for the service and its rounds (those already in the environment
pass through too). Cost: the rounds dominate (each trains, then the gate samples the
candidate and the active version); the full run is 10 runs x ``--rounds`` rounds (the
control is shared by the judges), the quick one 2 x 3. ``--jobs`` runs go at once (2 by
default), each service and its rounds on cores / jobs torch threads: small models use a
second core poorly (a LoRA step of the demo model: 156 ms on 2 threads, 272 ms on 1),
so two runs side by side finish sooner than one after the other. The progress lines on stderr give
the time spent and an estimate of what is left. The plot (matplotlib, two panels per judge) goes to ``--plot``, by
default next to ``--json`` or to ``benchmarks/results/alignment.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.judges import JUDGES  # noqa: E402
from alignment.measure import (  # noqa: E402
    KLMeter,
    best_of,
    degenerate_share,
    mean_words,
    paired_se,
    prompt_means,
    sample_heldout,
    selection_kl,
    spread,
)
from alignment.prompts import build_prompt_sets  # noqa: E402
from alignment.report import plot, print_report, share_of_way  # noqa: E402
from alignment.service import Service  # noqa: E402
from alignment.users import CONDITIONS, UserConfig, run_users  # noqa: E402
from common import ROOT, machine_note, write_json  # noqa: E402

from feedback_store.reply_scorer import SCORER_FILE  # noqa: E402

FULL = {"judges": "concise,calm,on_subject", "conditions": "kto,dpo,both,control", "rounds": 3,
        "ratings": 200, "heldout": 24, "samples": 4}
QUICK = {"judges": "concise", "conditions": "both,control", "rounds": 3, "ratings": 200,
         "heldout": 16, "samples": 4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true",
                   help=f"small run: {QUICK['judges']}; {QUICK['conditions']}; "
                        f"{QUICK['ratings']} ratings, {QUICK['heldout']} held-out prompts")
    p.add_argument("--judges", help=f"comma list of {','.join(JUDGES)} "
                                    f"(default {FULL['judges']})")
    p.add_argument("--conditions", help=f"comma list of {','.join(CONDITIONS)} "
                                        f"(default {FULL['conditions']})")
    p.add_argument("--rounds", type=int, help=f"rounds per run (default {FULL['rounds']})")
    p.add_argument("--ratings", type=int,
                   help=f"replies judged per round (default {FULL['ratings']})")
    p.add_argument("--heldout", type=int,
                   help=f"held-out prompts (default {FULL['heldout']})")
    p.add_argument("--samples", type=int,
                   help=f"served samples per held-out prompt per round (default "
                        f"{FULL['samples']})")
    p.add_argument("--base-samples", type=int, default=8,
                   help="samples per prompt of the base, for the ceiling and spread (8)")
    p.add_argument("--users", type=int, default=8, help="concurrent simulated users (8)")
    p.add_argument("--flip", type=float, default=0.1, help="chance a user's verdict flips")
    p.add_argument("--edit-share", type=float, default=0.3, help="share of dislikes edited")
    p.add_argument("--regen-share", type=float, default=0.15,
                   help="share of replies regenerated and compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model folder or hub id (default: the demo model)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="where the demo model is kept (built there when missing; default data)")
    p.add_argument("--work-dir", type=Path,
                   help="keep each run's data folder (database, adapters, logs) here "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--device", help="the service's --device (default: its own choice)")
    p.add_argument("--train", action="append", default=[], metavar="NAME=VALUE",
                   help="a training setting (FEEDBACK_CHAT_TRAIN_NAME), repeatable")
    p.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help="a gate setting (FEEDBACK_CHAT_GATE_NAME), repeatable")
    p.add_argument("--rerank-samples", type=int,
                   help="the service's rerank_samples (default: its own, 4; 1: every reply "
                        "is the one sampled, never the scorer's pick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the KL pass")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at once, each service and its rounds on CPU cores / jobs torch "
                        "threads (2; 1 runs them one after another with every core each)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--plot", type=Path, help="the PNG (default: next to --json, or "
                                             "benchmarks/results/alignment.png)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.judges = [j.strip() for j in str(args.judges).split(",") if j.strip()]
    args.conditions = [c.strip() for c in str(args.conditions).split(",") if c.strip()]
    problems = [f"unknown judge {j!r}" for j in args.judges if j not in JUDGES]
    problems += [f"unknown condition {c!r}" for c in args.conditions if c not in CONDITIONS]
    if not args.judges or not args.conditions:
        problems.append("name at least one judge and one condition")
    for name in ("rounds", "ratings", "heldout", "samples", "base_samples", "users", "threads",
                 "jobs"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("flip", "edit_share", "regen_share"):
        if not 0 <= getattr(args, name) <= 1:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1]")
    args.env, env_problems = setting_env(args.train, args.gate)
    if args.rerank_samples is not None:
        if not 1 <= args.rerank_samples <= 16:
            env_problems.append("--rerank-samples must be 1-16")
        args.env["FEEDBACK_CHAT_RERANK_SAMPLES"] = str(args.rerank_samples)
    args.threads_env = thread_env(args.jobs)
    problems += env_problems
    if problems:
        p.error("; ".join(problems))
    if args.plot is None:
        args.plot = (args.json.with_suffix(".png") if args.json
                     else ROOT / "benchmarks" / "results" / "alignment.png")
    return args


def setting_env(train: list[str], gate: list[str]) -> tuple[dict[str, str], list[str]]:
    """``NAME=VALUE`` items as FEEDBACK_CHAT_TRAIN_/GATE_ variables; unknown names reported."""
    known: dict[str, set[str] | None] = {"TRAIN": None, "GATE": None}
    try:
        from dataclasses import fields

        from retrain.gate import GateConfig
        from retrain.train import TrainConfig

        known = {"TRAIN": {f.name for f in fields(TrainConfig)},
                 "GATE": {f.name for f in fields(GateConfig)}}
    except Exception:  # noqa: BLE001 - the service reports bad names itself
        pass
    env: dict[str, str] = {}
    problems: list[str] = []
    for kind, items in (("TRAIN", train), ("GATE", gate)):
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().lower()
            if not sep or not name:
                problems.append(f"--{kind.lower()} wants NAME=VALUE, got {item!r}")
            elif known[kind] is not None and name not in known[kind]:
                problems.append(f"--{kind.lower()}: no setting {name!r}")
            else:
                env[f"FEEDBACK_CHAT_{kind}_{name.upper()}"] = value.strip()
    return env, problems


def resolve_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from chat_app.demo_model.build import ensure_demo_model

    return str(ensure_demo_model(args.data_dir.resolve()))


# --------------------------------------------------------------------------- measurement


def measure(service: Service, prompts: tuple[str, ...], k: int, judges: list[str],
            kl_meter: KLMeter | None, version: str | None) -> dict[str, Any]:
    samples, sample_s = sample_heldout(service, prompts, k)
    t0 = time.perf_counter()
    kl = selection = 0.0
    if kl_meter is not None and version:
        folder = service.adapter_path(version)
        kl, tokens = kl_meter.kl(folder, prompts, samples)
        if (folder / SCORER_FILE).is_file():  # the service served the best of n samples
            selection = selection_kl(service.rerank_samples, tokens)
    per_prompt = {j: prompt_means(JUDGES[j], prompts, samples) for j in judges}
    # every prompt has k replies, so the mean over prompts is the mean over replies
    return {"samples": samples, "scores": {j: sum(v) / len(v) for j, v in per_prompt.items()},
            "prompt_scores": per_prompt,
            "degenerate_share": degenerate_share(samples), "mean_words": mean_words(samples),
            "kl": kl + selection, "kl_selection": selection,
            "eval_s": sample_s + time.perf_counter() - t0}


def run_trajectory(name: str, condition: str, judge: str | None, args: argparse.Namespace,
                   model: str, work: Path, prompts: Any, kl_meter: KLMeter,
                   base_future: Future, measures_base: bool, times: dict[str, float],
                   live: set[Service]) -> dict:
    """One condition (and judge) from a fresh data folder: the base measured first when
    ``measures_base`` (its figures set on ``base_future``, which the other runs wait
    for), then ``args.rounds`` rounds."""
    service = Service((work / name).resolve(), model, {**args.threads_env, **args.env},
                      max_concurrent=args.users, device=args.device)
    live.add(service)
    print(f"[{name}] starting the service ...", file=sys.stderr, flush=True)
    started = service.start()
    with _LOCK:
        times["server_start_s"] += started
    rounds: list[dict[str, Any]] = []
    try:
        if not measures_base:
            base = base_future.result()
        else:
            t0 = time.perf_counter()
            print(f"[{name}] measuring the base ({args.base_samples} samples x "
                  f"{len(prompts.heldout)} prompts) ...", file=sys.stderr, flush=True)
            m = measure(service, prompts.heldout, args.base_samples, args.judges, None, None)
            base = {"scores": m["scores"], "prompt_scores": m["prompt_scores"],
                    "ceiling": {j: best_of(JUDGES[j], prompts.heldout, m["samples"])
                                for j in args.judges},
                    "spread": spread(m["samples"]), "degenerate_share": m["degenerate_share"],
                    "mean_words": m["mean_words"],
                    "examples": [[p, g[0]] for p, g in zip(prompts.heldout, m["samples"], strict=True)][:8]}
            times["base_s"] = time.perf_counter() - t0
            base_future.set_result(base)
        last = {"scores": base["scores"], "prompt_scores": base["prompt_scores"], "kl": 0.0,
                "degenerate_share": base["degenerate_share"], "mean_words": base["mean_words"],
                "version": service.served_version()}
        base_label = last["version"]  # what /healthz calls the bare base
        user_cfg = UserConfig(ratings=args.ratings, users=args.users, flip=args.flip,
                              edit_share=args.edit_share, regen_share=args.regen_share,
                              seed=args.seed)
        for r in range(1, args.rounds + 1):
            print(f"[{name}] round {r}: {args.ratings} replies judged ...", file=sys.stderr,
                  flush=True)
            tally = run_users(service, prompts, JUDGES[judge] if judge else None, condition,
                              user_cfg, round_no=r)
            print(f"[{name}] round {r}: {tally.summary()}; retraining ...", file=sys.stderr,
                  flush=True)
            result = service.retrain()
            retrain_end = time.time()
            serving_at = swap_s = to_serving_s = None
            # promoted = the registry made the candidate active (whatever the decision's name)
            if result.candidate_version and service.active_version() == result.candidate_version:
                serving_at = service.wait_serving(result.candidate_version)
                swap_s = serving_at - retrain_end
                to_serving_s = serving_at - tally.last_feedback_at
            version = service.served_version()
            print(f"[{name}] round {r}: {result.status} {result.decision} "
                  f"{result.candidate_version} in {result.seconds:.0f} s; serving {version}",
                  file=sys.stderr, flush=True)
            if version != last["version"]:
                m = measure(service, prompts.heldout, args.samples, args.judges, kl_meter,
                            None if version == base_label else version)
                last = {**m, "version": version}
                eval_s = m["eval_s"]
            else:
                eval_s = 0.0
            rounds.append({
                "round": r, "feedback": tally.summary(), "users_s": tally.seconds,
                "run_id": result.run_id, "status": result.status, "decision": result.decision,
                "candidate_version": result.candidate_version, "promoted": serving_at is not None,
                "reasons": result.reasons,
                "error": result.error, "retrain_s": result.seconds, "swap_s": swap_s,
                "feedback_to_serving_s": to_serving_s, "serving": version,
                "measured": eval_s > 0, "eval_s": eval_s, "scores": last["scores"],
                "prompt_scores": last["prompt_scores"],
                "kl": last["kl"], "kl_selection": last.get("kl_selection", 0.0),
                "degenerate_share": last["degenerate_share"],
                "mean_words": last["mean_words"],
                "examples": [[p, g[0]] for p, g in
                             zip(prompts.heldout, last.get("samples", []), strict=False)][:4],
                "gate_kl": result.metrics.get("canary_kl", result.metrics.get("kl")),
                "gate_metrics": {k: v for k, v in result.metrics.items()
                                 if not k.startswith("train")},
                "kto_rows": result.metrics.get("kto_rows"),
                "dpo_rows": result.metrics.get("dpo_rows"),
                "train_metrics": {k: v for k, v in result.metrics.items()
                                  if k.startswith("train")},
            })
    except BaseException as exc:
        if not base_future.done():  # the runs waiting for the base must not wait forever
            base_future.set_exception(RuntimeError(f"[{name}] could not measure the base: "
                                                   f"{exc!r}"))
        raise
    finally:
        service.stop()
        live.discard(service)
    return {"name": name, "condition": condition, "judge": judge, "rounds": rounds}


_LOCK = threading.Lock()
# minutes a run of 3 rounds took in the full benchmark two at a time (mean per condition):
# both 14.0, kto 13.2, dpo 10.6, the control 9.8
RUN_COST = {"both": 4, "kto": 3, "dpo": 2, "control": 1}


def thread_env(jobs: int) -> dict[str, str]:
    """Torch threads for each of ``jobs`` services at once (their rounds inherit them);
    nothing with one job, or where OMP_NUM_THREADS is set already."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def table_rows(trajectories: list[dict], base: dict, judges: list[str]) -> list[dict]:
    """One row per judge, condition and round (round 0 = the base) for the table and plot."""
    rows = []
    for t in trajectories:
        for judge in ([t["judge"]] if t["judge"] else judges):
            rows.append({"judge": judge, "condition": t["condition"], "round": 0,
                         "version": None, "decision": None, "score": base["scores"][judge],
                         "ceiling": base["ceiling"][judge], "share_of_way": 0.0,
                         "share_se": None, "kl": 0.0,
                         "degenerate_share": base["degenerate_share"],
                         "mean_words": base["mean_words"], "feedback": None,
                         "feedback_to_serving_s": None})
            gap = base["ceiling"][judge] - base["scores"][judge]
            for r in t["rounds"]:
                score = r["scores"][judge]
                # the share's standard error: the rise's over the base, paired by prompt
                share_se = (paired_se(r["prompt_scores"][judge], base["prompt_scores"][judge])
                            / gap if "prompt_scores" in r and gap > 1e-9 else None)
                rows.append({
                    "judge": judge, "condition": t["condition"], "round": r["round"],
                    "version": r["serving"], "decision": r["decision"] or r["status"],
                    "score": score, "ceiling": base["ceiling"][judge],
                    "share_of_way": share_of_way(score, base["scores"][judge],
                                                 base["ceiling"][judge]),
                    "share_se": share_se,
                    "kl": r["kl"], "kl_selection": r.get("kl_selection", 0.0),
                    "degenerate_share": r["degenerate_share"],
                    "mean_words": r["mean_words"], "feedback": r["feedback"],
                    "feedback_to_serving_s": r["feedback_to_serving_s"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C, so the served subprocess is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model = resolve_model(args)
    prompts = build_prompt_sets(args.heldout, seed=args.seed)
    plan = [(c, None if c == "control" else j) for c in args.conditions
            for j in (args.judges if c != "control" else [None])]
    print(f"{len(plan)} runs x {args.rounds} rounds; {prompts.train_count} train prompts, "
          f"{len(prompts.heldout)} held-out", file=sys.stderr, flush=True)
    kl_meter = KLMeter(model, threads=args.threads)
    times = {"server_start_s": 0.0, "base_s": 0.0}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-alignment-"))
    base_future: Future = Future()
    live: set[Service] = set()
    finished = [0]

    def one(condition: str, judge: str | None, measures_base: bool) -> dict:
        name = f"{condition}-{judge}" if judge else condition
        traj = run_trajectory(name, condition, judge, args, model, work, prompts, kl_meter,
                              base_future, measures_base, times, live)
        with _LOCK:
            finished[0] += 1
            done = finished[0] / len(plan)
        spent = time.perf_counter() - t_start
        print(f"[{name}] done; {spent / 60:.1f} min so far, about "
              f"{spent * (1 - done) / done / 60:.1f} min to go", file=sys.stderr, flush=True)
        return traj

    try:
        # ``--jobs`` runs at a time, the longest kinds first so that no long run is left
        # alone at the end; the first to start measures the base; reported in plan order
        order = sorted(range(len(plan)), key=lambda k: RUN_COST[plan[k][0]], reverse=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            started = {k: pool.submit(one, *plan[k], k == order[0]) for k in order}
            futures = [started[k] for k in range(len(plan))]
            try:
                trajectories = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                for service in list(live):  # Ctrl-C or a failed run: stop every server
                    service.stop()
                raise
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = base_future.result()
    times["total_s"] = time.perf_counter() - t_start
    report = {
        "benchmark": "bench_alignment",
        "setup": {"model": args.model or f"demo model ({model})", "judges": args.judges,
                  "conditions": args.conditions, "rounds": args.rounds,
                  "ratings_per_round": args.ratings, "users": args.users, "flip": args.flip,
                  "edit_share": args.edit_share, "regen_share": args.regen_share,
                  "heldout_prompts": len(prompts.heldout), "train_prompts": prompts.train_count,
                  "samples_per_prompt": args.samples, "base_samples_per_prompt": args.base_samples,
                  "seed": args.seed, "settings_env": args.env, "jobs": args.jobs,
                  "threads_per_job": args.threads_env.get("OMP_NUM_THREADS"),
                  "passed_through_env": sorted(k for k in os.environ
                                               if k.startswith(("FEEDBACK_CHAT_TRAIN_",
                                                                "FEEDBACK_CHAT_GATE_")))},
        "heldout": list(prompts.heldout),
        "base": base, "trajectories": trajectories,
        "rows": table_rows(trajectories, base, args.judges),
        "times": times, "note": machine_note(),
    }
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, report)
    plot(report, args.plot)
    print(f"plot: {args.plot}")
    failed = [r for t in trajectories for r in t["rounds"] if r["status"] == "failed"]
    return 1 if failed or not all(math.isfinite(r["score"]) for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
