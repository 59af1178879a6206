"""Database engines, units of work and schema upgrades.

SQLite (the embedded default) is opened in WAL mode with a busy timeout and foreign
keys on; write transactions start with ``BEGIN IMMEDIATE`` so two writers queue on
the busy timeout instead of failing with "database is locked" when a read lock
cannot be upgraded. Any PostgreSQL URL works for several machines.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from .errors import StoreUnavailable

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# How long a unit of work keeps retrying transient failures (locks, lost connections).
RETRY_SECONDS = 60.0
MIGRATION_LOCK_KEY = 724_913  # PostgreSQL advisory lock id held while upgrading


def default_sqlite_url(data_dir: Path | str) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'feedback.db'}"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine; for SQLite, make the folder and set the pragmas.

    Raises StoreUnavailable when the SQLite file's folder cannot be created.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(
                    f"cannot create the database folder {folder}: {exc.strerror or exc}"
                ) from exc
        engine = create_engine(
            url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        try:  # prefer psycopg 3 when the URL names no driver and it is installed
            import psycopg  # noqa: F401

            parsed = parsed.set(drivername="postgresql+psycopg")
        except ImportError:
            pass
    return create_engine(parsed, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=40)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" event below emit BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _set_wal(cur)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        mode = "IMMEDIATE" if conn.get_execution_options().get("write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def _set_wal(cur) -> None:  # type: ignore[no-untyped-def]
    """Switch to WAL, waiting for other connections like a busy timeout would.

    On a fresh file, several processes switching at once can get "database is
    locked" at once: SQLite does not call the busy handler for that pragma.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as exc:  # sqlite3.OperationalError; the driver is not imported here
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005 + 0.02 * random.random())


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    msg = str(getattr(exc, "orig", exc)).lower()
    return any(
        s in msg
        for s in (
            "database is locked",
            "database is busy",
            "deadlock detected",
            "could not serialize",
            "server closed the connection",
            "connection refused",
            "terminating connection",
        )
    )


class Database:
    """An engine plus units of work with retries on transient failures."""

    def __init__(
        self, url: str, *, echo: bool = False, retry_seconds: float = RETRY_SECONDS
    ) -> None:
        """``retry_seconds``: how long ``run`` retries transient failures before it
        raises StoreUnavailable."""
        self.url = url
        self.retry_seconds = retry_seconds
        self.engine = make_engine(url, echo=echo)
        self.sqlite = self.engine.dialect.name == "sqlite"
        write_engine = self.engine.execution_options(write=True)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(write_engine, expire_on_commit=False)
        self._write_queue = threading.RLock()

    @contextmanager
    def session(self, *, write: bool) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any error.

        On SQLite, write transactions of this process queue on a lock first: SQLite
        lets one writer in at a time anyway, and a waiter woken by the lock starts at
        once, where one left to SQLite's busy handler sleeps in growing steps (up to
        100 ms each), which made the slowest writes wait most of a second.
        """
        factory = self._writer if write else self._reader
        queue = self._write_queue if write and self.sqlite else nullcontext()
        with queue, factory() as s, s.begin():
            yield s

    def run(self, work: Callable[[Session], T], *, write: bool = True) -> T:
        """Run ``work(session)`` as one unit of work, retrying transient failures.

        Raises StoreUnavailable when the database stays unreachable or locked.
        """
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.02
        while True:
            try:
                with self.session(write=write) as s:
                    return work(s)
            except OperationalError as exc:
                if not _is_transient(exc) or time.monotonic() > deadline:
                    raise StoreUnavailable(f"the database is unavailable: {exc.orig}") from exc
            except DBAPIError as exc:
                if not _is_transient(exc) or time.monotonic() > deadline:
                    raise
            except PoolTimeout as exc:  # every pooled connection stayed busy
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"the database is too busy: {exc}") from exc
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)

    def ping(self) -> None:
        """Raise StoreUnavailable unless a trivial query succeeds."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as exc:
            raise StoreUnavailable(f"the database is unavailable: {exc.orig}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


def upgrade(db: Database, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision``; safe to call from many processes.

    On SQLite the whole upgrade runs in one ``BEGIN IMMEDIATE`` transaction; on
    PostgreSQL under a transaction-scoped advisory lock, so concurrent starters
    queue instead of racing to create the same tables.
    """
    from alembic import command

    cfg = _alembic_config()
    if revision == "head" and current_revision(db) == head_revision():
        return  # already current: skip Alembic's (slow) environment set-up
    write_engine = db.engine.execution_options(write=True)
    try:
        with write_engine.begin() as conn:
            if not db.sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except OperationalError as exc:
        raise StoreUnavailable(f"cannot upgrade the database: {exc.orig}") from exc


def _alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


@functools.cache
def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise StoreUnavailable(f"the database is unavailable: {exc.orig}") from exc
