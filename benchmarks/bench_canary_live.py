"""How many ratings and how much wall time a canary needs to decide, through the live service.

The real service (``feedback-chat serve`` on the demo model, its own fresh data folder,
the canary on with the product's defaults unless flags say otherwise) and the alignment
benchmark's simulated users (``benchmarks/alignment``: they chat through ``/v1`` and
rate, edit and regenerate by a ground-truth judge, 10% of thumbs flipped):

1. **good**: the users give ``--ratings`` rated replies, an operator runs a round
   (``feedback-chat retrain --now``); a candidate the gate passes becomes the canary.
2. **broken**: a LoRA with large random weights (replies become noise) is registered and
   put on trial by hand, as an operator would try a version the gate never saw.

For each, the users keep chatting (batches of ``--batch`` ratings) until the canary's
rule decides. Reported: the outcome, the ratings counted (both versions), the replies
served, the good share per version with its counts, and the wall time from the canary's
start to its decision.

    python benchmarks/bench_canary_live.py                      # judge concise, defaults
    python benchmarks/bench_canary_live.py --share 0.5 --min-ratings 20 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.judges import JUDGES  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from alignment.service import Service  # noqa: E402
from alignment.users import UserConfig, run_users  # noqa: E402
from common import machine_note, write_json  # noqa: E402

from feedback_store import FeedbackStore  # noqa: E402
from feedback_store.canary import CanaryConfig  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = CanaryConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the demo model, built in --data-dir)")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--work-dir", type=Path, help="keep the service's data folder here")
    p.add_argument("--judge", default="concise", choices=sorted(JUDGES))
    p.add_argument("--ratings", type=int, default=200, help="rated replies before the round")
    p.add_argument("--batch", type=int, default=40, help="rated replies between checks")
    p.add_argument("--share", type=float, default=d.share)
    p.add_argument("--min-ratings", type=int, default=d.min_ratings)
    p.add_argument("--max-trial-ratings", type=int, default=3000,
                   help="stop a trial the rule has not decided after this many ratings")
    p.add_argument("--noise", type=float, default=0.5, help="the broken LoRA's weight scale")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def broken_adapter(model: str, folder: Path, scale: float) -> None:
    """A LoRA on every linear layer with N(0, scale) weights: replies turn to noise."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from retrain.modeling import fresh_lora_config

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                fresh_lora_config(r=8, alpha=16, dropout=0.0,
                                                  target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(str(folder))


def trial(name: str, service: Service, store: FeedbackStore, prompts: Any,
          args: argparse.Namespace, version: str) -> dict[str, Any]:
    judge = JUDGES[args.judge]
    deadline = time.time() + 300
    with service.client() as client:
        while not any(m.get("role") == "canary" for m in
                      client.get("/v1/models").json()["data"]):
            if time.time() > deadline:
                raise RuntimeError(f"the service never served canary {version}")
            time.sleep(0.5)
    sent = served = 0
    errors: list[str] = []
    batch_no = 0
    while store.canaries.current() is not None and sent < args.max_trial_ratings:
        batch_no += 1
        tally = run_users(service, prompts, judge, "both",
                          UserConfig(ratings=args.batch, seed=batch_no), round_no=1000 + batch_no)
        sent += args.batch
        served += tally.counts["replies"]
        errors += tally.errors
        print(f"[{name}] {sent} ratings sent; canary "
              f"{'running' if store.canaries.current() else 'decided'}", file=sys.stderr,
              flush=True)
    deadline = time.time() + 60
    while store.canaries.current() is not None and time.time() < deadline and \
            sent >= args.max_trial_ratings:
        time.sleep(1)
    history = store.canaries.history()
    record = history[0] if history and history[0]["version"] == version else None
    if record is None:
        return {"trial": name, "version": version, "outcome": "undecided in the trial",
                "ratings_sent": sent, "errors": len(errors)}
    started = datetime.fromisoformat(record["started_at"])
    ended = datetime.fromisoformat(record["ended_at"])
    return {"trial": name, "version": version, "outcome": record["outcome"],
            "reason": record["reason"], "ratings_counted": record["ratings"],
            "ratings_sent": sent, "replies_served_to_users": served,
            "counts": record["counts"], "seconds_to_decision": (ended - started).total_seconds(),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model:
        model = args.model
    else:
        from chat_app.demo_model.build import ensure_demo_model

        model = str(ensure_demo_model(args.data_dir.resolve()))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-canary-"))
    env = {"FEEDBACK_CHAT_CANARY_SHARE": str(args.share),
           "FEEDBACK_CHAT_CANARY_MIN_RATINGS": str(args.min_ratings),
           "FEEDBACK_CHAT_CANARY_CHECK_SECONDS": "2"}
    service = Service((work / "live").resolve(), model, env)
    prompts = build_prompt_sets(16)
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    round_info: dict[str, Any] = {}
    try:
        service.start()
        store = FeedbackStore.open(service.database_url)
        tally = run_users(service, prompts, JUDGES[args.judge], "both",
                          UserConfig(ratings=args.ratings), round_no=1)
        result = service.retrain()
        round_info = {"feedback": tally.summary(), "decision": result.decision,
                      "candidate": result.candidate_version, "reasons": result.reasons,
                      "retrain_s": result.seconds}
        print(f"[good] round: {result.decision} {result.candidate_version}", file=sys.stderr)
        if result.decision == "canary":
            results.append(trial("good", service, store, prompts, args,
                                 result.candidate_version))
        version = store.registry.next_version_name()
        folder = Path(service.data_dir) / "adapters" / version
        broken_adapter(model, folder, args.noise)
        store.registry.register_version(version=version, path=str(folder))
        store.canaries.start(version, CanaryConfig(share=args.share,
                                                   min_ratings=args.min_ratings),
                             reasons=("put on trial by hand (bench_canary_live)",))
        results.append(trial("broken", service, store, prompts, args, version))
    finally:
        service.stop()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print(f"canary through the live service: judge {args.judge}; share {args.share:.0%}; "
          f"min {args.min_ratings} ratings per version; users rate in batches of {args.batch}")
    print(f"round before the good trial: {round_info.get('decision')} "
          f"{round_info.get('candidate')}")
    print(f"{'trial':<7} {'outcome':<12} {'ratings':>8} {'replies':>8} {'seconds':>8}  "
          f"good share (active vs canary)")
    for r in results:
        counts = r.get("counts") or {}
        shares = "  ".join(f"{v}: {c['good']}/{c['rated']}" for v, c in counts.items())
        print(f"{r['trial']:<7} {r['outcome']:<12} {r.get('ratings_counted', '-'):>8} "
              f"{r.get('replies_served_to_users', '-'):>8} "
              f"{r.get('seconds_to_decision', float('nan')):8.1f}  {shares}")
    print(f"(wall {seconds:.0f} s; failed requests: {sum(r['errors'] for r in results)})")
    write_json(args.json, {"benchmark": "bench_canary_live", "judge": args.judge,
                           "share": args.share, "min_ratings": args.min_ratings,
                           "round": round_info, "trials": results, "seconds": seconds,
                           "note": machine_note()})
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
