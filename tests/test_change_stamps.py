"""The change stamps a search reads instead of scanning the embeddings (migration 0010):
kept by database triggers for every kind of write (ORM, raw SQL, ON DELETE CASCADE, an
explicit id), equal to the aggregate scan at every step; the gallery counter moves
exactly when enrolled faces or people's names change. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, delete, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from storage.db import default_sqlite_url, make_engine, migrate, session_factory
from storage.embedding_rows import (
    embedding_stamp,
    embedding_stamp_scan,
    gallery_counter,
    recompute_embedding_stamps,
)
from storage.orm import Embedding, EmbeddingStamp, Face, Identity, Image

V1, V2 = "dlib-v1", "other-v2"


@pytest.fixture(scope="module")
def engine(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = make_engine(database_url or default_sqlite_url(tmp_path_factory.mktemp("stamps")))
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


def _image(s: Session, tag: str) -> Image:
    img = Image(sha256=tag.ljust(64, "0"), upload_sha256=tag.ljust(64, "0"), original_name=f"{tag}.jpg",
                width=10, height=10, size_bytes=1, mime="image/jpeg")
    s.add(img)
    return img


def _assert_stamps(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        for version in (V1, V2):
            assert embedding_stamp(s, version) == embedding_stamp_scan(s, version), version


def test_every_kind_of_write_keeps_the_stamp_equal_to_the_scan(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert embedding_stamp(s, "never-used") == (0, 0, 0) == embedding_stamp_scan(s, "never-used")
    # ORM inserts, two versions, several faces per photo
    with sessions() as s, s.begin():
        img = _image(s, "a")
        faces = [Face(image=img, x1=i, y1=0, x2=i + 5, y2=5, origin="test") for i in range(4)]
        s.add_all(faces)
        s.flush()
        s.add_all([Embedding.from_array(f.id, V1, _vec(f.id)) for f in faces])
        s.add_all([Embedding.from_array(f.id, V2, _vec(f.id + 100)) for f in faces[:2]])
        face_ids = [f.id for f in faces]
    _assert_stamps(sessions)
    with sessions() as s:
        count, top, total = embedding_stamp(s, V1)
        assert count == 4 and top > 0 and total > top
    # raw SQL insert with an explicit (higher) id, then the newest row deleted: max recomputed
    with sessions() as s, s.begin():
        top = embedding_stamp(s, V1)[1]
        s.execute(delete(Embedding).where(Embedding.face_id == face_ids[3], Embedding.model_version == V1))
        s.execute(insert(Embedding), [{"id": top + 50, "face_id": face_ids[3], "model_version": V1, "dim": 8,
                                       "vector": _vec(9).tobytes()}])
    _assert_stamps(sessions)
    with sessions() as s, s.begin():
        s.execute(delete(Embedding).where(Embedding.id == top + 50))
    _assert_stamps(sessions)
    with sessions() as s:
        assert embedding_stamp(s, V1)[1] < top + 50  # the max went back to the newest surviving row
    # a row updated in place (FaceLab never does; the stamp still follows)
    with sessions() as s, s.begin():
        s.execute(update(Embedding).where(Embedding.face_id == face_ids[0], Embedding.model_version == V2)
                  .values(model_version=V1 + "-moved"))
    _assert_stamps(sessions)
    with sessions() as s:
        assert embedding_stamp(s, V1 + "-moved") == embedding_stamp_scan(s, V1 + "-moved") != (0, 0, 0)
    # ON DELETE CASCADE: a deleted photo takes its faces' embeddings along
    with sessions() as s, s.begin():
        s.execute(delete(Image).where(Image.id == s.get(Face, face_ids[0]).image_id))
    _assert_stamps(sessions)
    with sessions() as s:
        assert embedding_stamp(s, V1) == (0, 0, 0) and embedding_stamp(s, V2) == (0, 0, 0)


def test_repair_recomputes_a_stamp_that_drifted(sessions: sessionmaker[Session]) -> None:
    with sessions() as s, s.begin():
        img = _image(s, "r")
        face = Face(image=img, x1=0, y1=0, x2=5, y2=5, origin="test")
        s.add(face)
        s.flush()
        s.add(Embedding.from_array(face.id, V1, _vec(1)))
    with sessions() as s, s.begin():  # what a migration that lost the triggers would leave
        s.execute(update(EmbeddingStamp).values(row_count=EmbeddingStamp.row_count + 7))
    with sessions() as s:
        assert embedding_stamp(s, V1) != embedding_stamp_scan(s, V1)
    with sessions() as s, s.begin():
        recompute_embedding_stamps(s)
    _assert_stamps(sessions)


def test_the_gallery_counter_moves_when_enrolments_or_names_change(sessions: sessionmaker[Session]) -> None:
    def counter() -> int:
        with sessions() as s:
            return gallery_counter(s)

    with sessions() as s, s.begin():
        img = _image(s, "g")
        faces = [Face(image=img, x1=i, y1=0, x2=i + 5, y2=5, origin="test") for i in range(3)]
        s.add_all(faces)
        s.flush()
        face_ids = [f.id for f in faces]
    start = counter()
    with sessions() as s, s.begin():  # unrelated edits: no change
        s.execute(update(Face).where(Face.id == face_ids[0]).values(x2=9.0, version=Face.version + 1))
    assert counter() == start
    with sessions() as s, s.begin():
        person = Identity(name="Ada")
        s.add(person)
        s.flush()
        person_id = person.id
    after_new_person = counter()
    assert after_new_person > start
    with sessions() as s, s.begin():
        s.execute(update(Face).where(Face.id.in_(face_ids[:2])).values(identity_id=person_id, version=Face.version + 1))
    enrolled = counter()
    assert enrolled > after_new_person
    with sessions() as s, s.begin():  # same person again: no change
        s.execute(update(Face).where(Face.id == face_ids[0]).values(identity_id=person_id, version=Face.version + 1))
    assert counter() == enrolled
    with sessions() as s, s.begin():
        s.execute(text("UPDATE identities SET name = 'Ada L' WHERE id = :i"), {"i": person_id})
    renamed = counter()
    assert renamed > enrolled
    with sessions() as s, s.begin():  # an enrolled face deleted by its photo's cascade
        s.execute(delete(Face).where(Face.id == face_ids[1]))
    deleted_face = counter()
    assert deleted_face > renamed
    with sessions() as s, s.begin():  # the person deleted: their faces are un-named (SET NULL)
        s.execute(delete(Identity).where(Identity.id == person_id))
    assert counter() > deleted_face
    with sessions() as s:
        assert s.scalar(select(Face.identity_id).where(Face.id == face_ids[0])) is None


def test_upgrading_a_filled_database_counts_the_rows_already_there(make_database_url, tmp_path) -> None:  # noqa: ANN001
    engine = make_engine(make_database_url() or default_sqlite_url(tmp_path))
    try:
        migrate(engine, "0004")
        sessions = session_factory(engine)
        with sessions() as s, s.begin():  # written before the triggers exist
            img = _image(s, "u")
            faces = [Face(image=img, x1=i, y1=0, x2=i + 5, y2=5, origin="test") for i in range(3)]
            s.add_all(faces)
            s.flush()
            s.add_all([Embedding.from_array(f.id, V1, _vec(f.id)) for f in faces])
        migrate(engine)
        with sessions() as s:
            assert embedding_stamp(s, V1) == embedding_stamp_scan(s, V1) and embedding_stamp(s, V1)[0] == 3
    finally:
        engine.dispose()
