"""Retraining speed and memory: our KTO and DPO phases against TRL's KTOTrainer and DPOTrainer.

Both sides train the same model on the same rows with the same settings: a fresh LoRA
(rank, alpha, all linear layers, no dropout), batch size, max length, beta, learning rate,
AdamW without weight decay, gradient clipping at 1.0, float32 on the CPU (on CUDA: the
base loaded by ``retrain.modeling.load_base_model`` for both, 4-bit NF4 by default, bf16
autocast for TRL, gradient checkpointing on for both), no gradient accumulation. The
reference is the base with the adapter disabled on both sides, computed in every step
(TRL's ``precompute_ref_log_probs`` stays off). Per step both do the same work:

* KTO: B matched (prompt, completion) sequences forward and backward, plus three
  no-gradient forwards (the policy on B mismatched pairs for the KL reference point, the
  reference on the matched and on the mismatched sequences);
* DPO: 2B sequences (chosen and rejected) forward and backward, plus one reference forward.

Figures per (phase, implementation), each run in its own fresh process:

* s/step = median wall time between the ends of consecutive optimiser steps, over the
  steps after ``--warmup`` (ours: the ``progress`` callback of ``retrain.train.run_round``,
  called after every step; TRL: a ``TrainerCallback.on_step_end``). Everything the loop
  does between two steps counts on both sides (batching, forwards, backward, optimiser,
  logging).
* peak MB = the growth of the peak memory during training over the memory at its start
  (CPU: peak resident set, ``VmHWM`` after a reset; CUDA: ``max_memory_allocated``), so the
  model weights loaded before are not counted but activations, gradients and the
  optimiser state are;
* CPU s/step = the same for the process's CPU time (``time.process_time``, all threads):
  with one torch thread it tracks the work done and is far less disturbed than wall time
  by other programs on a shared machine;
* ratio = ours / TRL, measured in the same run (below 1: ours is faster or smaller).

Rows: feedback written through the real store by ``tests/feedback_data.seed_preferences``
(polite replies up and chosen, curt replies down), built into TRL's conversational rows by
``feedback_store.build_kto_rows``/``build_dpo_rows``, each prompt led by a system message
(``--system-prompt``) so that sequences are about 100 tokens, as in a real chat.

Default model: a random-weight Llama of 6 layers of width 512 (~23M parameters) with a
tokenizer trained here. CPU timings on a shared machine are noisy: compare the ratios.

    python benchmarks/bench_retrain.py [--model PATH] [--device cpu|cuda] [--steps 5]
                                       [--warmup 1] [--batch-size 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    build_random_llama,
    check_common_args,
    machine_note,
    median,
    parameter_count,
    print_table,
    ratio,
    write_json,
)

IMPLS = ("ours", "trl")
PHASES = ("kto", "dpo")
SYSTEM_PROMPT = (
    "You are the helpful assistant of a small online service. Answer the user's question "
    "politely and completely, in plain words, in two or three sentences at most. If you do "
    "not know the answer, say so and suggest where the user could look it up."
)


def build_rows(data_dir: Path, rounds: int, system_prompt: str) -> dict[str, list[dict]]:
    """KTO and DPO rows from feedback stored in a fresh SQLite store."""
    from feedback_data import seed_preferences

    from feedback_store import FeedbackStore, build_dpo_rows, build_kto_rows

    store = FeedbackStore.open(f"sqlite:///{data_dir / 'feedback.db'}")
    try:
        seed_preferences(store, rounds=rounds)
        kto, dpo = build_kto_rows(store), build_dpo_rows(store)
    finally:
        store.close()
    if system_prompt:
        for row in kto + dpo:
            row["prompt"] = [{"role": "system", "content": system_prompt}, *row["prompt"]]
    return {"kto": kto, "dpo": dpo}


# ------------------------------------------------------------------------ one measured run


def run_ours(spec: dict[str, Any], rows: list[dict], clock: StepClock) -> dict[str, Any]:
    """Train one phase with ``retrain.train.run_round`` on a freshly loaded LoRA model."""
    import torch

    from retrain import modeling
    from retrain.train import TrainConfig, run_round

    device = modeling.resolve_device(spec["device"])
    quantize = modeling.resolve_quantize(None, device)
    tokenizer = modeling.load_tokenizer(spec["model"])
    lora = modeling.fresh_lora_config(
        r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=0.0, target_modules="all-linear"
    )
    torch.manual_seed(spec["seed"])
    model = modeling.load_trainable_model(
        spec["model"], parent_adapter=None, lora=lora, device=device, quantize_4bit=quantize,
        gradient_checkpointing=device.type == "cuda",
    )
    phase = spec["phase"]
    config = TrainConfig(
        beta=spec["beta"], learning_rate=spec["learning_rate"], batch_size=spec["batch_size"],
        max_length=spec["max_length"], lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
        kto_steps=spec["total_steps"] if phase == "kto" else 0,
        dpo_steps=spec["total_steps"] if phase == "dpo" else 0,
        epochs=1e6, log_every=1, seed=spec["seed"], device=spec["device"],
        quantize_4bit=quantize, gradient_checkpointing=device.type == "cuda",
    )
    encoded = (modeling.encode_kto_rows if phase == "kto" else modeling.encode_dpo_rows)(
        tokenizer, rows
    )
    turns = [e.turn for e in encoded] if phase == "kto" else [
        t for e in encoded for t in (e.chosen, e.rejected)
    ]
    clock.start()
    result = run_round(
        model, tokenizer, kto_rows=rows if phase == "kto" else [],
        dpo_rows=rows if phase == "dpo" else [], config=config,
        progress=lambda record: clock.step_end(),
    )
    losses = [h["loss"] for h in result.history]
    return {
        "tokens_per_sequence": sum(len(t.prompt_ids) + len(t.completion_ids) for t in turns)
        / len(turns),
        "loss_first": losses[0], "loss_last": losses[-1],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run_trl(spec: dict[str, Any], rows: list[dict], clock: StepClock) -> dict[str, Any]:
    """Train one phase with TRL's trainer on the same base, LoRA shape and settings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from retrain import modeling
    from retrain.losses import balanced_kto_weights

    device = modeling.resolve_device(spec["device"])
    cuda = device.type == "cuda"
    tokenizer = modeling.load_tokenizer(spec["model"])
    base = modeling.load_base_model(
        spec["model"], device=device, quantize_4bit=modeling.resolve_quantize(None, device)
    )
    base.config.use_cache = False
    lora = modeling.fresh_lora_config(
        r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=0.0, target_modules="all-linear"
    )
    total = spec["total_steps"]
    common = dict(
        output_dir=spec["work_dir"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, max_steps=total, learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant_with_warmup", warmup_steps=round(0.1 * total),
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=cuda,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cuda else None,
        dataloader_num_workers=0, max_length=spec["max_length"], beta=spec["beta"],
        precompute_ref_log_probs=False,
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            clock.start()

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            clock.step_begin()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            clock.step_end()

    dataset = Dataset.from_list(rows)
    torch.manual_seed(spec["seed"])
    if spec["phase"] == "kto":
        n_up = sum(r["label"] for r in rows)
        w_up, w_down = balanced_kto_weights(n_up, len(rows) - n_up)  # what our phase uses
        args = KTOConfig(**common, loss_type="kto", desirable_weight=w_up,
                         undesirable_weight=w_down)
        trainer: Any = KTOTrainer(model=base, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=lora,
                                  callbacks=[Clock()])
    else:
        args = DPOConfig(**common, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=base, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    data = trainer.train_dataset
    if spec["phase"] == "kto":
        lengths = [len(p) + len(c) for p, c in zip(data["prompt_ids"], data["completion_ids"],
                                                    strict=True)]
    else:
        lengths = [len(p) + len(c) for key in ("chosen_ids", "rejected_ids")
                   for p, c in zip(data["prompt_ids"], data[key], strict=True)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens_per_sequence": sum(lengths) / len(lengths),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()
                                    if p.requires_grad),
    }


class StepClock:
    """Times of step ends (and, where the trainer says so, step beginnings) and peak memory."""

    def __init__(self, device: str) -> None:
        from common import PeakMemory

        self.device = device
        self.memory = PeakMemory(device)
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time (all threads) at each step end

    def _now(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.memory.start()

    def step_begin(self) -> None:
        self.begins.append(self._now())

    def step_end(self) -> None:
        self.ends.append(self._now())
        self.cpu_ends.append(time.process_time())


def worker(spec_file: Path, out_file: Path) -> None:
    """Child-process entry point: one (phase, implementation) run, figures to ``out_file``."""
    import torch

    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    rows = json.loads(Path(spec["rows_file"]).read_text())[spec["phase"]]
    clock = StepClock(spec["device"])
    extra = (run_ours if spec["impl"] == "ours" else run_trl)(spec, rows, clock)
    peak = clock.memory.peak_delta()
    warmup = spec["warmup"]
    # interval k is the wall time of step k + 2 (from the end of step k + 1 to the end of k + 2)
    def per_step(stamps: list[float]) -> list[float]:
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][max(0, warmup - 1):]

    measured, cpu = per_step(clock.ends), per_step(clock.cpu_ends)
    inside = [e - b for b, e in zip(clock.begins, clock.ends, strict=False)][warmup:]
    out_file.write_text(json.dumps({
        "impl": spec["impl"], "phase": spec["phase"], "steps_run": len(clock.ends),
        "step_seconds": measured, "median_step_s": median(measured),
        "step_cpu_seconds": cpu, "median_step_cpu_s": median(cpu),
        "median_in_step_s": median(inside) if inside else None,
        "peak_mb": peak / 2**20, "memory_method": clock.memory.method, **extra,
    }))


# ----------------------------------------------------------------------------- the driver


def run_child(spec: dict[str, Any], tmp: Path, threads: int) -> dict[str, Any]:
    """Run one measured training in a fresh Python process; raise with its log on failure."""
    name = f"{spec['phase']}-{spec['impl']}-{spec['repeat']}"
    spec_file, out_file, log_file = (tmp / f"{name}.{ext}" for ext in ("spec", "json", "log"))
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf-home"))
    with log_file.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file),
             "--worker-out", str(out_file)], stdout=log, stderr=subprocess.STDOUT, env=env,
            check=False,
        )
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{name} run failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    add_common_args(parser, model_help="model folder or hub id (default: a random Llama)")
    parser.add_argument("--layers", type=int, default=6, help="layers of the random Llama")
    parser.add_argument("--hidden", type=int, default=512, help="width of the random Llama")
    parser.add_argument("--vocab", type=int, default=4096,
                        help="vocabulary of the random Llama (its output layer's size)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="feedback rounds seeded (16 KTO rows and 8 DPO rows each)")
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT,
                        help="system message put before every prompt ('' for none)")
    parser.add_argument("--phases", default="kto,dpo", help="kto, dpo or kto,dpo")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each (phase, implementation); step times are pooled")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.worker_out)
        return {}
    check_common_args(parser, args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    problems = [f"unknown phase {p!r}" for p in phases if p not in PHASES]
    for name, low in (("steps", 1), ("warmup", 1), ("batch_size", 2), ("max_length", 16),
                      ("lora_r", 1), ("lora_alpha", 1), ("rounds", 1), ("repeats", 1),
                      ("layers", 1), ("hidden", 64), ("vocab", 512)):
        if getattr(args, name) < low:  # KTO needs a batch of 2 or more (its KL pairs)
            problems.append(f"--{name.replace('_', '-')} must be >= {low}")
    if problems or not phases:
        parser.error("; ".join(problems) or "--phases is empty")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(build_random_llama(
            tmp / "random-llama", hidden_size=args.hidden, num_layers=args.layers,
            vocab_size=args.vocab))
        rows = build_rows(tmp, args.rounds, args.system_prompt)
        (tmp / "rows.json").write_text(json.dumps(rows))
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for k, phase in enumerate(phases):
                # alternate which side goes first, so a drift in machine load hits both
                order = IMPLS if (k + repeat) % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    spec = {
                        "impl": impl, "phase": phase, "repeat": repeat, "model": model,
                        "rows_file": str(tmp / "rows.json"), "device": args.device,
                        "threads": args.threads, "batch_size": args.batch_size,
                        "max_length": args.max_length, "beta": args.beta,
                        "learning_rate": args.learning_rate, "lora_r": args.lora_r,
                        "lora_alpha": args.lora_alpha, "total_steps": args.warmup + args.steps,
                        "warmup": args.warmup, "seed": 0, "work_dir": str(tmp / f"trl-{phase}"),
                    }
                    print(f"  running {phase} / {impl} ...", file=sys.stderr, flush=True)
                    runs.append(run_child(spec, tmp, args.threads))
        parameters = parameter_count(model)

    results = summarize(runs, phases)
    report = {
        "benchmark": "bench_retrain",
        "model": args.model or f"random-llama-{args.layers}x{args.hidden}-v{args.vocab}",
        "parameters": parameters,
        "device": args.device,
        "torch_threads": args.threads,
        "settings": {
            "batch_size": args.batch_size, "max_length": args.max_length, "beta": args.beta,
            "learning_rate": args.learning_rate, "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha, "target_modules": "all-linear",
            "warmup_steps": args.warmup, "measured_steps": args.steps, "repeats": args.repeats,
            "kto_rows": len(rows["kto"]), "dpo_rows": len(rows["dpo"]),
        },
        "results": results,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        "note": machine_note(),
    }
    print_report(report)
    write_json(args.json, report)
    return report


def summarize(runs: list[dict[str, Any]], phases: list[str]) -> list[dict[str, Any]]:
    """One row per phase: pooled median step time and median peak memory of each side."""
    out = []
    for phase in phases:
        row: dict[str, Any] = {"phase": phase}
        for impl in IMPLS:
            mine = [r for r in runs if r["phase"] == phase and r["impl"] == impl]
            row[f"{impl}_s_per_step"] = median([s for r in mine for s in r["step_seconds"]])
            row[f"{impl}_cpu_s_per_step"] = median(
                [s for r in mine for s in r["step_cpu_seconds"]])
            row[f"{impl}_peak_mb"] = median([r["peak_mb"] for r in mine])
            row[f"{impl}_tokens_per_sequence"] = median([r["tokens_per_sequence"] for r in mine])
        row["time_ratio"] = ratio(row["ours_s_per_step"], row["trl_s_per_step"])
        row["cpu_time_ratio"] = ratio(row["ours_cpu_s_per_step"], row["trl_cpu_s_per_step"])
        row["memory_ratio"] = ratio(row["ours_peak_mb"], row["trl_peak_mb"])
        out.append(row)
    return out


def print_report(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(
        f"\nmodel {r['model']} ({r['parameters'] / 1e6:.1f}M params) on {r['device']}, "
        f"{r['torch_threads']} torch threads; LoRA r={s['lora_r']} alpha={s['lora_alpha']} "
        f"all-linear; batch {s['batch_size']}, max length {s['max_length']}, beta {s['beta']}, "
        f"lr {s['learning_rate']}; {s['kto_rows']} KTO rows, {s['dpo_rows']} DPO rows; "
        f"median of {s['measured_steps']} steps after {s['warmup_steps']} warm-up"
        + (f", {s['repeats']} repeats pooled" if s["repeats"] > 1 else "")
    )
    print_table(
        ("phase", "ours s/step", "TRL s/step", "ours/TRL", "ours CPU s/step",
         "TRL CPU s/step", "ours/TRL", "tokens/seq ours/TRL"),
        [(x["phase"], x["ours_s_per_step"], x["trl_s_per_step"], x["time_ratio"],
          x["ours_cpu_s_per_step"], x["trl_cpu_s_per_step"], x["cpu_time_ratio"],
          f"{x['ours_tokens_per_sequence']:.0f}/{x['trl_tokens_per_sequence']:.0f}")
         for x in r["results"]],
    )
    print_table(("phase", "ours peak MB", "TRL peak MB", "ours/TRL"),
                [(x["phase"], x["ours_peak_mb"], x["trl_peak_mb"], x["memory_ratio"])
                 for x in r["results"]])
    methods = sorted({run["memory_method"] for run in r["runs"]})
    print(f"s/step: wall time; CPU s/step: the process's CPU time, less sensitive to other "
          f"work on the machine; peak MB: growth of the peak memory during training "
          f"({', '.join(methods)}); {r['note']}; total {r['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
