"""Request bodies of the HTTP API (pydantic), OpenAI-compatible where OpenAI has one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 4096


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """Plain text of the message; OpenAI's list of text parts is joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Parameters this service does not implement
    are ignored when OpenAI treats them as hints (penalties, logit_bias, metadata...)
    and refused when a client relies on them (n > 1, tools, logprobs, JSON modes)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=200)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, le=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # extension: continue this stored conversation (the id from earlier responses)
    conversation_id: int | None = Field(default=None, ge=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def unsupported(self) -> list[str]:
        problems = []
        if self.logprobs:
            problems.append("logprobs is not supported")
        if self.tools:
            problems.append("tools are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            problems.append("only response_format type 'text' is supported")
        return problems


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reply_id: int | str
    rating: Literal["up", "down"] | None = None
    comment: str | None = None
    tags: list[str] | None = None
    user: str | None = Field(default=None, max_length=200)


class EditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str
    user: str | None = Field(default=None, max_length=200)


class RegenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class PreferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chosen_id: int | str
    rejected_id: int | str
    user: str | None = Field(default=None, max_length=200)
