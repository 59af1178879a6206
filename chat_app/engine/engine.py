"""The serving engine: one model, adapter versions beside it, many streaming replies at once.

Callers (chat page, HTTP API, hot-swap watcher) use ``Engine`` from any thread. Prompts are
built and checked in the caller's thread, so bad input fails at once with a typed error; the
model itself only ever runs on the engine's worker thread (see ``worker.py``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from feedback_store.reply_scorer import ReplyScorer, last_user_text

from .adapters import AdapterSet, read_adapter_folder, read_reply_scorer
from .detokenize import IncrementalDecoder
from .errors import BASE_VERSION, AdapterError, EngineBusy
from .generation import Generation, RankedGeneration, Request
from .loading import LoadedModel, load_model
from .params import EngineConfig, SamplingParams
from .prompts import PromptBuilder, validate_messages
from .sampling import make_generator
from .worker import Command, Shared, Worker

log = logging.getLogger("chat_app.engine")


class _LockedTokenizer:
    """Serialises calls into a fast tokenizer shared by caller threads and the worker."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer.decode(*args, **kwargs)


class Engine:
    """Serves one causal LM (optionally with LoRA adapter versions) to many callers.

    ``stream()`` returns a ``Generation`` at once; up to ``max_concurrent`` replies advance
    together and up to ``max_queued`` more wait, beyond which ``EngineBusy`` is raised.
    Each reply runs on the version active when it was asked for (or the one named), to its
    end, even if another version is activated meanwhile.

    ``tokenizer`` is the model's own (fast) tokenizer; the engine calls it under a lock from
    several threads, so callers that use it concurrently should prefer ``count_tokens``.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        """Serve an already loaded model; most callers want ``Engine.from_config``."""
        config.validate()
        self.config = config
        self.model_name: str = config.model
        self.device: str = loaded.device
        self.quantized: bool = loaded.quantized
        self.tokenizer = loaded.tokenizer
        self.stop_token_ids: frozenset[int] = loaded.stop_token_ids
        self.context_length: int | None = loaded.context_length
        budget = config.max_input_tokens
        if self.context_length is not None:
            budget = min(budget, self.context_length - 1)
        self.max_input_tokens: int = budget
        self._locked_tokenizer = _LockedTokenizer(loaded.tokenizer)
        self._prompts = PromptBuilder(self._locked_tokenizer, budget)
        self._shared = Shared()
        self._active = BASE_VERSION
        self._loading: set[str] = set()
        self._adapter_names = (f"v{i}" for i in itertools.count(1))
        self._adapters = AdapterSet(loaded.model)
        self._scorers: dict[str, ReplyScorer] = {}
        self._worker = Worker(
            self._shared,
            self._adapters,
            device=self.device,
            pad_id=int(loaded.tokenizer.pad_token_id),
            stop_ids=self.stop_token_ids,
            max_concurrent=config.max_concurrent,
            prefill_budget=max(budget, 1),
        )
        self._worker.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Load ``config.model`` and start serving it; ``ModelLoadError`` if it cannot be."""
        config.validate()
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        return cls(load_model(config), config)

    # -- prompts -----------------------------------------------------------------------

    def count_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens for ``messages`` as given (no trimming), generation prompt included."""
        return len(self._prompts.encode(validate_messages(messages)))

    def trim_messages(self, messages: list[dict]) -> tuple[list[dict], int]:
        """The messages a reply would be generated from, and how many old turns were dropped."""
        prompt = self._prompts.build(validate_messages(messages))
        return prompt.messages, prompt.trimmed_turns

    # -- adapters ----------------------------------------------------------------------

    def load_adapter(self, version: str, path: str | Path) -> None:
        """Load the adapter in ``path`` as ``version``, beside those already loaded.

        Raises ``AdapterError`` if the folder is missing or corrupt, the weights do not fit
        the model, or ``version`` is taken; what is being served is unchanged on failure.
        """
        if not isinstance(version, str) or not version.strip():
            raise AdapterError(f"an adapter version must be a non-empty string, got {version!r}")
        if version == BASE_VERSION:
            raise AdapterError(f"{BASE_VERSION!r} names the bare base; pick another version name")
        folder = read_adapter_folder(path)
        scorer = read_reply_scorer(folder.path)
        with self._shared.cond:
            self._check_open()
            if version in self._shared.adapters or version in self._loading:
                raise AdapterError(f"adapter version {version!r} is already loaded")
            self._loading.add(version)
            name = next(self._adapter_names)
            command = Command(lambda: self._adapters.load(name, folder))
            self._shared.commands.append(command)
            self._shared.cond.notify_all()
        try:
            command.future.result()
        finally:
            with self._shared.cond:
                self._loading.discard(version)
                if command.future.done() and command.future.exception() is None:
                    self._shared.adapters[version] = name
                    if scorer is None:
                        self._scorers.pop(version, None)
                    else:
                        self._scorers[version] = scorer
        log.info("loaded adapter version %s from %s%s", version, folder.path,
                 "" if scorer is None else " with its reply scorer")

    def activate(self, version: str) -> None:
        """Send new requests to ``version`` (``BASE_VERSION``: the bare base).

        A version whose unload is still waiting for its last replies (a rollback soon
        after a swap) stays loaded: the pending unload is called off.
        """
        cancelled = None
        with self._shared.cond:
            if version in self._shared.adapters:
                cancelled = self._shared.unloading.pop(version, None)
            self._check_servable(version)
            self._active = version
        if cancelled is not None:
            cancelled.set()  # wake the waiter; it sees the version still loaded
            log.info("unload of %s called off: it is active again", version)
        log.info("active version is now %s", version)

    @property
    def active_version(self) -> str:
        return self._active

    def loaded_versions(self) -> list[str]:
        """``BASE_VERSION`` then every loaded adapter version, oldest first."""
        with self._shared.cond:
            return [BASE_VERSION, *self._shared.adapters]

    def in_flight(self, version: str | None = None) -> int:
        """Unfinished replies (running or waiting) on ``version``, or on all versions."""
        with self._shared.cond:
            if version is None:
                return self._shared.unfinished
            return self._shared.in_flight[version]

    def unload_adapter(
        self, version: str, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Delete ``version`` once no reply uses it; new requests can no longer ask for it.

        ``wait=False`` returns at once and the deletion happens when its last reply ends.
        With ``wait=True``, a ``timeout`` that runs out raises ``TimeoutError`` (the deletion
        stays scheduled). ``AdapterError`` for the active version, the base, unknown versions.
        """
        with self._shared.cond:
            if version == BASE_VERSION:
                raise AdapterError("the base cannot be unloaded")
            if version not in self._shared.adapters:
                raise AdapterError(f"adapter version {version!r} is not loaded")
            if version == self._active:
                raise AdapterError(
                    f"adapter version {version!r} is active; activate another version first"
                )
            event = self._shared.unloading.setdefault(version, threading.Event())
            self._shared.cond.notify_all()
        if wait and not event.wait(timeout):
            raise TimeoutError(
                f"adapter version {version!r} is still used by {self.in_flight(version)} "
                f"replies after {timeout} s; it will be unloaded when they end"
            )
        if wait:
            with self._shared.cond:
                if version in self._shared.adapters and version not in self._shared.unloading:
                    raise AdapterError(
                        f"the unload of {version!r} was called off: it was activated again"
                    )

    # -- generation --------------------------------------------------------------------

    def stream(
        self,
        messages: list[dict],
        params: SamplingParams = SamplingParams(),  # noqa: B008 (frozen, so shared safely)
        *,
        version: str | None = None,
    ) -> Generation | RankedGeneration:
        """Start a reply to ``messages`` and return its ``Generation`` at once.

        When the version has a reply scorer and sampling is not greedy, up to
        ``config.rerank_samples`` replies are sampled side by side (fewer when the engine
        is nearly full) and a ``RankedGeneration`` hands out the one the scorer ranks best.

        Raises ``ValueError`` (bad messages or params), ``InputTooLong``, ``AdapterError``
        (``version`` not servable), ``EngineBusy`` (every slot and queue place taken) or
        ``RuntimeError`` (engine closed).
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        prompt = self._prompts.build(validate_messages(messages))
        max_new = params.max_new_tokens
        if self.context_length is not None:
            max_new = max(1, min(max_new, self.context_length - len(prompt.token_ids)))
        shared = self._shared
        with shared.cond:
            self._check_open()
            shared.purge_cancelled()
            capacity = self.config.max_concurrent + self.config.max_queued
            if shared.unfinished >= capacity:
                raise EngineBusy(
                    f"busy: {shared.unfinished} replies running or queued (limit {capacity}); "
                    "try again shortly"
                )
            chosen = self._active if version is None else version
            self._check_servable(chosen)
            scorer = self._scorers.get(chosen) if params.temperature > 0 else None
            # the best of n by the version's scorer; fewer when the engine is nearly full
            count = 1 if scorer is None else max(
                1, min(self.config.rerank_samples, capacity - shared.unfinished))
            requests = [
                Request(
                    version=chosen,
                    adapter=shared.adapters.get(chosen),
                    prompt_ids=prompt.token_ids,
                    params=params,
                    max_new_tokens=max_new,
                    trimmed_turns=prompt.trimmed_turns,
                    decoder=IncrementalDecoder(self._locked_tokenizer),
                    generator=make_generator(_nth_seed(params, i), self.device),
                    on_cancel=self._cancel,
                )
                for i in range(count)
            ]
            shared.waiting.extend(requests)
            shared.unfinished += count
            shared.in_flight[chosen] += count
            shared.cond.notify_all()
        if count == 1:
            return Generation(requests[0])
        asked = last_user_text(prompt.messages)
        return RankedGeneration(requests, lambda texts: scorer.best(asked, texts))

    def reply_scorer(self, version: str) -> ReplyScorer | None:
        """The reply scorer loaded with ``version`` (None: replies are not ranked)."""
        return self._scorers.get(version)

    def _cancel(self, request: Request) -> None:
        with self._shared.cond:
            self._shared.purge_cancelled()
            self._shared.cond.notify_all()

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker; unfinished replies end with ``finish_reason == "cancelled"``."""
        with self._shared.cond:
            self._shared.closed = True
            self._shared.cond.notify_all()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join()

    def __del__(self) -> None:
        # The worker holds no reference to the engine: stop it when the engine is dropped.
        shared = getattr(self, "_shared", None)
        if shared is not None and not shared.closed:
            with shared.cond:
                shared.closed = True
                shared.cond.notify_all()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._shared.closed:
            raise RuntimeError("the engine is closed")

    def _check_servable(self, version: str) -> None:
        if version == BASE_VERSION:
            return
        if version not in self._shared.adapters:
            raise AdapterError(f"adapter version {version!r} is not loaded")
        if version in self._shared.unloading:
            raise AdapterError(f"adapter version {version!r} is being unloaded")


def _nth_seed(params: SamplingParams, n: int) -> SamplingParams:
    """``params`` for the ``n``-th of several samples: a seeded request's seed plus ``n``."""
    if n == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + n)
