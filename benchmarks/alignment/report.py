"""The benchmark's table and plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common import fmt, print_table


def share_of_way(score: float | None, base: float, ceiling: float) -> float:
    """(score - base) / (ceiling - base): 0 at the base, 1 at the best-of-n ceiling."""
    if score is None or not math.isfinite(score) or ceiling - base <= 1e-9:
        return math.nan
    return (score - base) / (ceiling - base)


def feedback_cell(counts: dict[str, Any] | None) -> str:
    if not counts:
        return "-"
    return (f"{counts['up']}/{counts['down']}/{counts['edits']}/{counts['picks']}"
            + (f" ({counts['errors']} err)" if counts.get("errors") else ""))


def print_report(report: dict[str, Any]) -> None:
    base = report["base"]
    setup = report["setup"]
    print(f"\nmodel {setup['model']}; {setup['heldout_prompts']} held-out prompts x "
          f"{setup['samples_per_prompt']} served samples per round (base: "
          f"{setup['base_samples_per_prompt']}); {setup['ratings_per_round']} replies judged "
          f"per round by {setup['users']} users (flip {setup['flip']}, edits "
          f"{setup['edit_share']} of dislikes, regenerate+pick {setup['regen_share']})")
    print(f"base spread: {fmt(base['spread'])} distinct replies among "
          f"{setup['base_samples_per_prompt']} samples per prompt; base degenerate share "
          f"{fmt(base['degenerate_share'])}")
    for judge in setup["judges"]:
        rows = []
        for row in report["rows"]:
            if row["judge"] != judge:
                continue
            rows.append((row["condition"], row["round"], row["version"] or "base",
                         row["decision"] or "-", row["score"], row["ceiling"], row["share_of_way"],
                         row.get("share_se"), row["kl"], row["degenerate_share"], row["mean_words"],
                         feedback_cell(row.get("feedback")), row["feedback_to_serving_s"]))
        print_table(("condition", "round", "serving", "decision", "score", "ceiling",
                     "share of way", "± se", "KL nats/tok", "degenerate", "words",
                     "up/down/edits/picks", "last fb->serving s"), rows,
                    title=f"judge {judge}: mean score on held-out prompts (base "
                          f"{fmt(base['scores'][judge])}, best-of-"
                          f"{setup['base_samples_per_prompt']} ceiling "
                          f"{fmt(base['ceiling'][judge])})")
    rows = [(t["name"], r["round"], r["users_s"], r["retrain_s"], r["swap_s"], r["eval_s"],
             r.get("gate_kl"), r.get("kto_rows"), r.get("dpo_rows"))
            for t in report["trajectories"] for r in t["rounds"]]
    print_table(("run", "round", "users s", "retrain s", "retrain end->serving s", "eval s",
                 "gate KL", "KTO rows", "DPO rows"), rows, title="phases")
    lines = [(t["name"], r["round"], r["decision"] or r["status"],
              r["error"] or "; ".join(r["reasons"]) or "-")
             for t in report["trajectories"] for r in t["rounds"]]
    if lines:
        print("\ngate decisions:")
        for name, rnd, decision, why in lines:
            print(f"  {name} round {rnd}: {decision}: {why}")
    times = report["times"]
    print(f"\nwall time {times['total_s']:.0f} s (base measurement {times['base_s']:.0f} s, "
          f"server starts {times['server_start_s']:.0f} s); {report['note']}")


def plot(report: dict[str, Any], path: Path) -> None:
    """Per judge: score against round and score against KL, one line per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = report["setup"]["judges"]
    fig, axes = plt.subplots(len(judges), 2, figsize=(11, 3.6 * len(judges)), squeeze=False)
    base = report["base"]
    for i, judge in enumerate(judges):
        ax_round, ax_kl = axes[i]
        for condition in report["setup"]["conditions"]:
            rows = [r for r in report["rows"] if r["judge"] == judge
                    and r["condition"] == condition]
            if not rows:
                continue
            rounds = [r["round"] for r in rows]
            scores = [r["score"] for r in rows]
            kls = [r["kl"] if r["kl"] is not None else math.nan for r in rows]
            ax_round.plot(rounds, scores, marker="o", label=condition)
            ax_kl.plot(kls, scores, marker="o", label=condition)
        for ax in (ax_round, ax_kl):
            ax.axhline(base["ceiling"][judge], color="grey", linestyle="--", linewidth=1,
                       label=f"best-of-{report['setup']['base_samples_per_prompt']} ceiling")
            ax.axhline(base["scores"][judge], color="grey", linestyle=":", linewidth=1,
                       label="base")
            ax.set_ylabel(f"{judge} score")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        ax_round.set_xlabel("round")
        ax_round.set_xticks(range(report["setup"]["rounds"] + 1))
        ax_kl.set_xlabel("KL(policy || base), nats/token, held-out replies")
        ax_kl.set_xlim(left=0)
        ax_round.set_title(f"{judge}: score by round")
        ax_kl.set_title(f"{judge}: score against KL")
        ax_kl.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
