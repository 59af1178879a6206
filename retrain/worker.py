"""One training round, run in its own process: ``python -m retrain.worker RUN_ID SETTINGS_JSON``.

Phases: snapshot the feedback (up to the newest event id), build the KTO and DPO
rows (training split; the held-out split, by prompt, is kept for the gate), train
from the active adapter, publish the candidate folder atomically, register it,
compare the candidate's sampled replies with the active version's on held-out
prompts (:func:`retrain.evaluate.evaluate_behaviour`, the model loaded as served), and
promote, hold or reject with reasons (:func:`retrain.gate.gate_decision`). Beside the
adapter goes the reply scorer the engine picks among sampled replies by
(``scorer.json``, :func:`retrain.reward_model.serving_scorer`), when its check passes. A
candidate the gate promotes becomes the canary (decision "canary": it serves a share of
new conversations until live ratings decide, :mod:`feedback_store.canary`; a canary
still running is stopped in its favour), or, with the canary off (share 0), active at
once (decision "promoted"). A held candidate stays registered as a candidate (an
operator may still promote it) and the run succeeds with decision "held"; a rejected
one makes the run "rejected". Progress and metrics are written to the run's row as it
goes, and a heartbeat thread keeps the row fresh so a dead worker is noticed.

Any failure marks the run failed with its error; the serving process is untouched.
For tests, FEEDBACK_CHAT_RETRAIN_FAULT=exception|oom|kill makes the first training
step fail in that way, and =hang makes it take ten minutes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from feedback_store import FeedbackStore, Registry
from feedback_store.reply_scorer import SCORER_FILE

from .config import RetrainSettings
from .publish import data_hash, publish, temp_dir
from .rows import ranked_own_pairs, round_rows

log = logging.getLogger("retrain.worker")
FAULT_ENV = "FEEDBACK_CHAT_RETRAIN_FAULT"
PARENT_ENV = "FEEDBACK_CHAT_WORKER_PARENT"  # the pid of the process that started the worker


def _watch_parent(settings: RetrainSettings, run_id: int, parent: int,
                  every: float = 1.0) -> None:
    """Fail the run and exit when the process that started this worker is gone (the
    worker is then re-parented, so ``os.getppid()`` changes): nobody is left to wait for
    the round, and the run slot must not stay taken until the heartbeat goes stale."""
    while os.getppid() == parent:
        time.sleep(every)
    log.error("the process that started run %d (pid %d) stopped; abandoning the round",
              run_id, parent)
    try:
        reg = FeedbackStore.open(settings.database_url).registry
        if reg.get_run(run_id).status in ("queued", "running"):
            reg.update_run(run_id, status="failed", progress={"phase": "failed"},
                           error=f"the process that started this round (pid {parent}) "
                                 "stopped before it finished; the round was abandoned")
    finally:
        os._exit(3)


class _Heartbeat:
    def __init__(self, registry: Registry, run_id: int, every: float) -> None:
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(registry, run_id, every), daemon=True)

    def _loop(self, registry: Registry, run_id: int, every: float) -> None:
        while not self._stop.wait(every):
            try:
                registry.update_run(run_id)
            except Exception:  # a missed heartbeat is not fatal; the next one retries
                log.warning("heartbeat failed", exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


def _inject_fault() -> None:
    fault = os.environ.get(FAULT_ENV)
    if fault == "exception":
        raise RuntimeError(f"injected training failure ({FAULT_ENV}=exception)")
    if fault == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected by " + FAULT_ENV + ")")
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":  # a round that takes long: something to interrupt
        time.sleep(600)


def run_round(run_id: int, settings: RetrainSettings) -> str:
    """Execute run ``run_id``; returns its final status."""
    from .budget import probe_prompts
    from .evaluate import evaluate_behaviour
    from .gate import gate_decision
    from .onpolicy import SCORER_Z
    from .reward_model import serving_scorer
    from .train import train_round

    store = FeedbackStore.open(settings.database_url)
    reg = store.registry
    reg.update_run(run_id, status="running", progress={"phase": "preparing"})
    with _Heartbeat(reg, run_id, settings.heartbeat_seconds):
        train_cfg = settings.train_config()
        gate_cfg = settings.gate_config()
        canary_cfg = settings.canary_config()
        last_event = store.last_event_id() or 0
        rows = round_rows(store, last_event, settings.eval_fraction)
        kto, dpo, heldout_kto, heldout_dpo, asked = (
            rows.kto, rows.dpo, rows.heldout_kto, rows.heldout_dpo, rows.asked)
        reg.update_run(run_id, kto_rows=len(kto), dpo_rows=len(dpo), last_event_id=last_event,
                       metrics={"heldout_kto_rows": len(heldout_kto),
                                "heldout_dpo_rows": len(heldout_dpo),
                                "heldout_prompts_asked": len(asked)})
        if not kto and not dpo:
            reg.update_run(run_id, status="failed",
                           error="no training rows yet: rate or edit some replies first")
            return "failed"

        parent = reg.active_version()
        adapters_dir = Path(settings.adapters_dir)
        version = reg.next_version_name()
        tmp = temp_dir(adapters_dir, version)
        first_step = [True]

        def progress(rec: dict[str, Any]) -> None:
            if first_step[0]:
                first_step[0] = False
                _inject_fault()
            reg.update_run(run_id, progress=rec, history=[rec])

        t0 = time.perf_counter()
        probes = probe_prompts([*heldout_kto, *heldout_dpo, *({"prompt": p} for p in asked)],
                               train_cfg.kl_probe_prompts, train_cfg.seed)
        if train_cfg.processes > 1:
            from .distributed import train_data_parallel

            reg.update_run(run_id, progress={"phase": "training",
                                             "processes": train_cfg.processes})
            _inject_fault()
            result = train_data_parallel(
                processes=train_cfg.processes, base_model=settings.model,
                parent_adapter=Path(parent.path) if parent else None, kto_rows=kto,
                dpo_rows=dpo, out_dir=tmp, config=train_cfg, probe_messages=probes,
                asked_prompts=rows.train_asked)
        else:
            result = train_round(base_model=settings.model,
                                 parent_adapter=Path(parent.path) if parent else None,
                                 kto_rows=kto, dpo_rows=dpo, out_dir=tmp, config=train_cfg,
                                 progress=progress, probe_messages=probes,
                                 asked_prompts=rows.train_asked)
        train_seconds = time.perf_counter() - t0

        reg.update_run(run_id, progress={"phase": "evaluating"})
        report = evaluate_behaviour(
            base_model=settings.model, candidate_path=tmp,
            active_path=Path(parent.path) if parent else None,
            active_label=parent.version if parent else "base",
            **rows.gate_rows(ranked_pairs=ranked_own_pairs(result.metrics)), config=gate_cfg,
            beta=train_cfg.beta, device=settings.device,
            quantize_4bit=settings.quantize_4bit, max_length=train_cfg.max_length)
        decision, reasons = gate_decision(report, gate_cfg)
        scorer, scorer_info = serving_scorer(
            [*kto, *heldout_kto], [*dpo, *heldout_dpo],
            min_accuracy=train_cfg.pair_min_accuracy, z=SCORER_Z, seed=train_cfg.seed,
            checked=report.scorer)  # the gate checked the scorer on these very rows
        if scorer is not None:
            scorer.save(tmp / SCORER_FILE)

        manifest = {
            "parent_version": parent.version if parent else None,
            # a fresh LoRA on all the feedback (start_from "base"), or the parent continued
            "trained_from": (parent.version if parent and train_cfg.start_from == "parent"
                             else "base"),
            "base_model": settings.model,
            "data_hash": data_hash(kto, dpo),
            "rows": {"kto": len(kto), "dpo": len(dpo)},
            "last_event_id": last_event,
            "train_metrics": result.metrics,
            "eval": report.to_dict(),
            "gate": {"decision": decision, "reasons": reasons},
            "scorer": scorer_info,
            "config": {k: v for k, v in vars(train_cfg).items()},
            "run_id": run_id,
        }
        while True:  # another trainer may have taken the name meanwhile: take the next
            try:
                publish(tmp, adapters_dir, version, manifest)
                break
            except FileExistsError:
                version = reg.next_version_name()
        metrics = {**{f"train/{k}": v for k, v in result.metrics.items()},
                   **report.metrics(), "train_seconds": round(train_seconds, 2),
                   "reply_scorer": 1.0 if scorer is not None else 0.0}
        reg.register_version(version=version, path=str(adapters_dir / version),
                             parent_version=manifest["parent_version"], run_id=run_id,
                             data_hash=manifest["data_hash"], metrics=metrics)
        if decision == "promote" and not canary_cfg.off:
            if store.canaries.current() is not None:
                store.canaries.end_by_hand("stopped", by=f"run {run_id}, superseded by {version}")
            store.canaries.start(version, canary_cfg, reasons=tuple(reasons))
            status, outcome = "succeeded", "canary"
        elif decision == "promote":
            reg.activate(version, reasons=reasons)
            status, outcome = "succeeded", "promoted"
        elif decision == "hold":
            reg.set_status(version, "candidate", reasons=reasons)
            status, outcome = "succeeded", "held"
        else:
            reg.set_status(version, "rejected", reasons=reasons)
            status, outcome = "rejected", "rejected"
        reg.update_run(run_id, status=status, decision=outcome, candidate_version=version,
                       reasons=reasons, metrics=metrics, progress={"phase": "done"})
        return status


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return f"out of memory during training: {exc}. Lower train batch_size or max_length."
    return f"{name}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_id, settings = int(argv[0]), RetrainSettings.coerce(__import__("json").loads(argv[1]))
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit():
        threading.Thread(target=_watch_parent, args=(settings, run_id, int(parent)),
                         daemon=True, name="watch-parent").start()
    try:
        status = run_round(run_id, settings)
        log.info("run %d finished: %s", run_id, status)
        return 0
    except BaseException as exc:  # record every failure, then exit non-zero
        traceback.print_exc()
        try:
            reg = FeedbackStore.open(settings.database_url).registry
            reg.update_run(run_id, status="failed", error=_describe(exc),
                           progress={"phase": "failed"})
        except Exception:
            log.exception("could not record the failure of run %d", run_id)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
