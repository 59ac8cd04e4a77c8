"""Both databases: the migrations build, tear down and rebuild the schema from empty, and CI
really runs the suite on PostgreSQL (tests/run.sh starts a private cluster on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import inspect

from storage.db import current_revision, default_sqlite_url, head_revision, make_engine, migrate
from tests.conftest import TEST_PG_URL, DatabaseFactory


def test_ci_runs_the_suite_on_postgresql_too() -> None:
    if not os.environ.get("CI"):
        pytest.skip("outside CI the PostgreSQL pass is optional (tests/run.sh still starts it)")
    assert TEST_PG_URL.startswith("postgresql+psycopg://"), "tests/run.sh did not start PostgreSQL"
    assert "@127.0.0.1:" in TEST_PG_URL  # loopback only


def test_migrations_go_up_down_and_up_again(make_database_url: DatabaseFactory, tmp_path: Path) -> None:
    url = make_database_url() or default_sqlite_url(tmp_path)
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        migrate(engine)
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert {"users", "label_revisions", "images", "faces", "embeddings", "audit_log"} <= tables
        _downgrade(engine, "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def _downgrade(engine, revision: str) -> None:  # noqa: ANN001
    from alembic import command

    from storage.db import alembic_config

    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)
