"""Answers users can trust, with the real detector, landmarks, dlib embedder, face-quality
gate and calibrated 1:N rule: a box that is not a face is neither searched nor enrolled;
a stranger is "no match" in every column; a photo's bystander never decides who the
photo is; a photo without a face is an empty answer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata
from sqlalchemy import select

from pipeline.library import identities
from webapp import views
from pipeline.library.clustering import unknown_face_ids
from pipeline.context import Lab
from pipeline.errors import InvalidRequest
from pipeline.library.identify import stored_face_quality
from pipeline.datasets.import_data import import_dataset
from pipeline.library.ingest import Upload, ingest
from pipeline.library.search import search_face, search_image
from pipeline.settings import Settings
from storage.orm import Face, Image
from tests.conftest import astronaut_photo

# Eileen Collins' face in skimage.data.astronaut() (512x512), read off by eye
ASTRONAUT_FACE = (178, 75, 274, 180)
SUIT = (150, 300, 330, 480)  # her space suit: not a face


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _cameraman() -> np.ndarray:
    """skimage's cameraman (a real face, not Eileen Collins), as RGB."""
    return np.repeat(skdata.camera()[:, :, None], 3, axis=2)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The astronaut photo imported with two boxes, her face and her suit (COCO, so the
    boxes are exactly these), in a library with the app's default decision rule."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    (root / "images" / "astronaut.png").write_bytes(_png(skdata.astronaut()))
    doc = {"images": [{"id": 1, "file_name": "astronaut.png", "width": 512, "height": 512}],
           "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
                           for i, (x1, y1, x2, y2) in enumerate((ASTRONAUT_FACE, SUIT))],
           "categories": [{"id": 1, "name": "face"}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    with Lab.open(Settings(data_dir=tmp_path_factory.mktemp("lab"))) as opened:
        assert opened.quality_model() is not None and opened.open_set_calibration() is not None
        report = import_dataset(opened, root)
        assert report.faces_new == 2
        yield opened


def _face_ids(lab: Lab) -> tuple[int, int]:
    with lab.sessions() as s:
        face, suit = s.scalars(select(Face.id).join(Image).where(Image.original_name == "astronaut.png")
                               .order_by(Face.y1)).all()
    return face, suit


def test_a_box_that_is_not_a_face_is_not_searched_suggested_or_enrolled(lab: Lab) -> None:
    face, suit = _face_ids(lab)
    quality = stored_face_quality(lab, [face, suit])
    assert quality[face][1] and not quality[suit][1], quality
    assert quality[suit][0] < lab.quality_model().threshold <= quality[face][0]
    # searching for the suit finds nothing and names nobody
    found = search_face(lab, suit, k=5)
    assert not found.faces[0].searchable and found.faces[0].matches == [] and found.best_person is None
    # it is not in anyone's similar faces, and not in the groups of unknown faces
    assert suit not in [m.face_id for m in search_face(lab, face, k=5).faces[0].matches]
    assert suit not in unknown_face_ids(lab)
    with pytest.raises(InvalidRequest, match="may not be a face"):
        identities.enroll(lab, suit, "Space Suit")
    # enrolling the photo takes its face, not the suit
    with lab.sessions() as s:
        image_id = s.scalars(select(Image.id).where(Image.original_name == "astronaut.png")).one()
    person = identities.enroll_photo(lab, image_id, "Eileen Collins")
    with lab.sessions() as s:
        assert s.get(Face, face).identity_id == person.identity_id and s.get(Face, suit).identity_id is None


def test_a_person_can_still_confirm_a_box_the_gate_doubts(tmp_path: Path) -> None:
    with Lab.open(Settings(data_dir=tmp_path)) as lab:
        report = ingest(lab, [Upload("astronaut.png", data=_png(skdata.astronaut()))])
        (face,) = report.files[0].faces
        assert face.searchable  # a real face passes
        with lab.write_lock, lab.session() as s:  # move the box onto the suit, as a labeler could
            row = s.get(Face, face.face_id)
            row.x1, row.y1, row.x2, row.y2 = map(float, SUIT)
            row.landmarks = None  # found again from the new box when it is embedded
        from pipeline.library.embed import embed_faces
        from storage.orm import Embedding

        with lab.session() as s:
            s.query(Embedding).filter(Embedding.face_id == face.face_id).delete()
        embed_faces(lab, [face.face_id])
        assert not stored_face_quality(lab, [face.face_id])[face.face_id][1]
        with pytest.raises(InvalidRequest):
            identities.enroll(lab, face.face_id, "Suit")
        identities.enroll(lab, face.face_id, "Suit", confirm_face=True)  # "it is a face", said a person
        assert stored_face_quality(lab, [face.face_id])[face.face_id][1]  # confirmed: searchable now


def test_a_stranger_is_no_match_in_every_column(tmp_path: Path) -> None:
    with Lab.open(Settings(data_dir=tmp_path)) as lab:
        photos = [Upload(f"eileen{i}.jpg", data=astronaut_photo(i)) for i in range(4)]
        for result in ingest(lab, photos).files:
            identities.enroll_photo(lab, result.image_id, "Eileen Collins")
        query = tmp_path / "cameraman.png"
        query.write_bytes(_png(_cameraman()))
        result = search_image(lab, query.read_bytes(), k=10)
        (face,) = result.faces
        assert face.searchable and result.primary == 0
        assert face.people and face.people[0].name == "Eileen Collins"  # the closest, but...
        assert face.people[0].similarity < result.threshold
        assert result.best_person is None and face.decision is None
        assert not any(p.is_match for p in face.people) and not any(m.is_match for m in face.matches)
        view = views.search(lab, query, 10, None)
        assert "No match" in view.message and "Eileen" in view.message
        assert {row[3] for row in view.rows} <= {"no", "—"} and view.rows
        assert view.details["person"] is None and view.details["faces"][0]["person"] is None
        assert not any(p["match"] for p in view.details["faces"][0]["people"])
        # and she is still found when it is her
        again = search_image(lab, astronaut_photo(9), k=10)
        assert again.best_person is not None and again.best_person.name == "Eileen Collins"


def test_the_main_face_decides_not_a_bystander(tmp_path: Path) -> None:
    with Lab.open(Settings(data_dir=tmp_path)) as lab:
        (cameraman,) = ingest(lab, [Upload("cameraman.png", data=_png(_cameraman()))]).files
        identities.enroll_photo(lab, cameraman.image_id, "Cameraman")
        # Eileen Collins (not enrolled) big in the middle, the cameraman small in a corner
        canvas = np.full((900, 1200, 3), 90, np.uint8)
        canvas[150:662, 344:856] = skdata.astronaut()
        small = np.asarray(PILImage.fromarray(_cameraman()).resize((300, 300)))
        canvas[600:900, 900:1200] = small
        result = search_image(lab, _png(canvas), k=5)
        assert len(result.faces) == 2
        main = result.primary_face
        assert main is not None and main.box[0] > 300 and main.box[2] < 900  # the astronaut
        bystander = next(f for f in result.faces if not f.is_primary)
        assert bystander.decision is not None and bystander.decision.name == "Cameraman"
        assert result.best_person is None  # the photo is not of the cameraman
