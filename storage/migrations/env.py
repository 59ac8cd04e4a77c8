"""Alembic environment for FaceLab.

Run in-process by ``storage.db.migrate(engine)``, which hands over a connection through
``config.attributes["connection"]``. Other Alembic commands (e.g. ``command.revision``
with autogenerate) get an engine via ``storage.db.alembic_config(engine)``. There is no
alembic.ini: the configuration is built in code.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from storage.orm import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError(
            "storage/migrations: no database given; use storage.db.migrate(engine) "
            "or storage.db.alembic_config(engine)"
        )
    with engine.begin() as connection:
        _run(connection)


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run storage.db.migrate(engine)")
run_migrations_online()
