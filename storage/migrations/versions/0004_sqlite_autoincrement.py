"""ids are never reused: SQLite tables become AUTOINCREMENT (PostgreSQL: nothing to do)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Without AUTOINCREMENT SQLite gives a new row ``max(rowid) + 1``, so deleting the newest
face (image, person, ...) hands its id to the next insert, and audit entries, label
history, exported files and the search index's manifest would name the wrong row.
``AUTOINCREMENT`` keeps the largest id ever used in ``sqlite_sequence`` instead.
PostgreSQL's sequences never hand out a number twice, so there the revision is a no-op.

SQLite cannot add AUTOINCREMENT to an existing table: each table is rebuilt (Alembic
batch mode: create a copy with the new options, copy the rows with their ids, drop the
old table, rename). Rules that this relies on:

* foreign keys must be OFF while tables are dropped, or dropping ``images`` would
  cascade-delete every face. The pragma cannot change inside a transaction, so
  ``storage.db.migrate`` switches it off around the upgrade; this revision refuses to
  run when it is on, and runs ``PRAGMA foreign_key_check`` at the end (any dangling
  reference rolls the whole upgrade back).
* SQLite does not reflect expression indexes, and the partial index's WHERE is rebuilt
  by hand as well, so both are dropped before and created again after the rebuild.
* The copy keeps every id; SQLite records the largest copied id in ``sqlite_sequence``.
  Ids that were deleted *before* this upgrade, above the largest surviving one, are not
  known and may be handed out once more.

Plain ``sa`` types only (see 0001): migrations never import application code.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: every table whose primary key is an integer surrogate id (all but alembic_version)
TABLES = ("images", "identities", "faces", "embeddings", "model_versions", "audit_log", "label_revisions", "users")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "revision 0004 rebuilds tables and needs PRAGMA foreign_keys=OFF (dropping a table would "
            "cascade-delete rows); run it through storage.db.migrate(engine)"
        )
    op.drop_index("uq_identities_name_lower", table_name="identities")
    op.drop_index("uq_model_versions_one_active_per_kind", table_name="model_versions")
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass
    op.create_index("uq_identities_name_lower", "identities", [sa.text("lower(name)")], unique=True)
    op.create_index(
        "uq_model_versions_one_active_per_kind",
        "model_versions",
        ["kind"],
        unique=True,
        sqlite_where=sa.text("active"),
    )
    dangling = bind.exec_driver_sql("PRAGMA foreign_key_check").all()
    if dangling:
        raise RuntimeError(f"revision 0004: {len(dangling)} dangling foreign key(s) after the rebuild: {dangling[:5]}")


def downgrade() -> None:
    # Nothing to undo: revision 0003's code works unchanged on AUTOINCREMENT tables, and
    # rebuilding them again would only risk the rows for no gain.
    pass
