"""One in-memory FAISS index per process, kept in step with the database: two ``Lab``s on
the same database and data folder stand for two processes (the app and ``python app.py
ingest``). What one writes, the other's next search sees, without a restart. Also the
interleavings of an in-process writer's own index update with a sync, forced one by one.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import delete, select

from pipeline.library import identities
from pipeline.labeling import edits as labeling
from pipeline.context import Lab
from pipeline.library.ingest import Upload, ingest
from pipeline.library.search import search_image
from pipeline.settings import Settings
from storage.embedding_rows import embedding_rows, embedding_stamp, fetch_embedding_rows
from storage.faiss_index import FaceIndex
from storage.orm import Embedding, Face, Image
from tests.conftest import astronaut_photo


def _photo(seed: int) -> bytes:
    return astronaut_photo(seed)


@pytest.fixture(scope="module")
def two_labs(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[tuple[Lab, Lab]]:
    """The "app" and the "other process": same settings, separate engines and indexes."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("sync"), database_url=database_url, match_threshold=0.8)
    with Lab.open(settings) as app, Lab.open(settings) as other:
        report = ingest(app, [Upload(f"seed-{i}.jpg", data=_photo(i)) for i in range(3)])
        assert all(r.ok and r.faces for r in report.files), [r.error for r in report.files]
        yield app, other


def _db_pairs(lab: Lab) -> dict[int, int]:
    with lab.sessions() as s:
        faces, rows = embedding_rows(s, lab.model_version)
    return dict(zip(faces.tolist(), rows.tolist(), strict=True))


def _in_step(lab: Lab) -> None:
    """The index holds exactly the database's (face id, embedding row) pairs and vectors."""
    index = lab.index()
    ids, rows = index.rows()
    assert dict(zip(ids.tolist(), rows.tolist(), strict=True)) == _db_pairs(lab)
    with lab.sessions() as s:
        faces, vectors, _ = fetch_embedding_rows(s, lab.model_version, lab.embedder.dim)
        assert embedding_stamp(s, lab.model_version) == index.stamp()
    for face_id, vec in zip(faces.tolist(), vectors, strict=True):
        np.testing.assert_allclose(index.reconstruct(face_id), vec / np.linalg.norm(vec), atol=1e-5)


def test_ingest_enroll_and_delete_in_one_lab_are_searchable_in_the_other(two_labs: tuple[Lab, Lab]) -> None:
    app, other = two_labs
    before = len(app.index())  # the app has its index in memory before the other one writes
    photo = _photo(700)
    (r,) = ingest(other, [Upload("from-the-cli.jpg", data=photo)]).files
    face_id = r.faces[0].face_id
    identities.enroll(other, face_id, "Seen Elsewhere")

    result = search_image(app, photo, k=3)
    top = result.faces[0].matches[0]
    assert (top.face_id, top.name, top.is_match) == (face_id, "Seen Elsewhere", True)
    assert result.faces[0].people[0].name == "Seen Elsewhere"
    assert len(app.index()) == before + 1
    _in_step(app)

    identities.delete_person(other, "Seen Elsewhere", delete_faces=True)
    result = search_image(app, photo, k=10)
    assert face_id not in {m.face_id for m in result.faces[0].matches}
    assert "Seen Elsewhere" not in {p.name for p in result.faces[0].people}
    assert face_id not in app.index() and len(app.index()) == before
    _in_step(app)


def test_a_box_moved_in_one_lab_is_searched_with_its_new_vector_in_the_other(two_labs: tuple[Lab, Lab]) -> None:
    app, other = two_labs
    (r,) = ingest(app, [Upload("to-move.jpg", data=_photo(701))]).files
    face_id = r.faces[0].face_id
    old = app.index().reconstruct(face_id)
    state = labeling.load_for_labeling(other, r.image_id, with_pixels=False)
    (box,) = state.boxes
    x1, y1, x2, y2 = box.box
    moved = labeling.BoxEdit(face_id, x1 + 0.25 * (x2 - x1), y1, x2 + 0.25 * (x2 - x1), y2)
    labeling.save_labels(other, r.image_id, state.version, [moved], user="other")

    # same face id, same count: only the embedding row id changed
    new = app.index().reconstruct(face_id)
    assert float(old @ new) < 0.9999
    np.testing.assert_allclose(new, other.index().reconstruct(face_id), atol=1e-5)
    _in_step(app)


def test_a_writer_update_and_a_sync_in_either_order_end_in_step(two_labs: tuple[Lab, Lab]) -> None:
    """A writer commits, then applies its change to its Lab's index; a search in between
    may sync first. Each interleaving is driven step by step on the real code paths."""
    app, other = two_labs
    version, dim = app.model_version, app.embedder.dim
    rng = np.random.default_rng(5)

    def commit_face(vec: np.ndarray) -> tuple[int, int]:
        """What ingest commits for one face (as any writer, in any process): (face id, row id)."""
        with app.session() as s:
            image = s.scalars(select(Image).order_by(Image.id)).first()
            face = Face(image_id=image.id, x1=1, y1=1, x2=9, y2=9, origin="test")
            s.add(face)
            s.flush()
            row = Embedding.from_array(face.id, version, vec)
            s.add(row)
        return face.id, row.id

    def apply(face_id: int, row_id: int, vec: np.ndarray) -> int:
        """The writer's own update, as ingest/labeling/embed do it after their commit."""
        with app.index_for_update() as index:
            return index.add([face_id], vec[None], [row_id], keep_newer=True)

    # 1. a search syncs between the commit and the update: the update is a no-op
    vec = rng.standard_normal(dim).astype(np.float32)
    face_id, row_id = commit_face(vec)
    assert face_id in app.index()  # the search's sync found it
    assert apply(face_id, row_id, vec) == 0
    _in_step(app)

    # 2. another process re-embeds the face before this writer's late update lands
    vec = rng.standard_normal(dim).astype(np.float32)
    face_id, row_id = commit_face(vec)
    newer = rng.standard_normal(dim).astype(np.float32)
    with other.session() as s:
        s.execute(delete(Embedding).where(Embedding.face_id == face_id))
        s.add(Embedding.from_array(face_id, version, newer))
    app.index()  # synced: the newer row
    assert apply(face_id, row_id, vec) == 0  # the late, older row is skipped
    np.testing.assert_allclose(app.index().reconstruct(face_id), newer / np.linalg.norm(newer), atol=1e-5)
    _in_step(app)

    # 3. another process deletes the face before this writer's late update lands: the
    # update puts it back, the stamps differ, and the next search syncs it away
    vec = rng.standard_normal(dim).astype(np.float32)
    face_id, row_id = commit_face(vec)
    with other.session() as s:
        s.delete(s.get(Face, face_id))
    app.index()
    assert face_id not in app.index(sync=False)
    assert apply(face_id, row_id, vec) == 1
    assert face_id in app.index(sync=False)
    with app.sessions() as s:
        assert embedding_stamp(s, version) != app.index(sync=False).stamp()
    assert face_id not in app.index()
    _in_step(app)

    # 4. the update lands first: the next search finds nothing to do
    vec = rng.standard_normal(dim).astype(np.float32)
    face_id, row_id = commit_face(vec)
    assert apply(face_id, row_id, vec) == 1
    with app.index_for_update() as index:
        index.save()
    manifest_before = _manifest_text(app)
    app.index()
    assert _manifest_text(app) == manifest_before  # no sync, so no save (its time stamp would differ)
    _in_step(app)


def _manifest_text(lab: Lab) -> str:
    _, manifest = FaceIndex.paths(lab.settings.index_dir, lab.model_version)
    return manifest.read_text()


def test_the_saved_index_follows_the_syncs(two_labs: tuple[Lab, Lab]) -> None:
    """A Lab opened now loads the saved index without a rebuild: the last sync saved it
    with the database's (face id, row id) pairs in its manifest."""
    app, _ = two_labs
    app.index()
    with app.sessions() as s:
        faces, rows = embedding_rows(s, app.model_version)

    def must_not_rebuild() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise AssertionError("the saved index should have matched the database")

    loaded = FaceIndex.load_or_rebuild(app.settings.index_dir, app.model_version, app.embedder.dim,
                                       must_not_rebuild, face_ids=faces, row_ids=rows)
    assert loaded.stamp() == app.index().stamp()


def _new_face(lab: Lab) -> int:
    with lab.session() as s:
        image = s.scalars(select(Image).order_by(Image.id)).first()
        face = Face(image_id=image.id, x1=1, y1=1, x2=9, y2=9, origin="test")
        s.add(face)
    return face.id


def _embed(lab: Lab, face_id: int, vec: np.ndarray, row_id: int | None = None) -> int:
    with lab.session() as s:
        row = Embedding.from_array(face_id, lab.model_version, vec)
        if row_id is not None:
            row.id = row_id
        s.add(row)
    return row.id


def test_changes_of_every_kind_between_two_searches_are_all_applied(two_labs: tuple[Lab, Lab]) -> None:
    app, other = two_labs
    rng = np.random.default_rng(11)
    dim = app.embedder.dim
    app.index()
    some = sorted(_db_pairs(app))
    for _ in range(3):  # added
        _embed(other, _new_face(other), rng.standard_normal(dim).astype(np.float32))
    with other.session() as s:  # deleted, and re-embedded
        s.delete(s.get(Face, some[0]))
        s.execute(delete(Embedding).where(Embedding.face_id == some[1]))
    _embed(other, some[1], rng.standard_normal(dim).astype(np.float32))
    app.index()
    _in_step(app)


def test_a_lower_row_id_that_appears_late_is_found_although_count_and_max_match(two_labs: tuple[Lab, Lab]) -> None:
    """PostgreSQL assigns ids at insert time, so a transaction holding a lower id can commit
    after one holding a higher id. Together with a deletion in the same window, count and
    max id stay the same; the sum of ids in the stamp still tells. (Driven here by writing
    a never-used lower id by hand, on both databases.)"""
    app, other = two_labs
    rng = np.random.default_rng(12)
    dim = app.embedder.dim
    late_face = _new_face(other)
    reserved = _embed(other, late_face, rng.standard_normal(dim).astype(np.float32))
    with other.session() as s:  # the id is taken, its row not visible yet
        s.execute(delete(Embedding).where(Embedding.id == reserved))
    _embed(other, _new_face(other), rng.standard_normal(dim).astype(np.float32))  # a higher id, committed first
    app.index()
    count, top, _ = app.index(sync=False).stamp()
    victim = min(_db_pairs(app))
    _embed(other, late_face, rng.standard_normal(dim).astype(np.float32), row_id=reserved)  # the late commit
    with other.session() as s:
        s.delete(s.get(Face, victim))
    with app.sessions() as s:
        db_count, db_top, _ = embedding_stamp(s, app.model_version)
    assert (db_count, db_top) == (count, top)  # what (count, max) alone would have missed
    assert late_face in app.index() and victim not in app.index()
    _in_step(app)
