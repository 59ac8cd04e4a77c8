"""Shared pytest fixtures. Keep this small: fixtures used by more than one test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.db import default_sqlite_url, make_engine, migrate, session_factory

#: ../shared/data seen from the repository root; absent in a user's clone
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared evaluation data folder; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """An empty per-test data folder (database, image store, index files go inside)."""
    path = tmp_path / "facelab-data"
    path.mkdir()
    return path


@pytest.fixture
def db(tmp_data_dir: Path) -> Iterator[Engine]:
    """A migrated SQLite database in ``tmp_data_dir`` (an Engine; disposed afterwards)."""
    engine = make_engine(default_sqlite_url(tmp_data_dir))
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db_sessions(db: Engine) -> sessionmaker[Session]:
    """A session factory on ``db``: ``with db_sessions() as s, s.begin(): ...``."""
    return session_factory(db)
