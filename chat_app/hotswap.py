"""Hot-swap: follow the registry's active adapter version in a running server.

A background thread polls the registry (so a trainer on another process or
machine is noticed the same way). On a change it loads the new version beside
the current one, routes new requests to it, and unloads the old version once its
in-flight replies have finished. A missing or corrupt adapter folder is refused:
the current version keeps serving and the failure is logged and counted. Rollback
is the same swap in the other direction.

The canary (``feedback_store.canary``) is followed the same way: while one runs its
version is loaded beside the active one and :meth:`AdapterWatcher.version_for` sends
each conversation to the version the canary assigns it; every ``canary_check_seconds``
the watcher applies the canary's decision rule (any replica may; the database makes
the first one win), and when the canary ends its version is unloaded unless it became
the active one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedback_store import Registry, StoreError
from feedback_store.canary import CanaryState

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
                 metrics: Any | None = None, unload_timeout: float = 600.0,
                 canaries: Any | None = None, canary_check_seconds: float = 10.0) -> None:
        self.registry = registry
        self.canaries = canaries  # feedback_store.canary.Canaries; None: no canary here
        self.canary_check_seconds = canary_check_seconds
        self.canary: CanaryState | None = None  # the canary being served, once loaded
        self._next_check = 0.0
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
                if self.canaries is not None and time.monotonic() >= self._next_check:
                    self._next_check = time.monotonic() + self.canary_check_seconds
                    self.decide_canary()
                self.sync()
            except Exception:  # never let the watcher die; the next poll retries
                log.exception("adapter watcher: sync failed")

    def canary_running(self) -> bool:
        return self.canary is not None

    def canary_version(self) -> str | None:
        canary = self.canary
        return canary.version if canary is not None else None

    def version_for(self, conversation_id: int | None) -> str | None:
        """The version that serves ``conversation_id`` (None: the active one)."""
        canary = self.canary
        if canary is None or conversation_id is None:
            return None
        version = canary.version_for(conversation_id)
        return version if version == canary.version else None

    def decide_canary(self) -> dict | None:
        """Apply the running canary's rule; the ended canary's record when it ended."""
        try:
            ended = self.canaries.decide()
        except StoreError as exc:
            log.warning("canary: database unavailable (%s); deciding later", exc)
            return None
        if ended is not None:
            log.info("canary %s %s: %s", ended["version"], ended["outcome"], ended["reason"])
            if self.metrics is not None:
                self.metrics.canary_decisions.labels(ended["outcome"]).inc()
        return ended

    def sync(self) -> SwapEvent | None:
        """Bring the engine to the registry's active version and the running canary;
        returns what happened to the active version."""
        event = self._sync_active()
        if self.canaries is not None:
            self._sync_canary()
        return event

    def _sync_canary(self) -> None:
        from .engine import AdapterError

        with self._lock:
            old = self.canary
            try:
                state = self.canaries.current()
                row = (self.registry.get_version(state.version)
                       if state is not None and state != old else None)
            except StoreError as exc:
                log.warning("adapter watcher: canary state unavailable (%s)", exc)
                return
            if state is not None and state != old:
                if (state.version, row.path) in self._refused:
                    return
                try:
                    self._ensure_loaded(state.version, row.path)
                except (AdapterError, OSError, ValueError, RuntimeError) as exc:
                    self._refused.add((state.version, row.path))
                    log.error("refusing canary %s: %s; every conversation stays on %s",
                              state.version, exc, self.engine.active_version)
                    return
                self.canary = state
                log.info("canary %s serves %.0f%% of new conversations (from #%d)",
                         state.version, 100 * state.share, state.first_conversation_id)
            elif state is None and old is not None:
                self.canary = None
                log.info("canary %s ended", old.version)
            else:
                return
        if old is not None and (state is None or state.version != old.version) \
                and old.version != self.engine.active_version:
            self._unload_later(old.version)

    def _sync_active(self) -> SwapEvent | None:
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
                if target != BASE_VERSION:
                    self._ensure_loaded(target, active.path)
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
        canary = self.canary
        if current != BASE_VERSION and (canary is None or canary.version != current):
            self._unload_later(current)
        return ev

    def _ensure_loaded(self, version: str, path: str) -> None:
        """Load ``version`` from ``path`` unless the engine has it; a missing folder raises."""
        from .engine import AdapterError

        if version not in self.engine.loaded_versions():
            if not Path(path).is_dir():
                raise AdapterError(f"adapter folder {path} does not exist")
            self.engine.load_adapter(version, path)

    def _unload_later(self, version: str) -> None:
        """Unload ``version`` in the background once its last replies have finished."""
        threading.Thread(target=self._unload, args=(version,), daemon=True,
                         name=f"unload-{version}").start()

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
