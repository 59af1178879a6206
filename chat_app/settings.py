"""Service settings: defaults < environment (FEEDBACK_CHAT_*) < command-line flags.

Every problem is reported at once (``SettingsError`` lists them all), so an
operator fixes a configuration in one go instead of one restart per typo.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "FEEDBACK_CHAT_"


class SettingsError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  - " + "\n  - ".join(problems))


def _meta(help: str, *, secret: bool = False) -> dict[str, Any]:
    return {"help": help, "secret": secret}


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default=Path("data"), metadata=_meta(
        "folder for the SQLite database, the demo model and the adapters"))
    database_url: str = field(default="", metadata=_meta(
        "SQLAlchemy URL; empty: a SQLite file in the data folder; postgresql://... for "
        "several machines", secret=True))
    model: str = field(default="", metadata=_meta(
        "Hugging Face model id or local path; empty: the built-in demo model"))
    adapters_dir: Path | None = field(default=None, metadata=_meta(
        "folder of adapter versions (default: DATA_DIR/adapters); share it between machines"))
    host: str = field(default="127.0.0.1", metadata=_meta("address to listen on"))
    port: int = field(default=7860, metadata=_meta("port to listen on"))
    production: bool = field(default=False, metadata=_meta(
        "production mode: operator credentials and API keys are required"))
    quantize_4bit: str = field(default="auto", metadata=_meta(
        "auto (4-bit NF4 on CUDA, full precision on CPU), on or off"))
    device: str = field(default="", metadata=_meta("cuda, cpu, ... (default: cuda if present)"))
    max_message_chars: int = field(default=4000, metadata=_meta("longest user message accepted"))
    max_new_tokens: int = field(default=256, metadata=_meta("default reply length limit"))
    temperature: float = field(default=0.7, metadata=_meta("default sampling temperature"))
    top_p: float = field(default=0.95, metadata=_meta("default nucleus sampling top-p"))
    max_input_tokens: int = field(default=2048, metadata=_meta(
        "prompt budget; the oldest turns are trimmed first"))
    max_concurrent: int = field(default=8, metadata=_meta("generations advancing at once"))
    max_queued: int = field(default=32, metadata=_meta(
        "requests waiting beyond those; more get 'busy, try again'"))
    rerank_samples: int = field(default=4, metadata=_meta(
        "replies sampled together for each one served when the adapter version has a "
        "reply scorer; the scorer's favourite is sent (1: off)"))
    engine_url: str = field(default="", metadata=_meta(
        "comma-separated engine servers (feedback-chat engine, or vLLM with runtime LoRA "
        "loading) to generate on; empty: the model runs inside this server"))
    engine_served_model: str = field(default="", metadata=_meta(
        "the base model's name on the engine servers; empty: asked from their /v1/models"))
    engine_retry_seconds: float = field(default=5.0, metadata=_meta(
        "how long an engine server that failed is left out before it is tried again"))
    engine_api_key: str = field(default="", metadata=_meta(
        "API key sent to the engine servers, if they ask for one", secret=True))
    system_prompt: str = field(default="", metadata=_meta("default system prompt"))
    down_reasons: str = field(default="Inaccurate,Off topic,Too long,Too short,Unsafe",
                              metadata=_meta(
        "comma-separated reasons a user can give with a thumbs down (stored as tags)"))
    up_reasons: str = field(default="Helpful,Clear", metadata=_meta(
        "comma-separated reasons a user can give with a thumbs up (stored as tags)"))
    users: str = field(default="", metadata=_meta(
        "chat logins 'name:password,name2:password2'; empty: no login", secret=True))
    operator_user: str = field(default="", metadata=_meta("operator console login name"))
    operator_password: str = field(default="", metadata=_meta(
        "operator console password", secret=True))
    session_secret: str = field(default="", metadata=_meta(
        "secret that protects what the chat page keeps in each browser; empty: one is made "
        "and kept in the data folder (set the same one on every replica)", secret=True))
    api_keys: str = field(default="", metadata=_meta(
        "comma-separated API keys for /v1 (required in production mode); a 'name:key' "
        "entry acts for user 'name' only: it sees and rates that user's conversations "
        "alone", secret=True))
    retrain_interval_minutes: float = field(default=60.0, metadata=_meta(
        "how often the scheduler considers a training round"))
    retrain_min_feedback: int = field(default=20, metadata=_meta(
        "new feedback events needed before a scheduled round runs"))
    scheduler: bool = field(default=True, metadata=_meta(
        "run the retraining scheduler inside this server"))
    adapter_poll_seconds: float = field(default=2.0, metadata=_meta(
        "how often the server checks the registry for a newly active adapter"))
    login_max_failures: int = field(default=5, metadata=_meta(
        "failed sign-ins per account (4x per client address) within the window before "
        "sign-in is refused for the lockout"))
    login_window_seconds: float = field(default=300.0, metadata=_meta(
        "how far back failed sign-ins count"))
    login_lockout_seconds: float = field(default=60.0, metadata=_meta(
        "how long sign-in stays refused after the last failure over the limit"))
    session_idle_minutes: float = field(default=60.0, metadata=_meta(
        "a chat-page or console sign-in unused this long must sign in again; 0: never"))
    canary_share: float = field(default=0.2, metadata=_meta(
        "share of new conversations a version that passed the gate serves before live "
        "ratings decide; 0: off, promote directly"))
    canary_min_ratings: int = field(default=40, metadata=_meta(
        "rated replies needed on each version before the canary can be decided"))
    canary_margin: float = field(default=0.0, metadata=_meta(
        "how much lower the canary's share of good replies may be and still be promoted"))
    canary_error_rate: float = field(default=0.05, metadata=_meta(
        "the chance of a wrong-direction canary decision the rule allows"))
    canary_time_limit_hours: float = field(default=24.0, metadata=_meta(
        "a canary still undecided after this long ends and the active version stays"))
    canary_max_ratings: int = field(default=2000, metadata=_meta(
        "a canary still undecided after this many ratings (both versions) ends the same way"))
    canary_compare_share: float = field(default=0.1, metadata=_meta(
        "while a canary runs, the share of finished chat-page replies shown side by side "
        "with the other version's reply to the same message, for a pick; 0: only on request"))
    canary_check_seconds: float = field(default=10.0, metadata=_meta(
        "how often the server applies the canary's decision rule"))

    @staticmethod
    def reasons(text: str) -> tuple[str, ...]:
        """A comma-separated list of reasons as a tuple, blanks dropped."""
        return tuple(r.strip() for r in text.split(",") if r.strip())

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir.resolve() / 'feedback.db'}"

    @property
    def resolved_adapters_dir(self) -> Path:
        return self.adapters_dir or self.data_dir / "adapters"

    def resolved_session_secret(self) -> str:
        """The configured secret, or one kept in DATA_DIR/.session-secret (made once)."""
        if self.session_secret:
            return self.session_secret
        import secrets

        path = self.data_dir / ".session-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(32))
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_text().strip()

    def problems(self) -> list[str]:
        p = []
        if not 1 <= self.port <= 65535:
            p.append(f"port must be 1-65535, not {self.port}")
        if self.quantize_4bit not in ("auto", "on", "off"):
            p.append(f"quantize_4bit must be auto, on or off, not {self.quantize_4bit!r}")
        for name in ("max_message_chars", "max_new_tokens", "max_input_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be at least 1")
        if self.max_queued < 0:
            p.append("max_queued must be 0 or more")
        if not 1 <= self.rerank_samples <= 16:
            p.append("rerank_samples must be 1-16")
        if not 0.0 <= self.temperature <= 5.0:
            p.append("temperature must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            p.append("top_p must be in (0, 1]")
        if self.retrain_interval_minutes <= 0:
            p.append("retrain_interval_minutes must be positive")
        if self.retrain_min_feedback < 0:
            p.append("retrain_min_feedback must be 0 or more")
        if self.adapter_poll_seconds <= 0:
            p.append("adapter_poll_seconds must be positive")
        if self.login_max_failures < 1:
            p.append("login_max_failures must be at least 1")
        if self.login_window_seconds <= 0 or self.login_lockout_seconds <= 0:
            p.append("login_window_seconds and login_lockout_seconds must be positive")
        for url in self.engine_urls():
            if not url.startswith(("http://", "https://")):
                p.append(f"engine_url {url!r} must start with http:// or https://")
        if not 0.0 <= self.canary_compare_share <= 1.0:
            p.append("canary_compare_share must be between 0 and 1")
        if self.session_idle_minutes < 0:
            p.append("session_idle_minutes must be 0 (never) or more")
        if self.engine_retry_seconds <= 0:
            p.append("engine_retry_seconds must be positive")
        if self.canary_check_seconds <= 0:
            p.append("canary_check_seconds must be positive")
        from chat_app.ui.options import reason_problems
        from feedback_store.canary import CanaryConfig

        p += reason_problems(self.reasons(self.down_reasons), self.reasons(self.up_reasons))

        p += CanaryConfig(**self.canary_dict()).problems()
        if self.users:
            try:
                self.user_logins()
            except ValueError as exc:
                p.append(str(exc))
        if bool(self.operator_user) != bool(self.operator_password):
            p.append("set both operator_user and operator_password, or neither")
        if self.production:
            if not (self.operator_user and self.operator_password):
                p.append("production mode needs FEEDBACK_CHAT_OPERATOR_USER and "
                         "FEEDBACK_CHAT_OPERATOR_PASSWORD (there is no default password)")
            elif len(self.operator_password) < 12:
                p.append("in production mode the operator password needs 12 characters or more")
            if not self.api_keys:
                p.append("production mode needs FEEDBACK_CHAT_API_KEYS for the /v1 API")
        return p

    def validate(self) -> Settings:
        problems = self.problems()
        if problems:
            raise SettingsError(problems)
        return self

    def user_logins(self) -> list[tuple[str, str]]:
        out = []
        for item in filter(None, (s.strip() for s in self.users.split(","))):
            name, sep, pw = item.partition(":")
            if not sep or not name or not pw:
                raise ValueError("users must look like 'name:password,name2:password2'")
            out.append((name, pw))
        return out

    def canary_dict(self) -> dict[str, Any]:
        """The canary settings as ``feedback_store.canary.CanaryConfig`` fields."""
        return {name: getattr(self, "canary_" + name) for name in (
            "share", "min_ratings", "margin", "error_rate", "time_limit_hours", "max_ratings")}

    def engine_config(self, model: str) -> Any:
        """The in-process engine's configuration for ``model`` (an ``EngineConfig``)."""
        from .engine import EngineConfig

        return EngineConfig(
            model=model,
            device=self.device or None,
            quantize_4bit={"auto": None, "on": True, "off": False}[self.quantize_4bit],
            max_input_tokens=self.max_input_tokens,
            max_concurrent=self.max_concurrent,
            max_queued=self.max_queued,
            rerank_samples=self.rerank_samples,
        )

    def engine_urls(self) -> list[str]:
        return [u.strip() for u in self.engine_url.split(",") if u.strip()]

    def api_key_set(self) -> frozenset[str]:
        return frozenset(self.api_key_users())

    def api_key_users(self) -> dict[str, str | None]:
        """Each API key with the user it acts for ('name:key'), or None (a plain key:
        a trusted program that says which user in each request)."""
        out: dict[str, str | None] = {}
        for item in filter(None, (k.strip() for k in self.api_keys.split(","))):
            name, sep, key = item.partition(":")
            if sep and name.strip() and key.strip():
                out[key.strip()] = name.strip()
            else:
                out[item] = None
        return out

    def public_dict(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs and the console."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and v else (
                str(v) if isinstance(v, Path) else v)
        return out


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in kind:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true/false, got {raw!r}")
    if "Path" in kind:
        return Path(raw) if raw else None if "None" in kind else Path(".")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


def retrain_settings(settings: Settings) -> dict[str, Any]:
    """The settings mapping ``retrain.start_round`` and ``retrain.start_scheduler`` take,
    from the service's settings (what the ``retrain`` command, the console's "retrain
    now" and the schedule all pass). Resolving the model builds the demo model on first
    use when none is named."""
    from .model_source import resolve_model

    return {
        "database_url": settings.resolved_database_url,
        "adapters_dir": str(settings.resolved_adapters_dir),
        "model": resolve_model(settings),
        "device": settings.device or None,
        "quantize_4bit": {"auto": None, "on": True, "off": False}[settings.quantize_4bit],
        "canary": settings.canary_dict(),
    }


def load_settings(
    overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from FEEDBACK_CHAT_* variables and ``overrides`` (flags; None = unset),
    validate them, and raise SettingsError listing every problem."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    names = {f.name: f for f in fields(Settings)}
    for name, f in names.items():
        key = ENV_PREFIX + name.upper()
        if key in environ:
            try:
                values[name] = _parse(f, environ[key])
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
    for name, v in (overrides or {}).items():
        if name not in names:
            problems.append(f"unknown setting {name!r}")
        elif v is not None:
            values[name] = Path(v) if "Path" in str(names[name].type) and isinstance(v, str) else v
    settings = Settings(**{k: v for k, v in values.items() if k in names})
    problems += settings.problems()
    if problems:
        raise SettingsError(problems)
    return settings
