"""What grouping rows by length saves a training round, on the rows a
``bench_alignment.py --work-dir DIR`` run left: the round of ``--version`` of ``--run``
trained twice in process from the base, the same seed, once with each batch's rows in one
padded pass (``retrain.grouping.MAX_GROUPS`` = 1, as before) and once in groups of
similar length (the default), in alternating order ``--repeats`` times.

Printed for each: the round's seconds (its own phases: KTO, the own-reply pairs, DPO),
the probe's KL readings and the phases' final losses. The two should train the same
round: grouping changes only float rounding, so the readings agree to a few decimals
and the steps taken are the same. The ratio of the seconds is measured in the same run.

    python benchmarks/bench_grouping.py --work-dir DIR --run both-concise --version v0001 \\
        [--threads 1] [--repeats 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_candidate_args,
    candidate_rows,
    check_candidate_args,
    machine_note,
    model_or_demo,
    write_json,
)

_SHOWN = ("kto/steps", "kto/seconds", "kto/loss_final", "dpo/steps", "dpo/seconds",
          "dpo/loss_final", "pairs/seconds", "pairs/own", "kl_sampled", "kl_checks",
          "kl_backoffs")


def one_round(args: argparse.Namespace, rows, probes, groups: int) -> dict:
    from retrain import grouping
    from retrain.train import TrainConfig, train_round

    grouping.MAX_GROUPS = groups
    history: list[float] = []

    def progress(record: dict) -> None:
        if "kl/sampled" in record:
            history.append(round(record["kl/sampled"], 4))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_round(base_model=args.model, parent_adapter=None, kto_rows=rows.kto,
                             dpo_rows=rows.dpo, out_dir=Path(tmp) / "adapter",
                             config=TrainConfig(device="cpu"), probe_messages=probes,
                             asked_prompts=rows.train_asked, progress=progress)
        seconds = time.perf_counter() - t0
    return {"groups": groups, "seconds": seconds, "kl_history": history,
            **{k: result.metrics.get(k) for k in _SHOWN}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_candidate_args(parser, run_help="<condition>-<judge> or control")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of rounds (1)")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    check_candidate_args(parser, args)
    args.model = model_or_demo(args.model)

    import torch

    from retrain import grouping
    from retrain.budget import probe_prompts
    from retrain.train import TrainConfig

    torch.set_num_threads(args.threads)
    rows = candidate_rows(args)
    probes = probe_prompts([*rows.heldout_kto, *rows.heldout_dpo,
                            *({"prompt": p} for p in rows.asked)],
                           TrainConfig().kl_probe_prompts, TrainConfig().seed)
    default_groups = grouping.MAX_GROUPS
    results = []
    for r in range(args.repeats):
        order = (1, default_groups) if r % 2 == 0 else (default_groups, 1)
        for groups in order:
            out = one_round(args, rows, probes, groups)
            results.append(out)
            print(f"groups <= {groups}: {out['seconds']:.1f} s; " + ", ".join(
                f"{k} {v:.4g}" for k, v in out.items()
                if k in _SHOWN and isinstance(v, float)), flush=True)
            print(f"  probe KL readings: {out['kl_history']}", flush=True)
    mean = {g: sum(r["seconds"] for r in results if r["groups"] == g)
            / sum(1 for r in results if r["groups"] == g) for g in (1, default_groups)}
    ratio = mean[default_groups] / mean[1]
    print(f"{args.run} {args.version} ({len(rows.kto)} thumbs, {len(rows.dpo)} users' pairs),"
          f" {args.threads} thread(s): one pass per batch {mean[1]:.1f} s, grouped "
          f"{mean[default_groups]:.1f} s, ratio {ratio:.2f}")
    note = machine_note()
    print(note)
    write_json(args.json, {"benchmark": "bench_grouping", "run": args.run,
                           "version": args.version, "threads": args.threads,
                           "rounds": results, "mean_seconds": mean, "ratio": ratio,
                           "note": note})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
