"""storage.faiss_index on real FAISS (and, at the end, real SQLite as the source of truth)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from storage.embedding_rows import embedding_rows, embedding_stamp, fetch_embedding_rows
import storage.faiss_index as storage_faiss
from storage.faiss_index import MANIFEST_FORMAT, FaceIndex, IndexPolicy, ids_checksum, rows_checksum
from storage.orm import Embedding, Face, Image

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def rows_of(ids: np.ndarray) -> np.ndarray:
    """Row ids standing in for the embedding rows the vectors came from."""
    return np.asarray(ids, dtype=np.int64) + 10_000


@pytest.fixture
def filled(rng) -> tuple[FaceIndex, np.ndarray, np.ndarray]:
    ids = np.arange(100, 400, dtype=np.int64)
    vecs = unit(rng, len(ids))
    index = FaceIndex("dlib-v1", DIM)
    index.add(ids, vecs, rows_of(ids))
    return index, ids, vecs


class Fetcher:
    """A fetch_all callable that counts its calls."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.ids, self.vectors, self.calls = ids, vectors, 0
        self.rows = rows_of(ids) if rows is None else rows

    def __call__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.calls += 1
        return self.ids, self.vectors, self.rows


# -- in memory ----------------------------------------------------------------------------------


def test_search_matches_brute_force_cosine(filled, rng) -> None:
    index, ids, vecs = filled
    queries = rng.standard_normal((5, DIM)).astype(np.float32) * 3.0  # not normalised on purpose
    scores, got = index.search(queries, 7)
    assert scores.shape == got.shape == (5, 7) and got.dtype == np.int64
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ vecs.T
    order = np.argsort(-cos, axis=1)[:, :7]
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(cos, order, axis=1), atol=1e-5)


def test_single_query_finds_itself(filled) -> None:
    index, ids, vecs = filled
    scores, got = index.search(vecs[42] * 5.0, 3)
    assert scores.shape == got.shape == (3,)
    assert got[0] == ids[42] and scores[0] == pytest.approx(1.0, abs=1e-5)


def test_add_replaces_existing_ids(filled, rng) -> None:
    index, ids, _ = filled
    new = unit(rng, 2)
    index.add([ids[0], ids[1]], new * 2.0)
    assert len(index) == len(ids)
    np.testing.assert_allclose(index.reconstruct(int(ids[0])), new[0], atol=1e-6)
    assert index.search(new[1], 1)[1][0] == ids[1]
    # within one call the last vector for a repeated id wins
    index.add([7, 7], new)
    assert len(index) == len(ids) + 1
    np.testing.assert_allclose(index.reconstruct(7), new[1], atol=1e-6)


def test_remove(filled) -> None:
    index, ids, vecs = filled
    assert index.remove([ids[0], ids[1], 999_999]) == 2
    assert len(index) == len(ids) - 2 and ids[0] not in index and ids[2] in index
    _, got = index.search(vecs[:2], len(index))
    assert not np.isin(got, ids[:2]).any()
    assert index.remove([ids[0]]) == 0
    with pytest.raises(KeyError):
        index.reconstruct(int(ids[0]))


def test_k_larger_than_index_and_empty_index(rng) -> None:
    index = FaceIndex("v", DIM)
    s, i = index.search(unit(rng, 1)[0], 5)
    assert s.shape == i.shape == (0,)
    s, i = index.search(unit(rng, 3), 5)
    assert s.shape == i.shape == (3, 0)
    index.add([1, 2], unit(rng, 2))
    s, i = index.search(unit(rng, 4), 10)
    assert i.shape == (4, 2) and (i != -1).all()
    assert sorted(index.search(unit(rng, 1)[0], 10)[1]) == [1, 2]


def test_bad_vectors_are_refused(rng) -> None:
    index = FaceIndex("v", DIM)
    with pytest.raises(ValueError, match="dim"):
        index.add([1], unit(rng, 1, DIM + 1))
    with pytest.raises(ValueError, match="NaN"):
        index.add([1], np.full((1, DIM), np.nan))
    with pytest.raises(ValueError, match="zero"):
        index.add([1], np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="ids"):
        index.add([1, 2], unit(rng, 3))
    assert len(index) == 0


def test_concurrent_adds_and_searches(rng) -> None:
    index = FaceIndex("v", DIM)
    chunks = [(np.arange(t * 1000, t * 1000 + 200), unit(rng, 200)) for t in range(4)]
    errors: list[BaseException] = []

    def writer(ids, vecs) -> None:
        try:
            for start in range(0, 200, 20):
                index.add(ids[start : start + 20], vecs[start : start + 20])
                index.search(vecs[start], 5)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=chunk) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(index) == 800
    assert set(index.ids().tolist()) == {int(i) for ids, _ in chunks for i in ids}
    for ids, vecs in chunks:
        assert index.search(vecs[17], 1)[1][0] == ids[17]


# -- files ----------------------------------------------------------------------------------------


def test_save_and_load(filled, tmp_path: Path) -> None:
    index, ids, vecs = filled
    assert index.dirty
    index_path = index.save(tmp_path)
    assert not index.dirty
    _, manifest_path = FaceIndex.paths(tmp_path, "dlib-v1")
    assert index_path.is_file() and manifest_path.is_file()
    # base (index, ids, manifest), an empty delta and the lock file; no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in FaceIndex.all_paths(tmp_path, "dlib-v1"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model_version"] == "dlib-v1" and manifest["dim"] == DIM and manifest["kind"] == "flat"
    assert manifest["count"] == len(ids) and manifest["ids_checksum"] == ids_checksum(ids)
    assert manifest["format"] == MANIFEST_FORMAT == 3 and manifest["rows_checksum"] == rows_checksum(ids, rows_of(ids))
    loaded = FaceIndex.load(tmp_path, "dlib-v1", DIM)
    assert len(loaded) == len(ids) and not loaded.dirty
    np.testing.assert_array_equal(loaded.search(vecs[:4], 5)[1], index.search(vecs[:4], 5)[1])
    assert ids[5] in loaded and loaded.row_id(ids[5]) == rows_of(ids)[5]  # row ids are in the files


def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.name.split(".", 1)[1]: p.stat().st_size for p in directory.iterdir()}


def test_later_saves_append_changes_and_loading_replays_them(filled, tmp_path: Path, rng) -> None:
    index, ids, vecs = filled
    index.save(tmp_path)
    base = _file_sizes(tmp_path)
    index_file, manifest_file = FaceIndex.paths(tmp_path, "dlib-v1")
    base_bytes, manifest_text = index_file.read_bytes(), manifest_file.read_text()
    new = unit(rng, 3)
    index.add([9001, 9002, int(ids[0])], new, [1, 2, 3])  # two new faces, one re-embedded
    index.remove([ids[1]])
    index.save()
    # the base files are untouched; the delta grew by the changes only
    assert index_file.read_bytes() == base_bytes and manifest_file.read_text() == manifest_text
    grown = _file_sizes(tmp_path)
    assert grown["delta"] > base["delta"] and grown["delta"] - base["delta"] < 3 * (16 + 4 * DIM) + 200
    loaded = FaceIndex.load(tmp_path, "dlib-v1", DIM)
    np.testing.assert_array_equal(loaded.rows()[0], index.rows()[0])
    np.testing.assert_array_equal(loaded.rows()[1], index.rows()[1])
    assert loaded.stamp() == index.stamp() and ids[1] not in loaded
    np.testing.assert_allclose(loaded.reconstruct(int(ids[0])), new[2], atol=1e-6)
    assert loaded.search(new[1], 1)[1][0] == 9002


def test_a_torn_delta_record_ends_the_replay_and_a_checkpoint_folds_the_delta(filled, tmp_path: Path, rng) -> None:
    index, ids, _ = filled
    index.save(tmp_path)
    first, second = unit(rng, 2)
    index.add([9001], first[None], [1])
    index.save()
    index.add([9002], second[None], [2])
    index.save()
    first, second = index.reconstruct(9001), index.reconstruct(9002)  # as stored (normalised)
    index_file, delta = FaceIndex.all_paths(tmp_path, "dlib-v1")[0], FaceIndex.all_paths(tmp_path, "dlib-v1")[3]
    whole = delta.read_bytes()
    assert first.tobytes() in whole
    delta.write_bytes(whole[:-10])  # a crash in the middle of the second append
    loaded = FaceIndex.load(tmp_path, "dlib-v1", DIM)
    assert 9001 in loaded and 9002 not in loaded and len(loaded) == len(ids) + 1
    delta.write_bytes(whole)
    index.remove([9001])
    index.save(checkpoint=True)  # what a privacy delete asks for: base rewritten, delta emptied
    assert 9001 not in FaceIndex.load(tmp_path, "dlib-v1", DIM) and 9002 in FaceIndex.load(tmp_path, "dlib-v1", DIM)
    # the removed face's vector is on no file any more (and zeroed in memory); others are
    assert first.tobytes() not in index_file.read_bytes() + delta.read_bytes()
    assert second.tobytes() in index_file.read_bytes()


def test_model_versions_get_separate_files(tmp_path: Path) -> None:
    a, b = FaceIndex.paths(tmp_path, "dlib/v1"), FaceIndex.paths(tmp_path, "dlib:v1")
    assert a != b and all(p.parent == tmp_path for p in (*a, *b))
    assert "/" not in a[0].name and ".." not in FaceIndex.paths(tmp_path, "../../x")[0].name


def test_ids_checksum_ignores_order_and_repeats() -> None:
    assert ids_checksum([3, 1, 2]) == ids_checksum(np.array([1, 2, 3, 3]))
    assert ids_checksum([1, 2, 3]) != ids_checksum([1, 2, 4])


def test_rows_checksum_ignores_order_and_sees_a_new_row_for_the_same_face() -> None:
    assert rows_checksum([3, 1, 2], [30, 10, 20]) == rows_checksum([1, 2, 3], [10, 20, 30])
    assert rows_checksum([1, 2, 3], [10, 20, 30]) != rows_checksum([1, 2, 3], [10, 20, 31])  # face 3 re-embedded
    assert rows_checksum([1, 2, 3], [10, 20, 30]) != rows_checksum([1, 2, 3], [20, 10, 30])  # pairs, not two sets
    with pytest.raises(ValueError):
        rows_checksum([1, 2], [10])


def test_stamp_follows_adds_replacements_and_removals(rng) -> None:
    index = FaceIndex("v", DIM)
    assert index.stamp() == (0, 0, 0)
    index.add([1, 2, 3], unit(rng, 3), [11, 12, 13])
    assert index.stamp() == (3, 13, 36)
    index.add([2], unit(rng, 1), [14])  # face 2 re-embedded: new row
    assert index.stamp() == (3, 14, 11 + 13 + 14) and index.row_id(2) == 14
    index.remove([2])  # the newest row goes: the max is found again
    assert index.stamp() == (2, 13, 24)
    ids, rows = index.rows()
    assert ids.tolist() == [1, 3] and rows.tolist() == [11, 13]


def test_keep_newer_skips_rows_the_index_already_holds_or_that_were_replaced(rng) -> None:
    index = FaceIndex("v", DIM)
    old, new = unit(rng, 2)
    index.add([7], new[None], [20])
    # the same change applied twice, and an older row arriving late, are both no-ops
    assert index.add([7], new[None], [20], keep_newer=True) == 0
    assert index.add([7], old[None], [15], keep_newer=True) == 0
    np.testing.assert_allclose(index.reconstruct(7), new, atol=1e-6)
    # a newer row replaces; without keep_newer the caller's row always wins
    assert index.add([7, 8], unit(rng, 2), [25, 26], keep_newer=True) == 2 and index.row_id(7) == 25
    assert index.add([7], old[None], [15]) == 1 and index.row_id(7) == 15
    assert index.stamp() == (2, 26, 15 + 26)


@pytest.fixture
def saved(filled, tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    index, ids, vecs = filled
    index.save(tmp_path)
    return tmp_path, ids, vecs


def _load_or_rebuild(directory: Path, fetch: Fetcher) -> FaceIndex:
    return FaceIndex.load_or_rebuild(directory, "dlib-v1", DIM, fetch, face_ids=fetch.ids, row_ids=fetch.rows)


def test_load_or_rebuild_loads_a_matching_index(saved) -> None:
    directory, ids, vecs = saved
    fetch = Fetcher(ids, vecs)
    index = _load_or_rebuild(directory, fetch)
    assert fetch.calls == 0 and len(index) == len(ids)
    got_ids, got_rows = index.rows()  # row ids come from the database's pairs
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_rows, rows_of(ids))
    assert index.stamp() == (len(ids), int(rows_of(ids).max()), int(rows_of(ids).sum()))


def _damage(kind: str, directory: Path) -> None:
    index_path, manifest_path = FaceIndex.paths(directory, "dlib-v1")
    if kind == "index deleted":
        index_path.unlink()
    elif kind == "index corrupted":
        raw = bytearray(index_path.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
        index_path.write_bytes(bytes(raw))
    elif kind == "index truncated":
        index_path.write_bytes(index_path.read_bytes()[:100])
    elif kind == "manifest deleted":
        manifest_path.unlink()
    elif kind == "manifest garbage":
        manifest_path.write_text("{not json")
    elif kind == "manifest other dim":
        manifest = json.loads(manifest_path.read_text())
        manifest["dim"] = DIM * 2
        manifest_path.write_text(json.dumps(manifest))
    elif kind == "manifest format 1":  # written by a FaceLab that checked only the face id set
        manifest = json.loads(manifest_path.read_text())
        manifest["format"] = 1
        del manifest["rows_checksum"]
        manifest_path.write_text(json.dumps(manifest))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["index deleted", "index corrupted", "index truncated", "manifest deleted", "manifest garbage", "manifest other dim",
     "manifest format 1"],
)
def test_load_or_rebuild_rebuilds_damaged_files(saved, kind: str) -> None:
    directory, ids, vecs = saved
    _damage(kind, directory)
    fetch = Fetcher(ids, vecs)
    index = _load_or_rebuild(directory, fetch)
    assert fetch.calls == 1 and len(index) == len(ids)
    assert index.search(vecs[3], 1)[1][0] == ids[3]
    # the rebuilt index was saved: the next start loads it without asking the database
    again = Fetcher(ids, vecs)
    assert len(_load_or_rebuild(directory, again)) == len(ids) and again.calls == 0


def test_load_or_rebuild_follows_the_database(saved, rng) -> None:
    directory, ids, vecs = saved
    # the database gained a face since the index was saved: count differs
    db_ids, db_vecs = np.append(ids, 5000), np.vstack([vecs, unit(rng, 1)])
    fetch = Fetcher(db_ids, db_vecs)
    index = _load_or_rebuild(directory, fetch)
    assert fetch.calls == 1 and 5000 in index and len(index) == len(db_ids)
    # same count, different ids (one face deleted, another added): only the checksum tells
    db_ids2 = db_ids.copy()
    db_ids2[0] = 6000
    fetch2 = Fetcher(db_ids2, db_vecs)
    index2 = _load_or_rebuild(directory, fetch2)
    assert fetch2.calls == 1 and 6000 in index2 and ids[0] not in index2
    # same face ids, one face re-embedded (a moved box: new vector, new row id): the
    # manifest's (face id, row id) pairs tell, and the new vector is served
    db_vecs3, db_rows3 = db_vecs.copy(), rows_of(db_ids2)
    db_vecs3[1], db_rows3[1] = unit(rng, 1)[0], 99_999
    fetch3 = Fetcher(db_ids2, db_vecs3, db_rows3)
    index3 = _load_or_rebuild(directory, fetch3)
    assert fetch3.calls == 1 and index3.row_id(db_ids2[1]) == 99_999
    np.testing.assert_allclose(index3.reconstruct(db_ids2[1]), db_vecs3[1], atol=1e-6)
    again = Fetcher(db_ids2, db_vecs3, db_rows3)
    assert len(_load_or_rebuild(directory, again)) == len(db_ids2) and again.calls == 0


def test_index_built_from_the_database(db_sessions, tmp_data_dir: Path, rng) -> None:
    vecs = unit(rng, 6)
    with db_sessions() as s, s.begin():
        img = Image(sha256="a" * 64, upload_sha256="a" * 64, original_name="x.jpg", width=100, height=100,
                    size_bytes=1, mime="image/jpeg")
        faces = [Face(image=img, x1=i, y1=0, x2=i + 10, y2=10, origin="test") for i in range(6)]
        s.add_all(faces)
        s.flush()
        for face, vec in zip(faces, vecs, strict=True):
            s.add(Embedding.from_array(face.id, "dlib-v1", vec))
        face_ids = [f.id for f in faces]
    index_dir = tmp_data_dir / "index"
    with db_sessions() as s:
        db_ids, db_rows = embedding_rows(s, "dlib-v1")
        index = FaceIndex.load_or_rebuild(
            index_dir, "dlib-v1", DIM, lambda: fetch_embedding_rows(s, "dlib-v1", DIM),
            face_ids=db_ids, row_ids=db_rows,
        )
        assert embedding_stamp(s, "dlib-v1") == index.stamp()  # SQL and index agree on the stamp
        assert embedding_stamp(s, "other") == (0, 0, 0)
        # only the rows asked for, by face id
        some = fetch_embedding_rows(s, "dlib-v1", DIM, [int(db_rows[4]), int(db_rows[1]), 10**9])
    assert sorted(index.ids().tolist()) == face_ids
    assert index.search(vecs[4], 1)[1][0] == face_ids[4]
    assert some[0].tolist() == [face_ids[1], face_ids[4]] and some[2].tolist() == [db_rows[1], db_rows[4]]
    np.testing.assert_allclose(some[1][1], vecs[4], atol=1e-6)


# -- structure by size: HNSW above a threshold, tombstones, rebuilds ---------------------------


def clustered(rng: np.random.Generator, people: int, per_person: int, dim: int = DIM) -> np.ndarray:
    """Face-like data: tight clusters (one per person) around spread-out centres."""
    centres = unit(rng, people, dim)
    vecs = np.repeat(centres, per_person, axis=0) + 0.25 * rng.standard_normal((people * per_person, dim))
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


SMALL = IndexPolicy(hnsw_above=400, hnsw_m=16, ef_search=64, exact_candidates=50, rebuild_dead_min=50,
                    delta_min_faces=100)


def _exact(vecs: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ vecs.T
    return ids[np.argsort(-sims, axis=1)[:, :k]]


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got.tolist(), want.tolist(), strict=True)]))


def test_a_growing_index_switches_to_hnsw_and_keeps_finding_the_nearest(rng) -> None:
    vecs = clustered(rng, 120, 8)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex("v", DIM, policy=SMALL)
    index.add(ids[:300], vecs[:300], ids[:300])
    assert index.kind == "flat"
    for start in range(300, len(ids), 100):  # crosses hnsw_above on the way
        index.add(ids[start : start + 100], vecs[start : start + 100], ids[start : start + 100])
    assert index.kind == "hnsw" and len(index) == len(ids)
    queries = vecs[::7] + 0.05 * rng.standard_normal((len(vecs[::7]), DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, got = index.search(queries, 10)
    assert _recall(got, _exact(vecs, ids, queries, 10)) >= 0.95
    assert index.search(vecs[500], 1)[1][0] == ids[500]
    np.testing.assert_allclose(index.reconstruct(int(ids[500])), vecs[500], atol=1e-6)


def test_hnsw_removal_and_replacement_are_tombstones_filtered_at_search(rng) -> None:
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex.build("v", DIM, ids, vecs, row_ids=ids, policy=SMALL)
    assert index.kind == "hnsw"
    gone = ids[:20]
    assert index.remove(gone) == 20
    new = unit(rng, 1)[0]
    index.add([ids[30]], new[None], [10_000])  # re-embedded: the old vector is a tombstone now
    assert index._store.dead == 21 and len(index) == len(ids) - 20
    _, got = index.search(vecs[:40], 10)
    assert not np.isin(got, gone).any()
    assert index.search(new, 1)[1][0] == ids[30]
    assert ids[30] not in index.search(vecs[30], 10)[1][:1]
    with pytest.raises(KeyError):
        index.reconstruct(int(gone[0]))
    assert index.stamp() == (len(ids) - 20, 10_000, int(ids[20:].sum()) - int(ids[30]) + 10_000)


def test_tombstones_past_their_share_rebuild_the_graph(rng) -> None:
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex.build("v", DIM, ids, vecs, policy=SMALL)
    index.remove(ids[:100])  # 100 of 600 positions: below the share, tombstones stay
    assert index._store.dead == 100 and index.kind == "hnsw"
    index.remove(ids[100:150])  # 150 >= 0.2 * 600: rebuilt without them
    assert index._store.dead == 0 and index._store.positions == len(ids) - 150 and index.kind == "hnsw"
    assert index.search(vecs[400], 1)[1][0] == ids[400] and len(index) == len(ids) - 150
    index.remove(ids[150:450])  # 150 left, below half the threshold: back to exact search
    assert index.kind == "flat" and len(index) == 150
    _, got = index.search(vecs[450:], 5)
    np.testing.assert_array_equal(got, _exact(vecs[450:], ids[450:], vecs[450:], 5))


def test_among_is_exact_for_a_few_candidates_and_filtered_for_many(rng) -> None:
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex.build("v", DIM, ids, vecs, policy=SMALL)
    index.remove(ids[:5])
    queries = vecs[::50]
    for among in (ids[::25], ids[::3]):  # 24 candidates (exact path) and 200 (selector on the graph)
        live = among[~np.isin(among, ids[:5])]
        scores, got = index.search(queries, 8, among=among)
        assert np.isin(got[got >= 0], live).all()
        want = _exact(vecs[live - 1], live, queries, 8)
        if len(among) <= SMALL.exact_candidates:
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(scores, np.take_along_axis(queries @ vecs.T, want - 1, axis=1), atol=1e-5)
        else:
            assert _recall(got, want) >= 0.9
    # unknown and removed ids are ignored; a list with nobody left gives empty answers
    s, got = index.search(queries, 5, among=np.array([ids[0], 10**9]))
    assert got.shape == (len(queries), 0)
    # the candidate cache follows changes
    near = ids[:10] + 100  # faces 101..110, near query 2 (vector 100)
    assert index.search(queries[2], 1, among=near)[1][0] == 101
    index.add([101], -vecs[100][None])  # now the opposite of that query
    assert index.search(queries[2], 1, among=near)[1][0] != 101


def test_an_hnsw_index_round_trips_through_its_files(rng, tmp_path: Path) -> None:
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex.build("v", DIM, ids, vecs, tmp_path, row_ids=ids + 5, policy=SMALL)
    index.save()
    index.remove(ids[:10])
    index.add([5000], unit(rng, 1), [7000])
    index.save()
    loaded = FaceIndex.load(tmp_path, "v", DIM, policy=SMALL)
    assert loaded.kind == "hnsw" and loaded.stamp() == index.stamp()
    np.testing.assert_array_equal(loaded.search(vecs[::9], 10)[1], index.search(vecs[::9], 10)[1])
    assert FaceIndex.read_manifest(tmp_path, "v")["kind"] == "hnsw"


def test_changes_during_a_rebuild_are_replayed_onto_the_new_structure(rng) -> None:
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex.build("v", DIM, ids, vecs, policy=SMALL)
    index.remove(ids[:100])
    real_build = storage_faiss._build_store
    extra = unit(rng, 3)

    def build_while_others_write(*args, **kwargs):  # noqa: ANN002, ANN003
        # another thread writes while the new structure is being built outside the lock
        t = threading.Thread(target=lambda: (index.add([7001, 7002], extra[:2]), index.remove([ids[200]])))
        t.start()
        t.join()
        return real_build(*args, **kwargs)

    storage_faiss._build_store = build_while_others_write
    try:
        index.rebuild()
    finally:
        storage_faiss._build_store = real_build
    assert 7001 in index and 7002 in index and ids[200] not in index and ids[0] not in index
    assert index.search(extra[1], 1)[1][0] == 7002
    assert ids[200] not in index.search(vecs[200], 10)[1]
    assert index._store.dead == 1  # only the removal made during the build


def test_held_vectors_reads_ids_and_vectors_together() -> None:
    """What a search reads after a concurrent delete: only the ids still held, with their
    vectors, never a KeyError (the CI run of test_concurrency found the two-step read racing)."""
    from storage.faiss_index import FaceIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    index = FaceIndex("held-test", 8)
    index.add(np.arange(1, 6, dtype=np.int64), vectors, np.arange(11, 16, dtype=np.int64))
    index.remove([3])
    kept, got = index.held_vectors([1, 3, 5, 99])
    assert kept == [1, 5] and got.shape == (2, 8)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(got, unit[[0, 4]], atol=1e-6)


def test_large_graphs_search_with_the_larger_ef() -> None:
    policy = IndexPolicy()
    assert policy.ef_search_for(policy.large_graph - 1) == policy.ef_search
    assert policy.ef_search_for(policy.large_graph) == policy.ef_search_large > policy.ef_search


def test_fp16_graphs_walk_half_precision_but_answer_with_exact_scores(rng) -> None:
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    index = FaceIndex.build("v", DIM, ids, vecs, policy=SMALL)
    assert SMALL.hnsw_storage == "fp16" and index._store.refined is not None
    queries = vecs[::11]
    scores, got = index.search(queries, 10)
    # re-scored against the float32 vectors: each score is the exact cosine of its face
    exact = np.take_along_axis(queries @ vecs.T, got - 1, axis=1)
    np.testing.assert_allclose(scores, exact, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 1e-7).all()  # best first
    assert _recall(got, _exact(vecs, ids, queries, 10)) >= 0.95
    # a removed face's vector leaves both copies: float32 and the graph's fp16 one
    at = index._store.pos[int(ids[7])]
    assert index._store._fp16_codes()[at].any()
    index.remove([ids[7]])
    assert not index._store.vectors()[at].any() and not index._store._fp16_codes()[at].any()


def test_a_float32_graph_saved_before_fp16_still_loads_and_becomes_fp16_at_its_rebuild(rng, tmp_path: Path) -> None:
    from dataclasses import replace

    old_policy = replace(SMALL, hnsw_storage="flat")
    vecs = clustered(rng, 100, 6)
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64)
    old = FaceIndex.build("v", DIM, ids, vecs, tmp_path, row_ids=ids, policy=old_policy)
    assert old._store.refined is None
    old.save()
    assert FaceIndex.read_manifest(tmp_path, "v")["hnsw"]["storage"] == "flat"
    loaded = FaceIndex.load(tmp_path, "v", DIM, policy=SMALL)
    assert loaded.kind == "hnsw" and loaded._store.refined is None
    np.testing.assert_array_equal(loaded.search(vecs[::9], 10)[1], old.search(vecs[::9], 10)[1])
    loaded.remove(ids[:150])  # past the tombstone share: rebuilt, now as the policy says
    assert loaded.kind == "hnsw" and loaded._store.refined is not None
    assert loaded.search(vecs[400], 1)[1][0] == ids[400]
    loaded.save()
    assert FaceIndex.read_manifest(tmp_path, "v")["hnsw"]["storage"] == "fp16"
    again = FaceIndex.load(tmp_path, "v", DIM, policy=SMALL)
    assert again._store.refined is not None and again.stamp() == loaded.stamp()
    np.testing.assert_array_equal(again.search(vecs[::9], 10)[1], loaded.search(vecs[::9], 10)[1])
