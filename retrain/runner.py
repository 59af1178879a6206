"""Start training rounds out of the serving process.

``start_round`` claims the cluster-wide run slot (RunInProgress if taken), then
runs ``python -m retrain.worker`` as a child process with its log in
``ADAPTERS_DIR/../runs/run-N.log``. Whatever happens to the child, a crash, an
out-of-memory kill, a SIGKILL, the run ends in a final state: if the worker could
not say so itself, the parent marks it failed with the exit code and the log tail.
The other way round, a worker whose parent dies (a trainer or server killed mid-round)
marks its run failed and exits (``retrain.worker``, ``PARENT_ENV``), so the run slot
is freed at once rather than when the heartbeat goes stale.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from feedback_store import FeedbackStore, TrainingRun

from .config import RetrainSettings
from .worker import PARENT_ENV

log = logging.getLogger(__name__)
FINAL = ("succeeded", "failed", "rejected")


def _log_path(settings: RetrainSettings, run_id: int) -> Path:
    runs = Path(settings.adapters_dir).resolve().parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return runs / f"run-{run_id}.log"


def start_round(
    *,
    settings: RetrainSettings | dict[str, Any],
    trigger: str = "manual",
    wait: bool = True,
    requested_by: str | None = None,
    env: dict[str, str] | None = None,
) -> TrainingRun:
    """Start one round in a child process; wait for it (default) or return at once.

    Raises feedback_store.RunInProgress when a run is already queued or running.
    """
    settings = RetrainSettings.coerce(settings)
    store = FeedbackStore.open(settings.database_url)
    reg = store.registry
    try:
        reaped = reg.reap_stale_runs(older_than=timedelta(seconds=settings.stale_after_seconds))
        if reaped:
            log.warning("marked runs %s failed: their worker stopped answering", reaped)
        run = reg.start_run(trigger=trigger, requested_by=requested_by)
    except BaseException:
        store.close()
        raise
    logfile = _log_path(settings, run.id)
    try:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "retrain.worker", str(run.id), settings.to_json()],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())},
                start_new_session=True,
            )
    except OSError as exc:
        reg.update_run(run.id, status="failed", error=f"could not start the worker: {exc}")
        store.close()
        return reg.get_run(run.id)
    log.info("training run %d started (pid %d, log %s)", run.id, proc.pid, logfile)
    if wait:
        return _reap(store, run.id, proc, logfile)
    started = reg.get_run(run.id)
    threading.Thread(target=_reap, args=(store, run.id, proc, logfile), daemon=True,
                     name=f"run-{run.id}").start()
    return started


def _reap(store: FeedbackStore, run_id: int, proc: subprocess.Popen,
          logfile: Path) -> TrainingRun:
    try:
        return _finish(store.registry, run_id, proc, logfile)
    finally:
        store.close()


def _finish(reg: Any, run_id: int, proc: subprocess.Popen, logfile: Path) -> TrainingRun:
    code = proc.wait()
    run = reg.get_run(run_id)
    if run.status not in FINAL:
        tail = _tail(logfile)
        why = (f"killed by signal {-code}" if code < 0 else f"exited with code {code}")
        if code == -9:
            why += " (SIGKILL: often the kernel's out-of-memory killer)"
        run = reg.update_run(run_id, status="failed",
                             error=f"the training worker {why} before finishing.\n{tail}")
    log.info("training run %d ended: %s", run_id, run.status)
    return run


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
