"""change stamps kept by triggers: what a search checks costs O(1), not a scan

Revision ID: 0010
Revises: 0004
Create Date: 2026-12-05

Before every search the app asks "did any process change the embeddings (or who is
enrolled) since my in-memory index last looked?". That used to be ``COUNT/MAX/SUM`` over
all embedding rows (214 ms at 1M rows). Two small tables now hold the answer, kept in
the writer's own transaction by triggers, so every writer (the ORM, raw SQL, ON DELETE
CASCADE from a deleted photo or face, another process) keeps them right without knowing
about them:

* ``embedding_stamps``: per embedder version ``(row_count, max_row_id, row_id_sum)``, the
  same figures the old aggregate query computed (``storage.embedding_rows``).
* ``change_counters``: named counters; ``gallery`` grows whenever a face's person
  changes or a person is added, renamed or deleted (the enrolled faces a search compares
  with), so the list can be cached between searches.

SQLite: row triggers (writers are serialised there anyway). PostgreSQL: statement
triggers with transition tables for embeddings (one stamp update per statement, not per
row), row triggers for the gallery counter. The stamp row of a version is then locked
from a transaction's first embedding write until it commits, which serialises embedding
writers on PostgreSQL (FaceLab's writers touch faces before embeddings, so the order of
locks is the same everywhere).

A table rebuilt by a later SQLite batch migration loses its triggers: such a migration
must create them again (``create_triggers`` below). ``python app.py check`` compares the
stamps with a full count and ``--repair`` recomputes them.

Plain ``sa`` types only (see 0001): migrations never import application code.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_TRIGGERS = [
    # embeddings -> embedding_stamps
    """CREATE TRIGGER trg_embeddings_stamp_insert AFTER INSERT ON embeddings BEGIN
        INSERT INTO embedding_stamps (model_version, row_count, max_row_id, row_id_sum)
        VALUES (NEW.model_version, 1, NEW.id, NEW.id)
        ON CONFLICT (model_version) DO UPDATE SET row_count = row_count + 1,
            max_row_id = max(max_row_id, excluded.max_row_id), row_id_sum = row_id_sum + excluded.row_id_sum;
    END""",
    """CREATE TRIGGER trg_embeddings_stamp_delete AFTER DELETE ON embeddings BEGIN
        UPDATE embedding_stamps SET row_count = row_count - 1, row_id_sum = row_id_sum - OLD.id,
            max_row_id = CASE WHEN max_row_id = OLD.id THEN
                coalesce((SELECT max(id) FROM embeddings WHERE model_version = OLD.model_version), 0)
                ELSE max_row_id END
        WHERE model_version = OLD.model_version;
    END""",
    # rows are never updated in place, but if one is, count it as a delete plus an insert
    """CREATE TRIGGER trg_embeddings_stamp_update AFTER UPDATE OF id, model_version ON embeddings BEGIN
        UPDATE embedding_stamps SET row_count = row_count - 1, row_id_sum = row_id_sum - OLD.id,
            max_row_id = coalesce((SELECT max(id) FROM embeddings WHERE model_version = OLD.model_version), 0)
        WHERE model_version = OLD.model_version;
        INSERT INTO embedding_stamps (model_version, row_count, max_row_id, row_id_sum)
        VALUES (NEW.model_version, 1, NEW.id, NEW.id)
        ON CONFLICT (model_version) DO UPDATE SET row_count = row_count + 1,
            max_row_id = max(max_row_id, excluded.max_row_id), row_id_sum = row_id_sum + excluded.row_id_sum;
    END""",
    # faces / identities -> change_counters('gallery')
    """CREATE TRIGGER trg_faces_gallery_insert AFTER INSERT ON faces WHEN NEW.identity_id IS NOT NULL BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
    END""",
    """CREATE TRIGGER trg_faces_gallery_update AFTER UPDATE OF identity_id ON faces
        WHEN OLD.identity_id IS NOT NEW.identity_id BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
    END""",
    """CREATE TRIGGER trg_faces_gallery_delete AFTER DELETE ON faces WHEN OLD.identity_id IS NOT NULL BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
    END""",
    """CREATE TRIGGER trg_identities_gallery_insert AFTER INSERT ON identities BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
    END""",
    """CREATE TRIGGER trg_identities_gallery_update AFTER UPDATE OF name ON identities BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
    END""",
    """CREATE TRIGGER trg_identities_gallery_delete AFTER DELETE ON identities BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
    END""",
]

_PG_FUNCTIONS = [
    """CREATE OR REPLACE FUNCTION facelab_embedding_stamp_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO embedding_stamps AS s (model_version, row_count, max_row_id, row_id_sum)
        SELECT model_version, count(*), max(id), sum(id) FROM new_rows GROUP BY model_version
        ON CONFLICT (model_version) DO UPDATE SET row_count = s.row_count + excluded.row_count,
            max_row_id = greatest(s.max_row_id, excluded.max_row_id), row_id_sum = s.row_id_sum + excluded.row_id_sum;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION facelab_embedding_stamp_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE embedding_stamps AS s SET row_count = s.row_count - d.n, row_id_sum = s.row_id_sum - d.total,
            max_row_id = CASE WHEN s.max_row_id <= d.top THEN
                coalesce((SELECT max(e.id) FROM embeddings e WHERE e.model_version = s.model_version), 0)
                ELSE s.max_row_id END
        FROM (SELECT model_version, count(*) AS n, sum(id) AS total, max(id) AS top
              FROM old_rows GROUP BY model_version) AS d
        WHERE s.model_version = d.model_version;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION facelab_embedding_stamp_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE embedding_stamps AS s SET row_count = s.row_count - d.n, row_id_sum = s.row_id_sum - d.total,
            max_row_id = coalesce((SELECT max(e.id) FROM embeddings e WHERE e.model_version = s.model_version), 0)
        FROM (SELECT model_version, count(*) AS n, sum(id) AS total FROM old_rows GROUP BY model_version) AS d
        WHERE s.model_version = d.model_version;
        INSERT INTO embedding_stamps AS s (model_version, row_count, max_row_id, row_id_sum)
        SELECT model_version, count(*), max(id), sum(id) FROM new_rows GROUP BY model_version
        ON CONFLICT (model_version) DO UPDATE SET row_count = s.row_count + excluded.row_count,
            max_row_id = greatest(s.max_row_id, excluded.max_row_id), row_id_sum = s.row_id_sum + excluded.row_id_sum;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION facelab_gallery_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE change_counters SET value = value + 1 WHERE name = 'gallery';
        RETURN NULL;
    END $$""",
]

_PG_TRIGGERS = [
    """CREATE TRIGGER trg_embeddings_stamp_insert AFTER INSERT ON embeddings REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION facelab_embedding_stamp_insert()""",
    """CREATE TRIGGER trg_embeddings_stamp_delete AFTER DELETE ON embeddings REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION facelab_embedding_stamp_delete()""",
    """CREATE TRIGGER trg_embeddings_stamp_update AFTER UPDATE ON embeddings
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION facelab_embedding_stamp_update()""",
    """CREATE TRIGGER trg_faces_gallery_insert AFTER INSERT ON faces FOR EACH ROW
        WHEN (NEW.identity_id IS NOT NULL) EXECUTE FUNCTION facelab_gallery_changed()""",
    """CREATE TRIGGER trg_faces_gallery_update AFTER UPDATE OF identity_id ON faces FOR EACH ROW
        WHEN (OLD.identity_id IS DISTINCT FROM NEW.identity_id) EXECUTE FUNCTION facelab_gallery_changed()""",
    """CREATE TRIGGER trg_faces_gallery_delete AFTER DELETE ON faces FOR EACH ROW
        WHEN (OLD.identity_id IS NOT NULL) EXECUTE FUNCTION facelab_gallery_changed()""",
    """CREATE TRIGGER trg_identities_gallery_insert AFTER INSERT ON identities FOR EACH ROW
        EXECUTE FUNCTION facelab_gallery_changed()""",
    """CREATE TRIGGER trg_identities_gallery_update AFTER UPDATE OF name ON identities FOR EACH ROW
        EXECUTE FUNCTION facelab_gallery_changed()""",
    """CREATE TRIGGER trg_identities_gallery_delete AFTER DELETE ON identities FOR EACH ROW
        EXECUTE FUNCTION facelab_gallery_changed()""",
]

TRIGGERS = ("trg_embeddings_stamp_insert", "trg_embeddings_stamp_delete", "trg_embeddings_stamp_update",
            "trg_faces_gallery_insert", "trg_faces_gallery_update", "trg_faces_gallery_delete",
            "trg_identities_gallery_insert", "trg_identities_gallery_update", "trg_identities_gallery_delete")
_TRIGGER_TABLE = {name: name.split("_")[1] for name in TRIGGERS}


def create_triggers() -> None:
    """(Re)create the triggers, e.g. after a SQLite batch migration rebuilt a table."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for sql in _PG_FUNCTIONS:
            op.execute(sql)
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {_TRIGGER_TABLE[name]}")
        for sql in _PG_TRIGGERS:
            op.execute(sql)
    else:
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        for sql in _SQLITE_TRIGGERS:
            op.execute(sql)


def upgrade() -> None:
    op.create_table(
        "embedding_stamps",
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("max_row_id", sa.BigInteger(), nullable=False),
        sa.Column("row_id_sum", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model_version", name=op.f("pk_embedding_stamps")),
    )
    op.create_table(
        "change_counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_change_counters")),
    )
    # the rows already there, counted once; the migration holds the write lock meanwhile
    op.execute(
        "INSERT INTO embedding_stamps (model_version, row_count, max_row_id, row_id_sum) "
        "SELECT model_version, count(*), max(id), sum(id) FROM embeddings GROUP BY model_version"
    )
    op.execute("INSERT INTO change_counters (name, value) VALUES ('gallery', 0)")
    create_triggers()


def downgrade() -> None:
    bind = op.get_bind()
    for name in TRIGGERS:
        if bind.dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {_TRIGGER_TABLE[name]}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    if bind.dialect.name == "postgresql":
        for fn in ("facelab_embedding_stamp_insert", "facelab_embedding_stamp_delete",
                   "facelab_embedding_stamp_update", "facelab_gallery_changed"):
            op.execute(f"DROP FUNCTION IF EXISTS {fn}()")
    op.drop_table("change_counters")
    op.drop_table("embedding_stamps")
