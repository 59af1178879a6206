"""How often the canary's decision rule decides wrongly, and how many ratings it needs.

No model: thousands of simulated canaries. Ratings arrive one at a time; each goes to
the canary with probability ``--share`` (as conversations are split), and is good with
the probability of the version it went to (the active's ``--base``, the canary's
``--base`` + effect). The rule (``feedback_store.sequential.decide``, the defaults of
``CanaryConfig``) is checked every ``--every`` ratings, as the service's monitor checks
every few seconds, until it decides or ``--max-ratings`` (both versions together) run
out, which ends the canary undecided (the active version stays).

For each true effect it prints the share of canaries promoted, rolled back and left
undecided, and the median (and 90th percentile) ratings to a decision. A promotion is
wrong when the canary is worse by more than the margin; with margin 0, also when the
versions are equal. The rule is built so the wrong-direction share stays under
``error_rate`` however often it is checked; this measures how well that holds.

    python benchmarks/bench_canary.py                       # 2000 canaries per effect
    python benchmarks/bench_canary.py --sims 500 --json out.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_note, write_json  # noqa: E402

from feedback_store.canary import CanaryConfig  # noqa: E402
from feedback_store.sequential import ArmCounts, decide  # noqa: E402

EFFECTS = (-0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15)


def simulate(effect: float, args: argparse.Namespace, config: CanaryConfig,
             rng: random.Random) -> tuple[str, int]:
    rule = config.rule()
    p = {"a": args.base, "c": min(1.0, max(0.0, args.base + effect))}
    good = {"a": 0, "c": 0}
    n = {"a": 0, "c": 0}
    for i in range(1, config.max_ratings + 1):
        arm = "c" if rng.random() < config.share else "a"
        n[arm] += 1
        good[arm] += rng.random() < p[arm]
        if i % args.every == 0 or i == config.max_ratings:
            v = decide(ArmCounts(good=good["a"], bad=n["a"] - good["a"]),
                       ArmCounts(good=good["c"], bad=n["c"] - good["c"]), rule)
            if v.decision != "continue":
                return v.decision, i
    return "undecided", config.max_ratings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sims", type=int, default=2000, help="canaries per effect (2000)")
    ap.add_argument("--base", type=float, default=0.6, help="the active's good share (0.6)")
    ap.add_argument("--every", type=int, default=5, help="ratings between checks (5)")
    ap.add_argument("--effects", default=",".join(str(e) for e in EFFECTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    config = CanaryConfig()
    rng = random.Random(args.seed)
    rows = []
    t0 = time.perf_counter()
    for effect in (float(e) for e in args.effects.split(",")):
        outcomes = [simulate(effect, args, config, rng) for _ in range(args.sims)]
        decided = sorted(n for d, n in outcomes if d != "undecided")
        share = {k: sum(d == k for d, _ in outcomes) / args.sims
                 for k in ("promote", "rollback", "undecided")}
        wrong = share["promote"] if effect < -config.margin or (
            effect <= 0 and config.margin == 0) else share["rollback"] if effect > 0 else None
        rows.append({"effect": effect, **share, "wrong": wrong,
                     "median_ratings": statistics.median(decided) if decided else None,
                     "p90_ratings": decided[int(0.9 * (len(decided) - 1))] if decided else None})
    seconds = time.perf_counter() - t0
    print(f"canary decision rule: {args.sims} simulated canaries per effect; active good share "
          f"{args.base}; canary share {config.share:.0%}; min {config.min_ratings} ratings per "
          f"version; margin {config.margin}; error rate {config.error_rate}; mixing sd "
          f"{config.mixing_sd}; checked every {args.every} ratings; at most "
          f"{config.max_ratings} ratings")
    print(f"{'effect':>7} {'promote':>8} {'rollback':>9} {'undecided':>10} {'wrong':>6} "
          f"{'median n':>9} {'p90 n':>6}")
    for r in rows:
        wrong = "-" if r["wrong"] is None else f"{r['wrong']:.3f}"
        med = "-" if r["median_ratings"] is None else f"{r['median_ratings']:.0f}"
        p90 = "-" if r["p90_ratings"] is None else f"{r['p90_ratings']}"
        print(f"{r['effect']:+7.2f} {r['promote']:8.3f} {r['rollback']:9.3f} "
              f"{r['undecided']:10.3f} {wrong:>6} {med:>9} {p90:>6}")
    print(f"({seconds:.1f} s; 'wrong': promoted when not better, rolled back when better; "
          f"ratings counted over both versions)")
    write_json(args.json, {"benchmark": "bench_canary", "sims": args.sims, "base": args.base,
                           "every": args.every, "config": config.to_dict(), "rows": rows,
                           "seconds": seconds, "note": machine_note()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
