"""Migration 0004 (ids are never reused): a database at revision 0003 with rows in every
table is upgraded; every row keeps its id and values, references stay intact, the
constraints still hold, and a deleted row's id is not handed out again. On SQLite the
tables are rebuilt as AUTOINCREMENT; on PostgreSQL the revision changes nothing."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage.db import (
    alembic_config,
    current_revision,
    default_sqlite_url,
    make_engine,
    migrate,
)
from storage.orm import Base
from tests.conftest import DatabaseFactory

TABLES = ("images", "identities", "faces", "embeddings", "model_versions", "audit_log", "label_revisions", "users")
#: tables created by later revisions, AUTOINCREMENT from the start
LATER_TABLES = ("face_attributes",)
T = Base.metadata.tables
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _fill(engine: Engine) -> None:
    """Rows in every table, written with plain SQL as revision 0003 would hold them."""
    with engine.begin() as conn:
        for i in (1, 2, 3):
            conn.execute(insert(T["images"]).values(
                id=i, sha256=f"{i:064x}", upload_sha256=f"{i:064x}", original_name=f"p{i}.jpg", width=10, height=10,
                size_bytes=5, mime="image/jpeg", created_at=NOW, status="unreviewed", version=1))
        conn.execute(insert(T["identities"]).values(id=1, name="Alice", created_at=NOW))
        conn.execute(insert(T["identities"]).values(id=2, name="Bob", created_at=NOW))
        for face_id, image_id, who in [(1, 1, 1), (2, 1, 2), (3, 2, None), (4, 3, 1)]:
            conn.execute(insert(T["faces"]).values(
                id=face_id, image_id=image_id, x1=0, y1=0, x2=5, y2=5, score=0.9, origin="det",
                review_status="pending", identity_id=who, created_at=NOW, updated_at=NOW, version=1))
            conn.execute(insert(T["embeddings"]).values(
                id=10 + face_id, face_id=face_id, model_version="e1", dim=2, vector=b"\0" * 8, created_at=NOW))
        conn.execute(insert(T["model_versions"]).values(
            id=1, kind="embedder", name="a", version="1", active=True, created_at=NOW))
        conn.execute(insert(T["model_versions"]).values(
            id=2, kind="embedder", name="b", version="1", active=False, created_at=NOW))
        conn.execute(insert(T["model_versions"]).values(
            id=3, kind="detector", name="d", version="1", active=True, created_at=NOW))
        conn.execute(insert(T["audit_log"]).values(
            id=1, at=NOW, user="u", action="enroll", target_type="face", target_id=1, details={"k": 1}))
        conn.execute(insert(T["label_revisions"]).values(
            id=1, image_id=1, revision=1, action="save", user="u", at=NOW, image_version=2, status_before="unreviewed",
            status_after="reviewed", boxes_before=[], boxes_after=[{"face_id": 1}]))
        conn.execute(insert(T["users"]).values(
            id=1, name="admin", role="admin", password_hash="scrypt$x", active=True, created_at=NOW))
        if conn.dialect.name == "postgresql":  # explicit ids do not move a sequence; the app's inserts do
            for table in TABLES:
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)")
        # the newest image goes before the upgrade (its face 4 and embedding 14 by cascade)
        conn.execute(delete(T["images"]).where(T["images"].c.id == 3))


def _rows(engine: Engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {t: [tuple(r) for r in conn.execute(select(T[t]).order_by(T[t].c.id))] for t in TABLES}


def _sqlite_schema(engine: Engine) -> dict[tuple[str, str], object]:
    """sqlite_master, with what AUTOINCREMENT changes normalised away (PK spelling, quoting,
    the order of constraint lines)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").all()
    out: dict[tuple[str, str], object] = {}
    for kind, name, sql in rows:
        if kind == "table":
            body = sql[sql.index("(") + 1 : sql.rindex(")")]
            parts = (p.strip().rstrip(",").strip() for p in body.split("\n"))
            out[(kind, name)] = sorted(p.replace(" PRIMARY KEY AUTOINCREMENT", "") for p in parts
                                       if p and not p.startswith("CONSTRAINT pk_"))
        else:
            out[(kind, name)] = sql
    return out


def test_upgrade_keeps_rows_ids_and_references(make_database_url: DatabaseFactory, tmp_path: Path) -> None:
    engine = make_engine(make_database_url() or default_sqlite_url(tmp_path))
    try:
        migrate(engine, "0003")
        _fill(engine)
        before = _rows(engine)
        assert [r[0] for r in before["faces"]] == [1, 2, 3] and [r[0] for r in before["embeddings"]] == [11, 12, 13]
        sqlite = engine.dialect.name == "sqlite"
        schema_before = _sqlite_schema(engine) if sqlite else None

        # the upgrade-on-open path (Lab.open, app.py) calls exactly this, up to "head"; later
        # revisions add tables and triggers of their own (tests/test_change_stamps.py)
        migrate(engine, "0004")
        assert current_revision(engine) == "0004"
        assert _rows(engine) == before
        if sqlite:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # restored for the pool
                seq = dict(conn.exec_driver_sql("SELECT name, seq FROM sqlite_sequence").all())
                tables_sql = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type='table'").all())
            for table in TABLES:
                assert seq[table] >= max((r[0] for r in before[table]), default=0), table
                assert re.search(r"\bid INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT\b", tables_sql[table]), table
            # nothing else changed: columns, CHECK/UNIQUE/FOREIGN KEY clauses, every index
            # (the lower(name) expression index and the partial one included)
            # (later revisions may only add objects: tables of LATER_TABLES and their indexes)
            after = _sqlite_schema(engine)
            assert {key: after.get(key) for key in schema_before} == schema_before
            assert {name for _, name in set(after) - set(schema_before)} <= set(LATER_TABLES) | {
                index for (kind, index) in after if kind == "index" and any(index.startswith(f"ix_{t}_") for t in LATER_TABLES)}

        # constraints and ON DELETE rules still act
        with pytest.raises(IntegrityError), engine.begin() as conn:  # unique ignoring case
            conn.execute(insert(T["identities"]).values(name="alice", created_at=NOW))
        with pytest.raises(IntegrityError), engine.begin() as conn:  # one active embedder
            conn.execute(update(T["model_versions"]).where(T["model_versions"].c.id == 2).values(active=True))
        with pytest.raises(IntegrityError), engine.begin() as conn:  # foreign key
            conn.execute(insert(T["faces"]).values(
                image_id=999, x1=0, y1=0, x2=5, y2=5, score=1, origin="h", review_status="pending",
                created_at=NOW, updated_at=NOW, version=1))
        with engine.begin() as conn:
            conn.execute(delete(T["identities"]).where(T["identities"].c.id == 2))
            assert conn.scalar(select(T["faces"].c.identity_id).where(T["faces"].c.id == 2)) is None
            conn.execute(delete(T["images"]).where(T["images"].c.id == 1))
            assert conn.execute(select(T["faces"].c.id)).scalars().all() == [3]
            assert conn.execute(select(T["embeddings"].c.id)).scalars().all() == [13]
            assert conn.execute(select(T["label_revisions"].c.id)).scalars().all() == []
        with engine.begin() as conn:
            # the newest face is deleted, then a new one is added: it gets a new id
            conn.execute(delete(T["faces"]).where(T["faces"].c.id == 3))
            new_id = conn.execute(insert(T["faces"]).values(
                image_id=2, x1=0, y1=0, x2=5, y2=5, score=1, origin="h", review_status="pending",
                created_at=NOW, updated_at=NOW, version=1).returning(T["faces"].c.id)).scalar_one()
            assert new_id > 3
    finally:
        engine.dispose()


def test_revision_0004_refuses_to_run_with_foreign_keys_on(tmp_path: Path) -> None:
    """Run by hand through Alembic on a connection with foreign keys on, dropping the old
    ``images`` table would cascade-delete every face: it stops before touching anything."""
    from alembic import command

    engine = make_engine(default_sqlite_url(tmp_path))
    try:
        migrate(engine, "0003")
        _fill(engine)
        before = _rows(engine)
        cfg = alembic_config(engine)
        with pytest.raises(RuntimeError, match="foreign_keys=OFF"), engine.begin() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004")
        assert current_revision(engine) == "0003" and _rows(engine) == before
    finally:
        engine.dispose()


def test_orm_metadata_and_migrated_schema_agree_on_autoincrement(tmp_path: Path) -> None:
    engine = make_engine(default_sqlite_url(tmp_path))
    try:
        migrate(engine)
        with engine.connect() as conn:
            tables_sql = dict(conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'").all())
        migrated = {name for name, sql in tables_sql.items() if "AUTOINCREMENT" in sql}
        declared = {t.name for t in Base.metadata.sorted_tables if t.dialect_options["sqlite"]["autoincrement"]}
        assert migrated == declared == set(TABLES) | set(LATER_TABLES)
        # every table of the ORM with a single integer id is covered
        with_int_id = {t.name for t in Base.metadata.sorted_tables
                       if [c.name for c in t.primary_key.columns] == ["id"]}
        assert with_int_id == set(TABLES) | set(LATER_TABLES)
    finally:
        engine.dispose()
