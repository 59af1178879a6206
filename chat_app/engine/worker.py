"""The thread that owns the model and advances every running reply, step by step.

Each loop: run queued adapter commands, delete adapter versions no reply uses any more,
drop cancelled replies, admit waiting replies up to ``max_concurrent`` (one left-padded
prefill for all of them), then one decode step: one batched forward over every running
reply, a token for each, text out to each reader. Replies therefore interleave; none waits
for another to finish. Replies on different adapter versions share the batch (PEFT's mixed
batch: one base forward, each adapter's LoRA applied to its own rows). Only this thread
touches the model, so the PEFT model's global adapter state is never raced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .adapters import AdapterSet
from .batch import SequenceBatch
from .generation import Request
from .sampling import choose_tokens

log = logging.getLogger("chat_app.engine")


@dataclass
class Command:
    """Work that must run on the model's thread (adapter load); ``future`` gets the outcome."""

    run: Callable[[], None]
    future: Future[None] = field(default_factory=Future)


@dataclass
class Shared:
    """State shared by callers and the worker; every field is guarded by ``cond``."""

    cond: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))
    waiting: deque[Request] = field(default_factory=deque)
    commands: deque[Command] = field(default_factory=deque)
    in_flight: Counter[str] = field(default_factory=Counter)
    unfinished: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # version -> PEFT adapter name
    unloading: dict[str, threading.Event] = field(default_factory=dict)
    closed: bool = False

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """End ``request`` once: record the reason, free its slot, wake waiters."""
        with self.cond:
            if request.finished.is_set():
                return
            request.close(reason, error)
            self.in_flight[request.version] -= 1
            if self.in_flight[request.version] <= 0:
                del self.in_flight[request.version]
            self.unfinished -= 1
            self.cond.notify_all()

    def purge_cancelled(self) -> None:
        """Finish waiting requests whose readers went away (call with ``cond`` held)."""
        for request in [r for r in self.waiting if r.cancel_requested]:
            self.waiting.remove(request)
            self.finish(request, "cancelled")


class Worker(threading.Thread):
    """Runs the model for all requests; see the module docstring for one loop."""

    def __init__(
        self,
        shared: Shared,
        adapters: AdapterSet,
        *,
        device: str,
        pad_id: int,
        stop_ids: frozenset[int],
        max_concurrent: int,
        prefill_budget: int,
    ) -> None:
        super().__init__(name="chat-engine-worker", daemon=True)
        self.shared = shared
        self.adapters = adapters
        self.device = device
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.max_concurrent = max_concurrent
        self.prefill_budget = prefill_budget
        self.batch: SequenceBatch | None = None
        self.running: list[Request] = []  # row i of the batch is running[i]

    def run(self) -> None:
        shared = self.shared
        while True:
            with shared.cond:
                while not (
                    shared.closed
                    or shared.waiting
                    or shared.commands
                    or self.running
                    or self._unloadable()
                ):
                    shared.cond.wait()
                if shared.closed:
                    break
                commands = list(shared.commands)
                shared.commands.clear()
                unloads = self._unloadable()
                shared.purge_cancelled()
                admitted = self._admit()
            for command in commands:
                self._run_command(command)
            for version in unloads:
                self._unload(version)
            try:
                self._drop_cancelled()
                self._prefill(admitted)
                self._decode()
            except Exception as exc:  # keep serving: fail only the replies in hand
                running, self.running, self.batch = self.running, [], None
                self._fail(admitted + running, exc)
        self._shutdown()

    # -- bookkeeping -------------------------------------------------------------------

    def _unloadable(self) -> list[str]:
        return [v for v in self.shared.unloading if self.shared.in_flight[v] == 0]

    def _admit(self) -> list[Request]:
        """Take waiting requests for free slots, up to the prefill token budget."""
        admitted: list[Request] = []
        free = self.max_concurrent - len(self.running)
        tokens = 0
        while self.shared.waiting and len(admitted) < free:
            size = len(self.shared.waiting[0].prompt_ids)
            if admitted and tokens + size > self.prefill_budget:
                break
            admitted.append(self.shared.waiting.popleft())
            tokens += size
        return admitted

    def _run_command(self, command: Command) -> None:
        try:
            command.run()
        except BaseException as exc:  # the caller re-raises it in its own thread
            command.future.set_exception(exc)
        else:
            command.future.set_result(None)

    def _unload(self, version: str) -> None:
        with self.shared.cond:
            # re-checked under the lock: Engine.activate may have called the unload off
            if version not in self.shared.unloading or self.shared.in_flight[version]:
                return
            name = self.shared.adapters.pop(version, None)
            event = self.shared.unloading.pop(version)
        try:
            if name is not None:
                self.adapters.delete(name)
        except Exception:
            log.exception("deleting adapter version %s failed", version)
        with self.shared.cond:
            self.shared.cond.notify_all()
        event.set()

    def _drop_cancelled(self) -> None:
        if any(r.cancel_requested for r in self.running):
            for request in self.running:
                if request.cancel_requested:
                    self.shared.finish(request, "cancelled")
            self._keep_rows([i for i, r in enumerate(self.running) if not r.cancel_requested])

    def _keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self.batch, self.running = None, []
        elif len(rows) < len(self.running) and self.batch is not None:
            self.batch = self.batch.keep(rows)
            self.running = [self.running[i] for i in rows]

    # -- model work --------------------------------------------------------------------

    def _forward(self, requests: list[Request]) -> Callable[..., Any]:
        return partial(self.adapters.forward, [r.adapter for r in requests])

    def _prefill(self, admitted: list[Request]) -> None:
        if not admitted:
            return
        try:
            with torch.inference_mode():
                batch, logits = SequenceBatch.prefill(
                    self._forward(admitted), [r.prompt_ids for r in admitted], self.pad_id,
                    self.device,
                )
                tokens = choose_tokens(
                    logits, [r.params for r in admitted], [r.generator for r in admitted]
                )
        except Exception as exc:
            self._fail(admitted, exc)
            return
        rows = self._advance(admitted, tokens)
        if not rows:
            return
        batch.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        batch = batch.keep(rows) if len(rows) < len(admitted) else batch
        self.batch = batch if self.batch is None else self.batch.merge(batch)
        self.running.extend(admitted[i] for i in rows)

    def _decode(self) -> None:
        if self.batch is None:
            return
        try:
            with torch.inference_mode():
                logits = self.batch.step(self._forward(self.running))
                tokens = choose_tokens(
                    logits,
                    [r.params for r in self.running],
                    [r.generator for r in self.running],
                )
        except Exception as exc:
            running, self.running, self.batch = self.running, [], None
            self._fail(running, exc)
            return
        self.batch.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self._keep_rows(self._advance(self.running, tokens))

    def _advance(self, requests: list[Request], tokens: list[int]) -> list[int]:
        """Record each row's new token; return the rows that go on generating."""
        going: list[int] = []
        for row, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            request.completion_tokens += 1
            if token in self.stop_ids:
                self._end(request, "stop")
                continue
            text, stopped = request.stop_filter.push(request.decoder.push(token))
            request.emit(text)
            if stopped:
                self.shared.finish(request, "stop")
            elif request.completion_tokens >= request.max_new_tokens:
                self._end(request, "length")
            else:
                going.append(row)
        return going

    def _end(self, request: Request, reason: str) -> None:
        """Flush held text (it may still complete a stop string) and finish."""
        text, stopped = request.stop_filter.push(request.decoder.flush())
        request.emit(text)
        if stopped:
            reason = "stop"
        else:
            request.emit(request.stop_filter.flush())
        self.shared.finish(request, reason)

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        log.error("generation step failed for %d request(s)", len(requests), exc_info=exc)
        message = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        for request in requests:
            self.shared.finish(request, "error", f"{type(exc).__name__}: {message}")

    def _shutdown(self) -> None:
        with self.shared.cond:
            waiting = list(self.shared.waiting)
            self.shared.waiting.clear()
            commands = list(self.shared.commands)
            self.shared.commands.clear()
        for request in waiting + self.running:
            self.shared.finish(request, "cancelled")
        self.batch, self.running = None, []
        for command in commands:
            command.future.set_exception(RuntimeError("the engine was closed"))
        with self.shared.cond:
            unloading = list(self.shared.unloading.values())
            self.shared.unloading.clear()
        for event in unloading:  # nothing is served any more: release anyone waiting
            event.set()
