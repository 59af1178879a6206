"""The served app: one FastAPI application with the Gradio chat page mounted.

    GET  /healthz    200 {"status": "ok", "adapter_version": ...} when ready, 503 if not
    GET  /metrics    Prometheus text
    /v1/...          the HTTP API for programs (see chat_app.api.routes)
    /console         the operator console (operator login; 403 when none is configured)
    /                the chat page (Gradio)

``build_services`` opens the store (migrating it), loads the model, starts the
adapter watcher and, unless turned off, the retraining scheduler; ``create_app``
assembles the HTTP app over them. Tests build both over tiny models.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from feedback_store import FeedbackStore, StoreError

from .hotswap import AdapterWatcher
from .login_limit import LoginLimiter
from .metrics import MeteredEngine, Metrics
from .settings import Settings, retrain_settings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    store: FeedbackStore
    engine: Any  # MeteredEngine over chat_app.engine.Engine
    metrics: Metrics
    watcher: AdapterWatcher | None = None
    scheduler: Any | None = None
    started_at: float = field(default_factory=time.time)

    def version_for(self, conversation_id: int | None) -> str | None:
        """The adapter version that serves ``conversation_id`` (None: the active one);
        differs from the active one only while a canary runs."""
        return self.watcher.version_for(conversation_id) if self.watcher is not None else None

    def canary_running(self) -> bool:
        return self.watcher is not None and self.watcher.canary_running()

    def canary_version(self) -> str | None:
        return self.watcher.canary_version() if self.watcher is not None else None

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.close()
        self.store.close()


def build_services(settings: Settings, *, engine: Any | None = None,
                   store: FeedbackStore | None = None, start_watcher: bool = True,
                   start_scheduler: bool | None = None) -> Services:
    from .engine import Engine

    store = store or FeedbackStore.open(settings.resolved_database_url)
    if engine is None and settings.engine_urls():
        from .engine.remote import RemoteEngine

        engine = RemoteEngine(settings.engine_urls(), model_name=settings.model or "demo-model",
                              served_model=settings.engine_served_model or None,
                              api_key=settings.engine_api_key or None,
                              retry_seconds=settings.engine_retry_seconds)
    if engine is None:
        from .model_source import resolve_model

        engine = Engine.from_config(settings.engine_config(resolve_model(settings)))
    metrics = Metrics()
    metrics.add_store_collector(store.counts)
    services = Services(settings=settings, store=store, engine=MeteredEngine(engine, metrics),
                        metrics=metrics)
    metrics.set_active(engine.active_version)
    if start_watcher:
        services.watcher = AdapterWatcher(store.registry, engine,
                                          poll_seconds=settings.adapter_poll_seconds,
                                          metrics=metrics, canaries=store.canaries,
                                          canary_check_seconds=settings.canary_check_seconds
                                          ).start()
    if start_scheduler if start_scheduler is not None else settings.scheduler:
        services.scheduler = _start_scheduler(settings)
    return services


def _start_scheduler(settings: Settings) -> Any | None:
    try:
        from retrain import start_scheduler
    except ImportError:
        log.warning("retraining is not installed here; the scheduler is off")
        return None
    return start_scheduler(settings=retrain_settings(settings),
                           interval_minutes=settings.retrain_interval_minutes,
                           min_feedback=settings.retrain_min_feedback)


def create_app(services: Services) -> FastAPI:
    import gradio as gr

    from .ui.page import PAGE_CSS, ChatPageSettings, build_chat_page

    settings = services.settings
    app = FastAPI(title="feedback-chat", version="0.1.0")
    app.state.services = services
    app.add_middleware(LoginLimiter, max_failures=settings.login_max_failures,
                       window_s=settings.login_window_seconds,
                       lockout_s=settings.login_lockout_seconds)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or ("/gradio" if "gradio" in request.url.path else "other")
        services.metrics.http_requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            services.store.db.ping()
        except StoreError as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({
            "status": "ok",
            "model": services.engine.model_name,
            "adapter_version": services.engine.active_version,
            "loaded_versions": services.engine.loaded_versions(),
            "uptime_seconds": round(time.time() - services.started_at, 1),
        })

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(services.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    from .api import install as install_api
    from .engine import SamplingParams

    install_api(app, services)
    from .console import mount_console

    mount_console(app, services)  # /console, behind the operator login
    page = build_chat_page(store=services.store, engine=services.engine, router=services,
                           settings=ChatPageSettings(
        max_message_chars=settings.max_message_chars,
        default_system_prompt=settings.system_prompt,
        down_reasons=Settings.reasons(settings.down_reasons),
        up_reasons=Settings.reasons(settings.up_reasons),
        canary_compare_share=settings.canary_compare_share,
        browser_state_secret=settings.resolved_session_secret(),
        sampling=SamplingParams(max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, top_p=settings.top_p),
    ))
    page.queue(default_concurrency_limit=settings.max_concurrent + settings.max_queued)
    logins = settings.user_logins()
    app = gr.mount_gradio_app(app, page, path="/", auth=logins or None, css=PAGE_CSS)
    if logins:
        from starlette.routing import Mount

        from .idle_sessions import IdleSessions

        for route in app.router.routes:
            if isinstance(route, Mount) and route.path == "":
                route.app = IdleSessions(route.app, idle_s=settings.session_idle_minutes * 60)
    return app


def serve(settings: Settings) -> int:
    import uvicorn

    log.info("settings: %s", settings.public_dict())
    services = build_services(settings)
    app = create_app(services)
    log.info("chat page on http://%s:%d/", settings.host, settings.port)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        services.close()
    return 0
