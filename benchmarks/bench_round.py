"""One round trained in process on the rows a ``bench_alignment.py --work-dir DIR`` run
left, with training settings varied, and judged on more held-out prompts than the
benchmark's 24.

From the candidate ``--version`` of ``--run`` (``<condition>-<judge>``, or ``control``
with ``--judge``), the round's rows are rebuilt as the retraining worker built them (the
rows up to the version's ``last_event_id``, split by prompt, edits also counted as
down-votes, the training split's asked prompts for the own-reply pairs). A round is
trained from the base with ``TrainConfig`` and ``--train NAME=VALUE`` overrides, and
judged as ``bench_regate.py`` judges: the judge's score of 4 sampled replies (as served,
up to 256 tokens) to each of ``--heldout`` held-out prompts against the base's on the same
prompts, the KL from the base, the share of degenerate replies, and ``truly_better``
(a rise of at least 0.05 and 2 standard errors, within 0.3 nats/token).

The benchmark's served score after a round reads 24 prompts x 4 samples, about 0.045 of
standard error on the content judge; 72 prompts read about half of that, enough to tell
two settings apart on one round's rows.

    python benchmarks/bench_round.py --work-dir DIR --run dpo-on_subject --version v0002 \\
        [--heldout 72] [--train pair_prompts=64 ...] [--judge NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment.judges import JUDGES  # noqa: E402
from alignment.prompts import build_prompt_sets  # noqa: E402
from bench_gate import _truth  # noqa: E402
from common import (  # noqa: E402
    add_candidate_args,
    candidate_rows,
    check_candidate_args,
    machine_note,
    model_or_demo,
    write_json,
)

_SHOWN = ("steps", "kl_sampled", "kl_backoffs", "stopped_by_kl_budget", "kl_checks")


def train_config(items: list[str]) -> Any:
    """The default ``TrainConfig`` with ``NAME=VALUE`` overrides, read as the worker reads
    its ``FEEDBACK_CHAT_TRAIN_<NAME>`` variables."""
    from retrain.config import _env_overrides
    from retrain.train import TrainConfig

    names = {f.upper() for f in TrainConfig.__dataclass_fields__}
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name.upper() not in names:
            raise SystemExit(f"--train: no setting {name!r} (NAME=VALUE, a TrainConfig field)")
        env["FEEDBACK_CHAT_TRAIN_" + name.upper()] = value
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = TrainConfig(**_env_overrides("FEEDBACK_CHAT_TRAIN_", TrainConfig))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    config.validate()
    return config


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer

    from retrain import modeling
    from retrain.budget import probe_prompts
    from retrain.train import train_round

    torch.set_num_threads(args.threads)
    judge = JUDGES[args.judge or args.run.split("-", 1)[-1]]
    rows = candidate_rows(args)
    config = train_config(args.train)
    device = modeling.resolve_device(args.device)
    quantize = modeling.resolve_quantize(config.quantize_4bit, device)
    config = dataclasses.replace(config, device=str(device))
    probes = probe_prompts([*rows.heldout_kto, *rows.heldout_dpo,
                            *({"prompt": p} for p in rows.asked)],
                           config.kl_probe_prompts, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = list(build_prompt_sets(args.heldout).heldout)
    base = modeling.load_eval_model(args.model, adapter_path=None, device=device,
                                    quantize_4bit=quantize)
    base_score, _, _, base_degenerate, _, base_scores = _truth(
        base, tokenizer, heldout, judge, [0.0] * len(heldout), 0.0, False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_round(base_model=args.model, parent_adapter=None, kto_rows=rows.kto,
                             dpo_rows=rows.dpo, out_dir=Path(tmp) / "adapter", config=config,
                             probe_messages=probes, asked_prompts=rows.train_asked)
        seconds = time.perf_counter() - t0
        del base
        model = modeling.load_eval_model(args.model, adapter_path=Path(tmp) / "adapter",
                                         device=device, quantize_4bit=quantize)
        score, rise, kl, degenerate, better, _ = _truth(
            model, tokenizer, heldout, judge, base_scores, base_degenerate, True)
    out = {"run": args.run, "version": args.version, "judge": judge.name,
           "device": str(device), "quantized_4bit": quantize,
           "train": args.train, "heldout_prompts": len(heldout),
           "thumbs_rows": len(rows.kto), "users_pairs": len(rows.dpo),
           "base_score": base_score, "score": score, "rise": rise, "kl": kl,
           "degenerate": degenerate, "truly_better": better, "train_seconds": seconds,
           "train_metrics": {k: v for k, v in result.metrics.items()
                             if k.startswith("pairs/") or k.endswith(_SHOWN)}}
    pairs = {k: round(v, 3) for k, v in result.metrics.items() if k.startswith("pairs/")
             and k != "pairs/users_median_cost"}
    print(f"{args.run} {args.version} {' '.join(args.train) or '(defaults)'}: {judge.name} "
          f"{score:.3f} (base {base_score:.3f}, rise {rise:+.3f}) at KL {kl:.3f}, "
          f"degenerate {degenerate:.0%}, truly better: {better}; {pairs}; "
          f"{seconds:.0f} s training on {device}{' (4-bit NF4 base)' if quantize else ''}")
    print(machine_note())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_candidate_args(parser, run_help="<condition>-<judge> or control")
    parser.add_argument("--judge", choices=sorted(JUDGES),
                        help="the judge (default: the run's; required for control)")
    parser.add_argument("--heldout", type=int, default=72, help="held-out prompts (72)")
    parser.add_argument("--train", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="cpu or cuda (default: CUDA when available); the "
                        "round trains and is judged there, on a 4-bit NF4 base on CUDA, as "
                        "the worker and the server load it (--train quantize_4bit=false: unquantised)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    check_candidate_args(parser, args)
    args.model = model_or_demo(args.model)
    write_json(args.json, {"benchmark": "bench_round", **run(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
