"""Database engine, migrations and sessions.

One function per job:

* ``make_engine(url)``: an Engine for SQLite (the default, one file next to the image
  store) or PostgreSQL (``postgresql+psycopg://user:pw@host/db``, psycopg 3; SQLAlchemy 2.1 also
  maps a bare ``postgresql://`` to psycopg 3).
* ``migrate(engine)``: Alembic ``upgrade head``, run in-process. The schema only ever
  comes from migrations (the first revision creates everything), never from
  ``metadata.create_all``, so a deployed database and a test database are built the
  same way.
* ``session_factory(engine)``: a ``sessionmaker`` with ``expire_on_commit=False`` so
  objects handed to the UI stay readable after the transaction that loaded them.

SQLite notes (why the connect hook sets what it sets):

* WAL lets the UI read while an import job writes.
* ``foreign_keys=ON`` is per connection and off by default; without it the ON DELETE
  CASCADE / SET NULL rules in the schema would silently do nothing.
* ``busy_timeout`` makes a writer wait up to 30 s for another writer instead of failing
  at once with "database is locked".
* pysqlite's default transaction handling is kept on purpose: it opens a transaction at
  the first INSERT/UPDATE/DELETE, so a session that read a row and later updates it does
  so on a fresh snapshot, and a concurrent edit shows up as a version-counter mismatch
  (``StaleDataError``) rather than SQLITE_BUSY_SNAPSHOT. The cost is that SAVEPOINTs
  (``Session.begin_nested``) are unreliable on SQLite: do not use them, and that
  successive SELECTs in one session are not one snapshot until the first write.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from alembic.config import Config

#: folder holding alembic's env.py and versions/
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: seconds a SQLite writer waits for the write lock before "database is locked"
SQLITE_BUSY_TIMEOUT_S = 30.0

#: the database file's name inside the data folder
SQLITE_FILENAME = "facelab.sqlite3"

_MIGRATE_LOCK = threading.Lock()
#: arbitrary constant naming FaceLab's migration lock among PostgreSQL advisory locks
_PG_MIGRATION_LOCK_KEY = 0x46614C62


def default_sqlite_url(data_dir: str | os.PathLike[str]) -> str:
    """``sqlite:///<data_dir>/facelab.sqlite3`` (absolute path; the folder is created)."""
    path = Path(data_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / SQLITE_FILENAME).as_posix()}"


def _is_memory_sqlite(database: str | None) -> bool:
    return database in (None, "", ":memory:") or (database or "").startswith("file::memory:")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL is a property of the file (sticks once set); in-memory databases answer
        # "memory" and stay that way, which is fine.
        cursor.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable across application crashes in WAL mode; only an OS crash
        # or power cut can lose the last transactions (never corrupt the file).
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def make_engine(url: str, *, echo: bool = False, **kwargs: Any) -> Engine:
    """Create an Engine for ``url`` with the per-backend settings this app needs.

    ``sqlite:///path`` gets WAL, foreign keys, a 30 s busy timeout and
    ``check_same_thread=False`` (Gradio runs handlers on worker threads; the pool still
    hands each connection to one thread at a time). ``sqlite://`` (in-memory) shares
    one connection so every session sees the same database.
    ``postgresql+psycopg://...`` is passed through with ``pool_pre_ping``.
    Extra ``kwargs`` go to ``sqlalchemy.create_engine``.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        if _is_memory_sqlite(parsed.database):
            kwargs.setdefault("poolclass", StaticPool)
        else:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() not in ("psycopg", "psycopg_async"):
            raise ValueError(
                f"PostgreSQL URLs must use the psycopg 3 driver (postgresql+psycopg://...), got {parsed.drivername!r}"
            )
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, echo=echo, **kwargs)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql+psycopg")


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic Config built in code (no alembic.ini needed).

    With ``engine`` the migration environment runs on one of its connections. For other
    Alembic commands, e.g. writing a new revision::

        from alembic import command
        cfg = alembic_config(make_engine(url))
        command.revision(cfg, message="add x", autogenerate=True)
    """
    from alembic.config import Config

    cfg = Config()
    # ConfigParser interpolation treats "%" specially, hence the escaping
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    # what alembic.ini's "path_separator = os" says; without it Alembic warns
    cfg.set_main_option("path_separator", "os")
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema up to ``revision`` (default: the newest). Idempotent.

    Safe to call from several threads or processes at once (e.g. two app workers
    starting): the whole upgrade is one transaction that first takes the database's
    write lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL advisory lock), so a second
    migrator waits and then finds the schema current. On SQLite that also makes a
    failed migration roll back completely instead of leaving half-created tables.
    """
    from alembic import command

    cfg = alembic_config(engine)
    # Alembic's command API keeps its context in module globals: one upgrade at a time
    with _MIGRATE_LOCK, engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Revisions that rebuild tables (0004) must not fire ON DELETE CASCADE when an
            # old table is dropped. The pragma is a no-op inside a transaction, so it is set
            # before BEGIN and restored before the connection goes back to the pool; such a
            # revision checks the references itself (PRAGMA foreign_key_check).
            connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        try:
            if sqlite:
                # pysqlite would run the DDL outside any transaction; open one explicitly
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            elif connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK_KEY})")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            if sqlite:
                try:
                    connection.exec_driver_sql("PRAGMA foreign_keys = ON")
                    connection.commit()
                except BaseException:
                    connection.invalidate()  # never pool a connection that ignores foreign keys
                    raise


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None for an unmigrated database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision shipped in storage/migrations/versions."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "storage/migrations/versions has no revisions"
    return head


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; use ``with factory() as s, s.begin(): ...``."""
    return sessionmaker(bind=engine, expire_on_commit=False)
