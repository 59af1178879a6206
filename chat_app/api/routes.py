"""The HTTP API for programs.

    POST /v1/chat/completions          OpenAI-compatible (plain and streamed); id = stored reply id
    GET  /v1/models                    the base model with the active adapter version
    POST /v1/feedback                  {"reply_id", "rating": "up"|"down", "comment"?, "tags"?}
    POST /v1/replies/{id}/edit         {"content"}: the reply the user wanted (a DPO pair)
    POST /v1/replies/{id}/regenerate   a sibling reply, as a chat completion
    POST /v1/preferences               {"chosen_id", "rejected_id"}: siblings compared
    GET  /v1/replies/{id}              a reply with its siblings and feedback

Every reply is stored like one from the chat page. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input
(nothing is written), 401 for a missing or wrong API key, 429 when the engine is
full ("busy, try again"), 503 when the database or the engine servers are unreachable.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from feedback_store import Conflict, InvalidInput, NotFound, StoreUnavailable
from feedback_store.threads import append_turns, complete_reply

from ..engine import AdapterError, EngineBusy, EngineUnavailable, InputTooLong, SamplingParams
from .schemas import (
    ChatCompletionRequest,
    EditRequest,
    FeedbackRequest,
    PreferenceRequest,
    RegenerateRequest,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=headers)


# Characters that Python's str.splitlines (and so httpx's iter_lines and other SSE
# readers) treats as line ends, which json.dumps(ensure_ascii=False) leaves raw.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse_json(body: Any) -> str:
    """``body`` as JSON on one SSE line: UTF-8 text as is, but every character that
    any reader might take for a line break escaped (a random model can emit them)."""
    text = json.dumps(body, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text


def _store_errors(exc: Exception) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError(404, str(exc), code="not_found")
    if isinstance(exc, InvalidInput):
        return ApiError(400, str(exc))
    if isinstance(exc, Conflict):
        return ApiError(409, str(exc), code="conflict")
    if isinstance(exc, StoreUnavailable):
        return ApiError(503, str(exc), type="server_error", code="store_unavailable")
    raise exc


def install(app: FastAPI, services: Any) -> None:
    """Add the /v1 routes and OpenAI-style error bodies for them to ``app``."""
    app.include_router(build_router(services))

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: "
                        f"{e.get('msg')}" for e in errors[:5])
        return ApiError(400, msg or "invalid request", param=loc or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v1"):
            return ApiError(exc.status_code, str(exc.detail),
                            type="invalid_request_error").response()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


# A client's id for one write (as in Stripe's API): sent again with the same key, the
# write is not repeated and the first answer comes back.
IDEMPOTENCY_KEY = Header(None, alias="Idempotency-Key", max_length=90)


def build_router(services: Any) -> APIRouter:
    settings = services.settings
    keys = settings.api_key_set()
    key_users = settings.api_key_users()

    def require_key(request: Request) -> str | None:
        if not keys:
            return None
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in keys:
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")
        return token.strip()

    def caller(token: str | None = Depends(require_key)) -> str | None:
        """The user a 'name:key' API key acts for; None for a plain key (or none)."""
        return key_users.get(token) if token else None

    def acting(user: str | None, who: str | None) -> str | None:
        """The request's user: the key's, when it has one (a different 'user' is refused)."""
        if who is None:
            return user
        if user is not None and user != who:
            raise ApiError(403, f"this API key acts for user {who!r}: leave 'user' out or "
                           f"set it to {who!r}", type="permission_error", param="user",
                           code="user_mismatch")
        return who

    def check_owner(who: str | None, *, reply_id: Any = None,
                    conversation_id: int | None = None) -> None:
        """With a user's key, another user's reply or conversation is answered as if it
        did not exist (404, the same words as for an unknown id)."""
        if who is None:
            return
        if reply_id is not None:
            msg = store.get_message(reply_id)
            if not store.owns_conversation(msg.conversation_id, user_id=who):
                raise NotFound(f"no message with id {msg.id}")
        if conversation_id is not None and not store.owns_conversation(conversation_id,
                                                                       user_id=who):
            raise NotFound(f"no conversation with id {conversation_id}")

    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    store, engine = services.store, services.engine
    label = settings.model or "demo-model"

    def model_id(version: str) -> str:
        return f"{label}:{version}"

    def sampling(max_tokens: int | None, temperature: float | None, top_p: float | None,
                 stop: tuple[str, ...] = (), seed: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_tokens or settings.max_new_tokens,
            temperature=settings.temperature if temperature is None else temperature,
            top_p=settings.top_p if top_p is None else top_p, stop=stop, seed=seed)

    def start(messages: list[dict], params: SamplingParams,
              conversation_id: int | None = None) -> Any:
        """Start a reply on the version that serves ``conversation_id`` (a canary's
        share of conversations, else the active version)."""
        version = services.version_for(conversation_id)
        try:
            try:
                return engine.stream(messages, params, version=version)
            except AdapterError:
                if version is None:
                    raise
                # the canary ended between routing and starting: the active one answers
                return engine.stream(messages, params)
        except EngineUnavailable as exc:
            raise ApiError(503, str(exc), type="server_error",
                           code="engine_unavailable") from exc
        except EngineBusy as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="server_busy") from exc
        except InputTooLong as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded",
                           param="messages") from exc
        except AdapterError as exc:
            raise ApiError(503, str(exc), type="server_error") from exc
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc

    def begin_reply(gen: Any, params: SamplingParams, **where: Any) -> Any:
        try:
            return store.add_reply(content="", adapter_version=gen.version,
                                   model_name=engine.model_name,
                                   generation=_params(params), prompt_tokens=gen.prompt_tokens,
                                   **where)
        except Exception as exc:
            gen.cancel()
            raise _store_errors(exc) from exc

    def finish(reply_id: int, gen: Any) -> Any:
        return complete_reply(store, reply_id=reply_id, content=gen.text,
                              finish_reason=gen.finish_reason or "cancelled",
                              completion_tokens=gen.completion_tokens,
                              prompt_tokens=gen.prompt_tokens)

    def completion_body(reply: Any, gen: Any, conv_id: int, created: int) -> dict[str, Any]:
        return {
            "id": str(reply.id), "object": "chat.completion", "created": created,
            "model": model_id(gen.version), "conversation_id": conv_id,
            "adapter_version": gen.version,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": _finish(gen.finish_reason), "logprobs": None}],
            "usage": _usage(gen),
        }

    def events(reply: Any, gen: Any, conv_id: int, created: int,
               include_usage: bool) -> Iterator[str]:
        base = {"id": str(reply.id), "object": "chat.completion.chunk", "created": created,
                "model": model_id(gen.version)}

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": None}], **extra}
            return f"data: {sse_json(body)}\n\n"

        stored = False
        try:
            yield chunk({"role": "assistant", "content": ""}, conversation_id=conv_id,
                        adapter_version=gen.version)
            for piece in gen:
                yield chunk({"content": piece})
            # stored before the last chunk, so a client that saw [DONE] finds the reply whole
            stored = True
            finish(reply.id, gen)
            if gen.finish_reason == "error":
                raise RuntimeError("generation failed")
            yield chunk({}, _finish(gen.finish_reason))
            if include_usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(gen)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not stored:  # the client went away: stop generating, keep what was said
                gen.cancel()
                try:
                    finish(reply.id, gen)
                except Exception:
                    log.exception("could not store the end of reply %s", reply.id)

    def replayed(reply: Any, stream: bool) -> Any:
        """A stored reply as the answer to a request sent again."""
        created = int(reply.created_at.timestamp())
        body = {"id": str(reply.id), "object": "chat.completion", "created": created,
                "model": model_id(reply.adapter_version or "base"),
                "conversation_id": reply.conversation_id,
                "adapter_version": reply.adapter_version,
                "choices": [{"index": 0, "finish_reason": _finish(reply.finish_reason),
                             "message": {"role": "assistant", "content": reply.content},
                             "logprobs": None}],
                "usage": {"prompt_tokens": reply.prompt_tokens or 0,
                          "completion_tokens": reply.completion_tokens or 0,
                          "total_tokens": (reply.prompt_tokens or 0)
                          + (reply.completion_tokens or 0)}}
        if not stream:
            return body
        chunk = {key: value for key, value in body.items() if key != "usage"}
        chunk["object"] = "chat.completion.chunk"
        chunk["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": reply.content},
                             "finish_reason": _finish(reply.finish_reason), "logprobs": None}]
        return StreamingResponse(iter([f"data: {sse_json(chunk)}\n\n", "data: [DONE]\n\n"]),
                                 media_type="text/event-stream")

    @router.post("/chat/completions", response_model=None)
    def chat_completions(req: ChatCompletionRequest, key: str | None = IDEMPOTENCY_KEY,
                         who: str | None = Depends(caller)) -> Any:
        user = acting(req.user, who)
        problems = req.unsupported()
        if problems:
            raise ApiError(400, "; ".join(problems), code="unsupported_parameter")
        try:
            texts = [(m.role, m.text()) for m in req.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        system = "\n\n".join(t for r, t in texts if r in ("system", "developer")) or None
        turns = [(r, t) for r, t in texts if r in ("user", "assistant")]
        if not turns or turns[-1][0] != "user":
            raise ApiError(400, "the last message must be a user message", param="messages")
        for i, (_role, text) in enumerate(texts):
            if len(text) > settings.max_message_chars:
                raise ApiError(400, f"message {i} is too long: {len(text)} characters, the "
                               f"limit is {settings.max_message_chars}", param="messages")
        if not turns[-1][1].strip():
            raise ApiError(400, "the last user message is empty", param="messages")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = sampling(req.max_completion_tokens or req.max_tokens, req.temperature,
                          req.top_p, stop, req.seed)
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": r, "content": t} for r, t in turns]
        try:
            check_owner(who, conversation_id=req.conversation_id)
        except Exception as exc:
            raise _store_errors(exc) from exc
        if key is not None:  # sent before: answer with what was stored, generate nothing
            try:
                done = store.message_for_request(f"{key}/reply")
            except Exception as exc:
                raise _store_errors(exc) from exc
            if done is not None and done.finish_reason is None:
                raise ApiError(409, "the first request with this Idempotency-Key is still "
                               "being answered; try again shortly", code="request_in_progress")
            if done is not None:
                return replayed(done, req.stream)

        def store_turns() -> Any:
            return append_turns(store, turns=turns, system_prompt=system,
                                conversation_id=req.conversation_id, user_id=user,
                                request_id=f"{key}/user" if key else None)

        if not services.canary_running():
            gen = start(prompt, params)
            try:
                conv, user_msg = store_turns()
            except Exception as exc:
                gen.cancel()
                raise _store_errors(exc) from exc
        else:  # the conversation's id picks the version: store the turns first
            try:
                conv, user_msg = store_turns()
            except Exception as exc:
                raise _store_errors(exc) from exc
            gen = start(prompt, params, conv.id)
        reply = begin_reply(gen, params, parent_id=user_msg.id,
                            request_id=f"{key}/reply" if key else None)
        created = int(time.time())
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(events(reply, gen, conv.id, created, include),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            for _ in gen:
                pass
        finally:
            finish(reply.id, gen)
        if gen.finish_reason == "error":
            raise ApiError(500, "generation failed", type="server_error")
        return completion_body(reply, gen, conv.id, created)

    @router.get("/models")
    def models() -> dict[str, Any]:
        """The active version, and the canary while one runs (with its share)."""
        entry = {"object": "model", "created": int(services.started_at),
                 "owned_by": "feedback-chat", "base_model": label}
        data = [{**entry, "id": model_id(engine.active_version),
                 "adapter_version": engine.active_version, "role": "active"}]
        canary = services.watcher.canary if services.watcher is not None else None
        if canary is not None:
            data.append({**entry, "id": model_id(canary.version),
                         "adapter_version": canary.version, "role": "canary",
                         "share": canary.share})
        return {"object": "list", "data": data}

    @router.post("/feedback")
    def feedback(req: FeedbackRequest, key: str | None = IDEMPOTENCY_KEY,
                 who: str | None = Depends(caller)) -> dict[str, Any]:
        user = acting(req.user, who)
        try:
            check_owner(who, reply_id=req.reply_id)
            if req.rating is None:
                if req.comment is None:
                    raise InvalidInput("give a rating ('up' or 'down'), a comment, or both")
                ev = store.comment(reply_id=req.reply_id, comment=req.comment, tags=req.tags,
                                   user_id=user, request_id=key)
            else:
                ev = store.rate(reply_id=req.reply_id, rating=req.rating, comment=req.comment,
                                tags=req.tags, user_id=user, request_id=key)
        except Exception as exc:
            raise _store_errors(exc) from exc
        return {"event": _event(ev)}

    @router.post("/replies/{reply_id}/edit")
    def edit(reply_id: str, req: EditRequest, key: str | None = IDEMPOTENCY_KEY,
             who: str | None = Depends(caller)) -> dict[str, Any]:
        user = acting(req.user, who)
        try:
            check_owner(who, reply_id=reply_id)
            new, ev = store.edit_reply(reply_id=reply_id, content=req.content, user_id=user,
                                       request_id=key)
        except Exception as exc:
            raise _store_errors(exc) from exc
        return {"reply": _message(new), "event": _event(ev)}

    @router.post("/replies/{reply_id}/regenerate")
    def regenerate(reply_id: str, req: RegenerateRequest | None = None,
                   who: str | None = Depends(caller)) -> dict[str, Any]:
        req = req or RegenerateRequest()
        try:
            check_owner(who, reply_id=reply_id)
            original = store.get_message(reply_id)
            if not original.is_reply:
                raise InvalidInput(f"message {reply_id} is a {original.role} message, not a reply")
            context = store.context(original.parent_id)
            conv = store.get_conversation(original.conversation_id)
        except Exception as exc:
            raise _store_errors(exc) from exc
        prompt = ([{"role": "system", "content": conv.system_prompt}] if conv.system_prompt
                  else []) + [{"role": m.role, "content": m.content} for m in context]
        params = sampling(req.max_tokens, req.temperature, req.top_p, seed=req.seed)
        gen = start(prompt, params, conv.id)
        reply = begin_reply(gen, params, source_reply_id=original.id)
        try:
            for _ in gen:
                pass
        finally:
            finish(reply.id, gen)
        return completion_body(reply, gen, conv.id, int(time.time()))

    @router.post("/preferences")
    def preferences(req: PreferenceRequest, key: str | None = IDEMPOTENCY_KEY,
                    who: str | None = Depends(caller)) -> dict[str, Any]:
        user = acting(req.user, who)
        try:
            check_owner(who, reply_id=req.chosen_id)
            check_owner(who, reply_id=req.rejected_id)
            ev = store.choose(chosen_id=req.chosen_id, rejected_id=req.rejected_id,
                              user_id=user, request_id=key)
        except Exception as exc:
            raise _store_errors(exc) from exc
        return {"event": _event(ev)}

    @router.get("/replies/{reply_id}")
    def reply(reply_id: str, who: str | None = Depends(caller)) -> dict[str, Any]:
        try:
            check_owner(who, reply_id=reply_id)
            msg = store.get_message(reply_id)
            if not msg.is_reply:
                raise InvalidInput(f"message {reply_id} is a {msg.role} message, not a reply")
            siblings = store.siblings(msg.id)
            evs = store.events_for(msg.id)
        except Exception as exc:
            raise _store_errors(exc) from exc
        return {"reply": _message(msg), "siblings": [s.id for s in siblings],
                "events": [_event(e) for e in evs]}

    return router


def _params(p: SamplingParams) -> dict[str, Any]:
    return {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
            "stop": list(p.stop), "seed": p.seed}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(gen: Any) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else list(v) if isinstance(v, tuple)
                else v) for k, v in d.items()}


def _event(ev: Any) -> dict[str, Any]:
    return _jsonable(asdict(ev))


def _message(m: Any) -> dict[str, Any]:
    return _jsonable(asdict(m))
