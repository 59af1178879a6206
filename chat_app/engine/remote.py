"""A remote engine: the ``Engine`` interface over HTTP, to OpenAI-compatible engine servers.

It speaks the dialect vLLM documents for serving LoRA adapters loaded at run time:

    POST /v1/load_lora_adapter    {"lora_name": "v0007", "lora_path": "/adapters/v0007"}
    POST /v1/unload_lora_adapter  {"lora_name": "v0007"}
    POST /v1/chat/completions     {"model": "v0007" | <base model>, "messages", "stream": true, ...}
    GET  /v1/models               the base model (no "parent") and the loaded adapters

``feedback-chat engine`` (``chat_app.engine_service``) serves our own engine in the same
dialect. Versions keep their names on the engine servers (``v0007``), so every front-end
that shares an engine server and an adapters folder loads and asks for the same names.

Several servers may be given: each reply goes to the next one that is up, in turn. A
server that refuses connections or answers 5xx is taken out for ``retry_seconds`` (tried
again before then only when every server is out); when none answers, ``stream`` raises
``EngineUnavailable`` (the API answers 503). A
version is loaded on every server that is up; a server that comes back gets the loaded
versions again before it serves.

Replies (``remote_reply.RemoteGeneration``) are read by one thread each, so ``cancel()``
from any thread closes the connection and the engine server frees the slot, as with the
in-process engine.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .adapters import read_adapter_folder
from .errors import BASE_VERSION, AdapterError, EngineUnavailable
from .params import SamplingParams
from .prompts import validate_messages
from .remote_reply import RemoteGeneration, client_error, error_message

log = logging.getLogger("chat_app.engine.remote")

@dataclass
class _Server:
    url: str
    down_until: float = 0.0
    loaded: set[str] = field(default_factory=set)  # versions this server holds for us

    def up(self, now: float) -> bool:
        return now >= self.down_until


class RemoteEngine:
    """Generation on engine servers reached over HTTP (see the module docstring).

    ``urls``: the servers' base addresses (``http://host:8000``). ``model_name``: the base
    model's name, as the app stores it beside each reply. ``served_model``: the name the
    servers give the base model (their ``--served-model-name``); ``None`` asks them
    (``GET /v1/models``, the entry without a ``parent``) on first use.
    """

    def __init__(self, urls: Sequence[str], *, model_name: str, served_model: str | None = None,
                 api_key: str | None = None, connect_timeout: float = 3.0,
                 read_timeout: float = 300.0, retry_seconds: float = 5.0) -> None:
        urls = [u.strip().rstrip("/") for u in urls if u and u.strip()]
        if not urls:
            raise ValueError("a remote engine needs at least one server URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL {url!r} must start with http:// or https://")
        self.model_name = model_name
        self.device = "remote"
        self.quantized = False
        self._served = served_model
        self._servers = [_Server(u) for u in urls]
        self._turn = itertools.count()
        self._retry = retry_seconds
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(
            read_timeout, connect=connect_timeout))
        self._lock = threading.Condition()
        self._active = BASE_VERSION
        self._paths: dict[str, str] = {}  # loaded version -> adapter folder
        self._unloading: set[str] = set()
        self._in_flight: dict[str, int] = {}
        self._closed = False

    # -- versions ----------------------------------------------------------------------

    @property
    def active_version(self) -> str:
        return self._active

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return [BASE_VERSION, *self._paths]

    def in_flight(self, version: str | None = None) -> int:
        with self._lock:
            if version is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(version, 0)

    def load_adapter(self, version: str, path: str | Path) -> None:
        """Check the folder here, then have every server that is up load it as ``version``.

        A server that already holds ``version`` (another front-end loaded it) counts as
        loaded. ``AdapterError`` if the folder is bad, the name is taken here, or a server
        refuses it; ``EngineUnavailable`` if no server is up."""
        if not isinstance(version, str) or not version.strip() or version == BASE_VERSION:
            raise AdapterError(f"an adapter version must be a non-empty name other than "
                               f"{BASE_VERSION!r}, got {version!r}")
        folder = read_adapter_folder(path)
        with self._lock:
            self._check_open()
            if version in self._paths:
                raise AdapterError(f"adapter version {version!r} is already loaded")
        reached = 0
        for server in self._servers:
            try:
                self._load_on(server, version, str(folder.path.resolve()))
                reached += 1
            except EngineUnavailable:
                continue  # loaded when the server is back (see _bring_up)
        if not reached:
            raise EngineUnavailable("no engine server answers; the adapter was not loaded")
        with self._lock:
            self._paths[version] = str(folder.path.resolve())
        log.info("loaded adapter version %s on %d engine server(s)", version, reached)

    def activate(self, version: str) -> None:
        """New requests go to ``version`` (``BASE_VERSION``: the bare base)."""
        with self._lock:
            if version != BASE_VERSION and version not in self._paths:
                raise AdapterError(f"adapter version {version!r} is not loaded")
            self._unloading.discard(version)
            self._active = version
        log.info("active version is now %s", version)

    def unload_adapter(self, version: str, *, wait: bool = True,
                       timeout: float | None = None) -> None:
        """Unload ``version`` from the servers once this front-end's replies on it ended."""
        with self._lock:
            if version == BASE_VERSION:
                raise AdapterError("the base cannot be unloaded")
            if version not in self._paths:
                raise AdapterError(f"adapter version {version!r} is not loaded")
            if version == self._active:
                raise AdapterError(
                    f"adapter version {version!r} is active; activate another version first")
            self._unloading.add(version)
        if not wait:
            threading.Thread(target=self._unload_when_idle, args=(version, None),
                             daemon=True, name=f"unload-{version}").start()
            return
        self._unload_when_idle(version, timeout)

    def _unload_when_idle(self, version: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._in_flight.get(version, 0) and version in self._unloading:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"adapter version {version!r} is still used by "
                        f"{self._in_flight[version]} replies after {timeout} s; it will be "
                        "unloaded when they end")
                self._lock.wait(left)
            if version not in self._unloading:
                raise AdapterError(f"the unload of {version!r} was called off: it was "
                                   "activated again")
            self._unloading.discard(version)
            self._paths.pop(version, None)
        for server in self._servers:
            if version in server.loaded:
                server.loaded.discard(version)
                try:
                    self._post(server, "/v1/unload_lora_adapter", {"lora_name": version})
                except (EngineUnavailable, AdapterError) as exc:
                    log.warning("could not unload %s from %s: %s", version, server.url, exc)

    # -- generation --------------------------------------------------------------------

    def stream(self, messages: list[dict], params: SamplingParams = SamplingParams(),  # noqa: B008
               *, version: str | None = None) -> RemoteGeneration:
        """Start a reply on the next server that is up; errors are raised before any text,
        as the in-process engine raises them (``EngineBusy``, ``EngineUnavailable``,
        ``InputTooLong``, ``AdapterError``, ``ValueError``)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        messages = validate_messages(messages)
        with self._lock:
            self._check_open()
            chosen = self._active if version is None else version
            if chosen != BASE_VERSION and (chosen not in self._paths
                                           or chosen in self._unloading):
                raise AdapterError(f"adapter version {chosen!r} is not loaded")
            self._in_flight[chosen] = self._in_flight.get(chosen, 0) + 1
        try:
            response, server = self._open_stream(messages, params, chosen)
        except BaseException:
            self._release(chosen)
            raise
        return RemoteGeneration(response, chosen, server.url, lambda: self._release(chosen))

    def _release(self, version: str) -> None:
        with self._lock:
            self._in_flight[version] -= 1
            if not self._in_flight[version]:
                del self._in_flight[version]
            self._lock.notify_all()

    def _open_stream(self, messages: list[dict], params: SamplingParams,
                     version: str) -> tuple[httpx.Response, _Server]:
        body: dict[str, Any] = {
            "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        last: Exception | None = None
        for server in self._candidates():
            try:
                self._bring_up(server)
                body["model"] = self._model_for(server, version)
                request = self._client.build_request("POST", server.url + "/v1/chat/completions",
                                                     json=body)
                response = self._client.send(request, stream=True)
            except (httpx.TransportError, EngineUnavailable) as exc:
                self._mark_down(server, exc)
                last = exc
                continue
            if response.status_code == 404 and version != BASE_VERSION:
                response.close()  # the server lost the version (restarted): load it again
                server.loaded.discard(version)
                try:
                    self._bring_up(server)
                    response = self._client.send(request, stream=True)
                except (httpx.TransportError, EngineUnavailable) as exc:
                    self._mark_down(server, exc)
                    last = exc
                    continue
            if response.status_code >= 500:
                message = error_message(response)
                self._mark_down(server, RuntimeError(message))
                last = EngineUnavailable(message)
                continue
            if response.status_code != 200:
                raise client_error(response)
            return response, server
        raise EngineUnavailable(
            f"no engine server answers ({len(self._servers)} configured; last error: {last}); "
            "try again shortly")

    def _candidates(self) -> list[_Server]:
        """The servers that are up, starting with the next one in turn; when every one
        is left out, all of them, the soonest due first: one failure of a lone server
        must not turn away every request until its retry time (a dead server refuses
        the connection at once, so the answer is still a quick 503)."""
        now = time.monotonic()
        up = [s for s in self._servers if s.up(now)]
        if not up:
            return sorted(self._servers, key=lambda s: s.down_until)
        start = next(self._turn) % len(up)
        return up[start:] + up[:start]

    def _mark_down(self, server: _Server, exc: BaseException) -> None:
        log.warning("engine server %s is out for %.0f s: %s", server.url, self._retry, exc)
        server.down_until = time.monotonic() + self._retry
        server.loaded.clear()  # it may come back without our versions

    def _bring_up(self, server: _Server) -> None:
        """Load on ``server`` the versions it does not hold yet."""
        with self._lock:
            wanted = {v: p for v, p in self._paths.items() if v not in server.loaded}
        for version, path in wanted.items():
            self._load_on(server, version, path)

    def _load_on(self, server: _Server, version: str, path: str) -> None:
        try:
            self._post(server, "/v1/load_lora_adapter",
                       {"lora_name": version, "lora_path": path})
        except AdapterError as exc:
            if "already" not in str(exc).lower():
                raise
        server.loaded.add(version)

    def _model_for(self, server: _Server, version: str) -> str:
        if version != BASE_VERSION:
            return version
        if self._served is None:
            try:
                answer = self._client.get(server.url + "/v1/models")
            except httpx.TransportError as exc:
                raise EngineUnavailable(f"{server.url}: {exc}") from exc
            data = answer.json().get("data", []) if answer.status_code == 200 else []
            bases = [m["id"] for m in data if isinstance(m, dict) and not m.get("parent")]
            if not bases:
                raise EngineUnavailable(f"{server.url}/v1/models names no base model")
            self._served = bases[0]
        return self._served

    def _post(self, server: _Server, path: str, body: dict) -> None:
        try:
            response = self._client.post(server.url + path, json=body)
        except httpx.TransportError as exc:
            self._mark_down(server, exc)
            raise EngineUnavailable(f"{server.url}: {exc}") from exc
        if response.status_code >= 500:
            raise EngineUnavailable(f"{server.url}{path}: {error_message(response)}")
        if response.status_code != 200:
            raise AdapterError(f"{server.url}{path}: {error_message(response)}")

    # -- lifecycle ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")

    def close(self) -> None:
        """Stop using the servers (they keep running; loaded versions stay there)."""
        with self._lock:
            self._closed = True
        self._client.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
