"""``feedback-chat trainer``: the retraining schedule as a service of its own.

For a deployment where the chat front-ends run with ``FEEDBACK_CHAT_SCHEDULER=false``
and no training code: this process holds the APScheduler job (``retrain.start_scheduler``)
and starts each round in a worker process, exactly as the embedded schedule does; the
store (PostgreSQL) is the only thing it shares with the front-ends, which pick new
versions up from the registry. No model is loaded here; the worker loads it per round.

    GET /healthz   200 {"status": "ok", "schedule": {...}, "run": {...} | null}
                   503 when the database is unreachable
    GET /metrics   Prometheus text: runs by status, the run in progress, pending feedback
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from feedback_store import FeedbackStore, StoreError

from .settings import Settings, retrain_settings

log = logging.getLogger(__name__)


def create_trainer_app(store: FeedbackStore, scheduler: Any) -> FastAPI:
    """The trainer's HTTP face over ``store`` and a started ``RetrainScheduler``."""
    app = FastAPI(title="feedback-chat trainer", version="0.1.0")

    def current_run() -> dict[str, Any] | None:
        run = store.registry.current_run()
        if run is None:
            return None
        return {"id": run.id, "status": run.status, "trigger": run.trigger,
                "phase": (run.progress or {}).get("phase"),
                "started_at": run.started_at.isoformat() if run.started_at else None}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            store.db.ping()
            body = {"status": "ok", "schedule": scheduler.state(), "run": current_run()}
        except StoreError as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        try:
            runs = store.registry.list_runs(limit=1000)
            pending = scheduler.pending_feedback()
            running = current_run()
        except StoreError as exc:
            return PlainTextResponse(f"# database unavailable: {exc}\n", status_code=503)
        by_status: dict[str, int] = {}
        for run in runs:
            by_status[run.status] = by_status.get(run.status, 0) + 1
        lines = ["# HELP feedback_chat_trainer_runs Training runs (the newest 1000) by status",
                 "# TYPE feedback_chat_trainer_runs gauge"]
        lines += [f'feedback_chat_trainer_runs{{status="{s}"}} {n}'
                  for s, n in sorted(by_status.items())]
        lines += ["# HELP feedback_chat_trainer_run_in_progress 1 while a round runs",
                  "# TYPE feedback_chat_trainer_run_in_progress gauge",
                  f"feedback_chat_trainer_run_in_progress {int(running is not None)}",
                  "# HELP feedback_chat_trainer_pending_feedback Feedback events since the "
                  "last finished round", "# TYPE feedback_chat_trainer_pending_feedback gauge",
                  f"feedback_chat_trainer_pending_feedback {pending}"]
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4")

    return app


def run_trainer(settings: Settings) -> int:
    """Start the schedule and serve its health and metrics until stopped."""
    import uvicorn

    from retrain import start_scheduler

    store = FeedbackStore.open(settings.resolved_database_url)
    scheduler = start_scheduler(settings=retrain_settings(settings),
                                interval_minutes=settings.retrain_interval_minutes,
                                min_feedback=settings.retrain_min_feedback)
    log.info("trainer: schedule every %s min; health on http://%s:%d/healthz",
             settings.retrain_interval_minutes, settings.host, settings.port)
    try:
        uvicorn.run(create_trainer_app(store, scheduler), host=settings.host,
                    port=settings.port, log_level="info")
    finally:
        scheduler.shutdown()
        store.close()
    return 0
