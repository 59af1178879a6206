"""Run the real served app (FastAPI + Gradio + engine + store) on a free loopback port."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from chat_app.engine import Engine, EngineConfig
from chat_app.server import Services, build_services, create_app
from chat_app.settings import Settings


def wait_for(cond: Any, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``cond()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    services: Services
    settings: Settings


@contextmanager
def live_server(model_path: Path | str, data_dir: Path, *, device: str = "cpu",
                **overrides: Any) -> Iterator[LiveServer]:
    """Serve the app over ``model_path`` with its data in ``data_dir``; stop it after.
    The canary share is FEEDBACK_CHAT_CANARY_SHARE's (tests set it) unless given."""
    overrides.setdefault("canary_share", float(os.environ.get("FEEDBACK_CHAT_CANARY_SHARE",
                                                              Settings.canary_share)))
    overrides.setdefault("adapter_poll_seconds", 0.2)
    settings = replace(Settings(), data_dir=data_dir, model=str(model_path), port=free_port(),
                       scheduler=False, **overrides).validate()
    engine = None if settings.engine_urls() else Engine.from_config(EngineConfig(
        model=str(model_path), device=device, max_concurrent=settings.max_concurrent,
        max_queued=settings.max_queued))  # with engine_url: the remote engine
    services = build_services(settings, engine=engine, start_scheduler=False)
    app = create_app(services)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.1)
    try:
        yield LiveServer(url=url, services=services, settings=settings)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        services.close()
