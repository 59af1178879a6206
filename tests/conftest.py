"""Shared fixtures: a fresh store on SQLite and on a real PostgreSQL server.

PostgreSQL tests need FEEDBACK_CHAT_TEST_POSTGRES_URL (an admin URL; `.ci/run`
starts a throwaway server with deploy/test-postgres.sh and sets it). Without it
they are skipped with that reason, unless FEEDBACK_CHAT_REQUIRE_POSTGRES=1 (as in
CI), where a missing server fails the run instead of hiding the tests.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

PG_ENV = "FEEDBACK_CHAT_TEST_POSTGRES_URL"


def postgres_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("FEEDBACK_CHAT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{PG_ENV} is not set but FEEDBACK_CHAT_REQUIRE_POSTGRES=1")
        pytest.skip(f"no PostgreSQL server: set {PG_ENV} (see deploy/test-postgres.sh)")
    return url


def fresh_postgres_url() -> Iterator[str]:
    """Create an empty database on the test server, yield its URL, drop it after."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_admin_url())
    name = f"t_{uuid.uuid4().hex[:12]}"
    eng = create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database, once on SQLite (a file) and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        yield from fresh_postgres_url()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"


@pytest.fixture
def store(db_url: str):  # type: ignore[no-untyped-def]
    from feedback_store import FeedbackStore

    s = FeedbackStore.open(db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full demo model, built once per test session (a few minutes on 2 cores).

    FEEDBACK_CHAT_TEST_DEMO_DATA names a data folder to build it in and reuse across
    sessions (a current build there is used as it is, a stale one rebuilt)."""
    from chat_app.demo_model.build import ensure_demo_model

    data = os.environ.get("FEEDBACK_CHAT_TEST_DEMO_DATA")
    folder = Path(data) if data else tmp_path_factory.mktemp("demo-data")
    return ensure_demo_model(folder, progress=False)


@pytest.fixture(autouse=True)
def _canary_off_unless_marked(request: pytest.FixtureRequest,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of a round's promotion run with the canary off (FEEDBACK_CHAT_CANARY_SHARE=0,
    inherited by servers and workers they start), so a passing candidate goes active at
    once as they expect; tests marked ``canary`` keep the service's default."""
    if request.node.get_closest_marker("canary") is None:
        monkeypatch.setenv("FEEDBACK_CHAT_CANARY_SHARE", "0")
