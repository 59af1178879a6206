"""Hot-swap: follow the registry's active adapter version in a running server.

A background thread polls the registry (so a trainer on another process or
machine is noticed the same way). On a change it loads the new version beside
the current one, routes new requests to it, and unloads the old version once its
in-flight replies have finished. A missing or corrupt adapter folder is refused:
the current version keeps serving and the failure is logged and counted. Rollback
is the same swap in the other direction.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback_store import Registry, StoreError

log = logging.getLogger(__name__)


@dataclass
class SwapEvent:
    version: str
    ok: bool
    seconds: float  # from noticing the change to serving it
    error: str | None = None
    at: float = field(default_factory=time.time)  # when the swap completed (or was refused)


class AdapterWatcher:
    def __init__(self, registry: Registry, engine: Any, *, poll_seconds: float = 2.0,
                 metrics: Any | None = None, unload_timeout: float = 600.0) -> None:
        self.registry = registry
        self.engine = engine
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.unload_timeout = unload_timeout
        self.events: list[SwapEvent] = []
        self._refused: set[tuple[str, str]] = set()  # (version, path) that failed to load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> AdapterWatcher:
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="adapter-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sync()
            except Exception:  # never let the watcher die; the next poll retries
                log.exception("adapter watcher: sync failed")

    def sync(self) -> SwapEvent | None:
        """Bring the engine to the registry's active version; returns what happened."""
        from .engine import BASE_VERSION, AdapterError

        with self._lock:
            try:
                active = self.registry.active_version()
            except StoreError as exc:
                log.warning("adapter watcher: registry unavailable (%s); keep serving", exc)
                return None
            target = active.version if active else BASE_VERSION
            current = self.engine.active_version
            if target == current:
                return None
            if active is not None and (active.version, active.path) in self._refused:
                return None
            t0 = time.perf_counter()
            try:
                if target != BASE_VERSION and target not in self.engine.loaded_versions():
                    if not Path(active.path).is_dir():
                        raise AdapterError(f"adapter folder {active.path} does not exist")
                    self.engine.load_adapter(target, active.path)
                self.engine.activate(target)
            except (AdapterError, OSError, ValueError, RuntimeError) as exc:
                if active is not None:
                    self._refused.add((active.version, active.path))
                ev = SwapEvent(target, False, time.perf_counter() - t0, str(exc))
                log.error("refusing adapter %s: %s; still serving %s", target, exc, current)
                self._record(ev)
                return ev
            ev = SwapEvent(target, True, time.perf_counter() - t0)
            log.info("now serving adapter %s (was %s), swap took %.3fs", target, current,
                     ev.seconds)
            self._record(ev)
        if current != BASE_VERSION:
            threading.Thread(target=self._unload, args=(current,), daemon=True,
                             name=f"unload-{current}").start()
        return ev

    def _unload(self, version: str) -> None:
        from .engine import AdapterError

        try:
            self.engine.unload_adapter(version, wait=True, timeout=self.unload_timeout)
            log.info("unloaded adapter %s", version)
        except AdapterError as exc:  # e.g. it became active again meanwhile
            log.info("kept adapter %s loaded: %s", version, exc)

    def _record(self, ev: SwapEvent) -> None:
        self.events.append(ev)
        if self.metrics is not None:
            self.metrics.swaps.labels("ok" if ev.ok else "refused").inc()
            if ev.ok:
                self.metrics.set_active(ev.version)
