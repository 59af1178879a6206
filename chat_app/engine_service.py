"""``feedback-chat engine``: our engine alone, as an OpenAI-compatible server that loads
LoRA adapters at run time, in the dialect vLLM documents (so front-ends talk to it and to
vLLM the same way, through ``chat_app.engine.remote.RemoteEngine``):

    GET  /health (or /healthz)         200 once the model is loaded
    GET  /v1/models                    the base model, then each loaded adapter ("parent": base)
    POST /v1/load_lora_adapter         {"lora_name", "lora_path"}
    POST /v1/unload_lora_adapter       {"lora_name"}; done once the replies on it end
    POST /v1/chat/completions          {"model": base or adapter name, "messages", "stream", ...}

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input (``context_length_exceeded`` when the newest turn does not fit), 404 for an unknown
model, 429 when every slot and queue place is taken. A streamed reply whose client goes
away is cancelled and its slot freed. The first chunk of a stream also carries
``prompt_tokens`` and ``trimmed_turns`` (fields other clients ignore).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import BASE_VERSION, AdapterError, EngineBusy, InputTooLong, SamplingParams

log = logging.getLogger(__name__)


class _Message(BaseModel):
    role: str
    content: str


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)


class _LoadRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)


class _UnloadRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)


def _error(status: int, message: str, *, type: str = "invalid_request_error",
           code: str | None = None, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": type, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def create_engine_app(engine: Any, *, served_model: str, defaults: SamplingParams | None = None,
                      api_keys: frozenset[str] = frozenset()) -> FastAPI:
    """The engine server's app over ``engine`` (a ``chat_app.engine.Engine``), naming the
    base model ``served_model``. With ``api_keys``, every route but /health needs one."""
    defaults = defaults or SamplingParams()
    app = FastAPI(title="feedback-chat engine", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if api_keys and request.url.path not in ("/health", "/healthz"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in api_keys:
                return _error(401, "missing or invalid API key", type="authentication_error",
                              code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None)

    def version_of(model: str) -> str:
        if model == served_model:
            return BASE_VERSION
        if model == BASE_VERSION or model not in engine.loaded_versions():
            raise LookupError(f"The model `{model}` does not exist.")
        return model

    @app.get("/health")
    @app.get("/healthz")  # the name the front-ends' health check uses
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        entry = {"object": "model", "created": started, "owned_by": "feedback-chat"}
        data = [{**entry, "id": served_model, "root": served_model, "parent": None}]
        data += [{**entry, "id": v, "root": v, "parent": served_model}
                 for v in engine.loaded_versions() if v != BASE_VERSION]
        return {"object": "list", "data": data}

    loading = threading.Lock()

    @app.post("/v1/load_lora_adapter", response_model=None)
    def load(req: _LoadRequest) -> Any:
        if req.lora_name in (served_model, BASE_VERSION):
            return _error(400, f"{req.lora_name!r} names the base model", param="lora_name")
        # one load at a time: a second front-end asking for a version being loaded waits,
        # then hears it is loaded (and can use it at once), never "loaded" too early
        with loading:
            if req.lora_name in engine.loaded_versions():
                return _error(400, f"The lora adapter '{req.lora_name}' has already been "
                              "loaded.", param="lora_name")
            try:
                engine.load_adapter(req.lora_name, req.lora_path)
            except AdapterError as exc:
                return _error(400, str(exc), param="lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_model=None)
    def unload(req: _UnloadRequest) -> Any:
        try:
            engine.unload_adapter(req.lora_name, wait=False)
        except AdapterError as exc:
            return _error(404 if "not loaded" in str(exc) else 400, str(exc), param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions", response_model=None)
    def chat(req: _ChatRequest) -> Any:
        try:
            version = version_of(req.model)
        except LookupError as exc:
            return _error(404, str(exc), type="NotFoundError", param="model",
                          code="model_not_found")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = SamplingParams(
            max_new_tokens=req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p, stop=stop, seed=req.seed)
        messages = [m.model_dump() for m in req.messages]
        try:
            gen = engine.stream(messages, params, version=version)
        except EngineBusy as exc:
            return _error(429, str(exc), type="rate_limit_error", code="server_busy")
        except InputTooLong as exc:
            return _error(400, str(exc), param="messages", code="context_length_exceeded")
        except AdapterError as exc:
            return _error(404, str(exc), type="NotFoundError", param="model",
                          code="model_not_found")
        except ValueError as exc:
            return _error(400, str(exc))
        created = int(time.time())
        rid = f"chatcmpl-{id(gen):x}{created}"
        if not req.stream:
            try:
                text = gen.result()
            finally:
                gen.cancel()
            if gen.finish_reason == "error":
                return _error(500, gen.error or "generation failed", type="server_error")
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": gen.finish_reason, "logprobs": None}],
                    "usage": _usage(gen)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(gen, rid, created, req.model, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _usage(gen: Any) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _events(gen: Any, rid: str, created: int, model: str, include_usage: bool) -> Iterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                     "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, prompt_tokens=gen.prompt_tokens,
                    trimmed_turns=gen.trimmed_turns)
        for piece in gen:
            yield chunk({"content": piece})
        if gen.finish_reason == "error":
            error = {"message": gen.error or "generation failed", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            yield chunk({}, gen.finish_reason)
            if include_usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(gen)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # the client went away, or the reply ended: free the slot


def serve_engine(settings: Any, *, served_model: str | None = None) -> int:
    """Load the model named by ``settings`` and serve it until interrupted."""
    import uvicorn

    from .engine import Engine
    from .model_source import resolve_model

    model = resolve_model(settings)
    engine = Engine.from_config(settings.engine_config(model))
    name = served_model or settings.model or "demo-model"
    app = create_engine_app(engine, served_model=name, defaults=SamplingParams(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p), api_keys=settings.api_key_set())
    log.info("engine serving %s as %r on %s:%s", model, name, settings.host, settings.port)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        engine.close()
    return 0
