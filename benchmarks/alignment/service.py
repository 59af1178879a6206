"""The real service, driven the way an operator and its users drive it.

``Service`` runs ``feedback-chat serve`` as a subprocess on a free loopback port over one
data folder (its own SQLite database and adapters; the schedule is off, so rounds run only
when asked), and talks to it over HTTP. ``retrain`` runs ``feedback-chat retrain --now``
with the same settings and waits for the gate's decision; ``wait_serving`` polls
``/healthz`` until a version is served.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceError(RuntimeError):
    pass


@dataclass
class RoundResult:
    """What ``feedback-chat retrain --now`` reported, and the run row's metrics."""

    run_id: int | None
    status: str
    decision: str | None
    candidate_version: str | None
    reasons: list[str]
    error: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Service:
    """``feedback-chat serve`` over ``data_dir`` and ``model`` with ``env`` added."""

    def __init__(self, data_dir: Path, model: str, env: dict[str, str], *,
                 api_key: str = "bench-alignment", max_concurrent: int = 8,
                 device: str | None = None) -> None:
        self.data_dir, self.model = data_dir, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        # the canary is off: a round's gate decides alone (bench_canary measures the canary)
        self.env = {**os.environ, "FEEDBACK_CHAT_CANARY_SHARE": "0", **env,
                    "FEEDBACK_CHAT_API_KEYS": api_key, "TOKENIZERS_PARALLELISM": "false"}
        self.store_flags = ["--data-dir", str(data_dir), "--model", model]
        if device:
            self.store_flags += ["--device", device]
        self.serve_flags = [*self.store_flags, "--port", str(self.port), "--no-scheduler",
                            "--max-concurrent", str(max_concurrent),
                            "--max-queued", str(max(32, 4 * max_concurrent))]
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "serve.log"

    # ---------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 300) -> float:
        """Start the server and wait for /healthz; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chat_app.cli", "serve", *self.serve_flags],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"the server exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServiceError(f"the server did not answer /healthz in {timeout:.0f} s:\n"
                           + self.log_tail())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---------------------------------------------------------------------------- HTTP

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def served_version(self) -> str | None:
        body = httpx.get(self.url + "/healthz", timeout=10).json()
        return body.get("adapter_version")

    def wait_serving(self, version: str, timeout: float = 300) -> float:
        """Poll /healthz every 0.1 s until ``version`` is served; returns time.time() then."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.served_version() == version:
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise ServiceError(f"{version} was not served within {timeout:.0f} s:\n"
                           + self.log_tail())

    # ------------------------------------------------------------------------- retrain

    def retrain(self, timeout: float = 3600) -> RoundResult:
        """One round as an operator starts it: ``feedback-chat retrain --now`` (waits)."""
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "chat_app.cli", "retrain", "--now", *self.store_flags],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        out = done.stdout
        try:
            body = json.loads(out[out.index("{"):])
        except ValueError as exc:
            raise ServiceError(f"retrain printed no JSON (exit {done.returncode}):\n"
                               f"{out[-2000:]}\n{done.stderr[-3000:]}") from exc
        result = RoundResult(run_id=body.get("run"), status=body.get("status", "?"),
                             decision=body.get("decision"),
                             candidate_version=body.get("candidate_version"),
                             reasons=list(body.get("reasons") or []), error=body.get("error"),
                             seconds=seconds)
        if result.run_id is not None:
            result.metrics = self.run_metrics(result.run_id)
        return result

    def run_metrics(self, run_id: int) -> dict[str, Any]:
        from feedback_store import FeedbackStore

        store = FeedbackStore.open(self.database_url)
        try:
            run = store.registry.get_run(run_id)
            return {**run.metrics, "kto_rows": run.kto_rows, "dpo_rows": run.dpo_rows}
        finally:
            store.close()

    def active_version(self) -> str | None:
        """The registry's active version (None: the bare base is served)."""
        from feedback_store import FeedbackStore

        store = FeedbackStore.open(self.database_url)
        try:
            active = store.registry.active_version()
            return active.version if active else None
        finally:
            store.close()

    @property
    def rerank_samples(self) -> int:
        """Replies the service samples for each one it sends, when the version has a
        reply scorer (its setting, or the default)."""
        from chat_app.settings import Settings

        raw = self.env.get("FEEDBACK_CHAT_RERANK_SAMPLES")
        return int(raw) if raw else Settings().rerank_samples

    def adapter_path(self, version: str) -> Path:
        from feedback_store import FeedbackStore

        store = FeedbackStore.open(self.database_url)
        try:
            return Path(store.registry.get_version(version).path)
        finally:
            store.close()

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir.resolve() / 'feedback.db'}"
