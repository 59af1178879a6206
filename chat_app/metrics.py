"""Prometheus metrics for the served app (text format at GET /metrics).

Generation metrics are taken by wrapping the engine (``MeteredEngine``), so every
caller, the chat page and the HTTP API alike, is measured the same way. Feedback
counts are read from the store at scrape time, so they are right across replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("feedback_chat_http_requests", "HTTP requests",
                                     ["method", "route", "status"], registry=r)
        self.generations = Counter("feedback_chat_generations", "Replies generated",
                                   ["adapter_version", "finish_reason"], registry=r)
        self.tokens = Counter("feedback_chat_generated_tokens", "Tokens generated",
                              ["adapter_version"], registry=r)
        self.prompt_tokens = Counter("feedback_chat_prompt_tokens", "Prompt tokens read", registry=r)
        self.busy = Counter("feedback_chat_busy_rejections",
                            "Requests refused because the engine queue was full", registry=r)
        self.latency = Histogram("feedback_chat_generation_seconds", "Whole-reply latency",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("feedback_chat_time_to_first_token_seconds",
                              "Time to the first streamed text", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.swaps = Counter("feedback_chat_adapter_swaps", "Adapter hot-swaps", ["result"],
                             registry=r)
        self.canary_decisions = Counter("feedback_chat_canary_decisions",
                                        "Canaries ended, by outcome", ["outcome"], registry=r)
        self.active = Gauge("feedback_chat_active_adapter", "1 for the adapter version served",
                            ["adapter_version"], registry=r)

    def add_store_collector(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_StoreCollector(counts))

    def set_active(self, version: str) -> None:
        self.active.clear()
        self.active.labels(adapter_version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self):  # type: ignore[no-untyped-def]
        g = GaugeMetricFamily("feedback_chat_feedback_events", "Feedback events stored",
                              labels=["kind"])
        try:
            counts = self._counts()
        except Exception:  # the store being down must not break /metrics
            return
        for key, n in counts.items():
            if key.startswith("events."):
                g.add_metric([key.split(".", 1)[1]], n)
        yield g
        yield GaugeMetricFamily("feedback_chat_conversations", "Conversations stored",
                                value=counts.get("conversations", 0))


class MeteredGeneration:
    """Iterates like the wrapped Generation and records its metrics at the end."""

    def __init__(self, gen: Any, metrics: Metrics) -> None:
        self._gen = gen
        self._metrics = metrics
        self._start = time.perf_counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gen, name)

    def __iter__(self) -> Iterator[str]:
        first = True
        try:
            for piece in self._gen:
                if first:
                    self._metrics.ttft.observe(time.perf_counter() - self._start)
                    first = False
                yield piece
        finally:
            m, g = self._metrics, self._gen
            m.latency.observe(time.perf_counter() - self._start)
            m.generations.labels(g.version, g.finish_reason or "cancelled").inc()
            m.tokens.labels(g.version).inc(g.completion_tokens or 0)
            m.prompt_tokens.inc(g.prompt_tokens or 0)

    def cancel(self) -> None:
        self._gen.cancel()


class MeteredEngine:
    """The engine, with ``stream`` measured; everything else passes through."""

    def __init__(self, engine: Any, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, *args: Any, **kwargs: Any) -> MeteredGeneration:
        from .engine import EngineBusy

        try:
            gen = self._engine.stream(*args, **kwargs)
        except EngineBusy:
            self._metrics.busy.inc()
            raise
        return MeteredGeneration(gen, self._metrics)
