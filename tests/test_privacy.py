"""Privacy: a deleted person or photo leaves no trace (rows, vectors of every model version,
index files, label history, audit details, stored and cached files, SQLite free pages), the
deletion itself is audited without personal data, and stored photos carry no EXIF/GPS."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import PngImagePlugin
from skimage import data as skdata
from sqlalchemy import func, select

from pipeline.library import clustering
from pipeline.library import identities
from pipeline.labeling import edits as labeling
from pipeline.library import privacy
from webapp import views
from pipeline.library.consistency import check
from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.library.ingest import Upload, ingest
from pipeline.settings import Settings
from storage.faiss_index import FaceIndex
from storage.image_decode import decode_upload, strip_jpeg_metadata
from storage.orm import AuditLog, Embedding, Face, Identity, Image, LabelRevision

NAME, ALIAS, OTHER = "Zelda Quackenbush", "Zelda Alias-Name", "Keeper Person"
OTHER_VERSION = "some-older-embedder-v0"


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _variant(brightness: float, size: int = 512, canvas: tuple[int, int] = (560, 620),
             at: tuple[int, int] = (20, 40)) -> np.ndarray:
    """The astronaut, scaled and dimmed, on a plain canvas: a new photo with one face."""
    face = PILImage.fromarray(skdata.astronaut()).resize((size, size))
    out = np.full((*canvas, 3), 80, np.uint8)
    out[at[0] : at[0] + size, at[1] : at[1] + size] = (np.asarray(face) * brightness).clip(0, 255).astype(np.uint8)
    return out


def _two_faces(brightness: float) -> np.ndarray:
    left = np.asarray(PILImage.fromarray(skdata.astronaut()).resize((320, 320)))
    right = np.asarray(PILImage.fromarray(skdata.astronaut()).transpose(PILImage.FLIP_LEFT_RIGHT).resize((320, 320)))
    out = np.full((380, 720, 3), 60, np.uint8)
    out[30:350, 20:340] = (left * brightness).clip(0, 255).astype(np.uint8)
    out[30:350, 380:700] = (right * brightness).clip(0, 255).astype(np.uint8)
    return out


def _gps_exif() -> bytes:
    exif = PILImage.Exif()
    exif[0x010F] = "PhoneMaker"  # camera make
    exif[0xA431] = "SERIAL-12345"  # body serial number
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}  # GPS IFD
    return exif.tobytes()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Lab]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("privacy"), database_url=database_url, match_threshold=0.8)
    with Lab.open(settings) as opened:
        yield opened


# -- metadata -----------------------------------------------------------------------------------
def test_stored_jpegs_lose_exif_gps_and_comments_but_keep_their_pixels(lab: Lab) -> None:
    rgb = _variant(0.97)
    upload = _jpeg(rgb, exif=_gps_exif(), comment=b"at home, Elm Street 5")
    for progressive in (False, True):
        data = _jpeg(rgb, exif=_gps_exif(), comment=b"at home, Elm Street 5", progressive=progressive)
        decoded = decode_upload(data, "phone.jpg")
        for secret in (b"PhoneMaker", b"SERIAL-12345", b"Elm Street", b"Exif\0\0"):
            assert secret in data and secret not in decoded.data
        with PILImage.open(io.BytesIO(decoded.data)) as stored:
            assert not stored.getexif() and "comment" not in stored.info
            np.testing.assert_array_equal(np.asarray(stored.convert("RGB")),
                                          np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB")))
        assert decoded.upload_sha256 != decoded.sha256  # the upload is still recognised as a duplicate

    (result,) = ingest(lab, [Upload("phone.jpg", data=upload)]).files
    assert result.ok
    stored_bytes = lab.images.read_bytes(result.sha256)
    assert b"PhoneMaker" not in stored_bytes and b"Elm Street" not in stored_bytes
    (again,) = ingest(lab, [Upload("again.jpg", data=upload)]).files
    assert again.duplicate and again.image_id == result.image_id


def test_reencoded_and_converted_uploads_carry_no_metadata() -> None:
    rgb = _variant(0.9)
    exif = PILImage.Exif()
    exif.load(_gps_exif())
    exif[0x0112] = 6  # rotated: this JPEG is re-encoded, not stripped in place
    rotated = io.BytesIO()
    PILImage.fromarray(rgb).save(rotated, format="JPEG", exif=exif.tobytes(), comment=b"Elm Street 5")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Elm Street 5")
    png = io.BytesIO()
    PILImage.fromarray(rgb).save(png, format="PNG", pnginfo=info, exif=_gps_exif())
    for data in (rotated.getvalue(), png.getvalue()):
        decoded = decode_upload(data, "x")
        assert b"Elm Street" in data and b"Elm Street" not in decoded.data
        assert b"PhoneMaker" not in decoded.data and b"SERIAL-12345" not in decoded.data


def test_metadata_stripping_keeps_colour_profile_and_rejects_garbage() -> None:
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = _jpeg(_variant(0.8), icc_profile=icc, exif=_gps_exif())
    stripped = strip_jpeg_metadata(data)
    assert PILImage.open(io.BytesIO(stripped)).info.get("icc_profile") == icc
    assert strip_jpeg_metadata(stripped) == stripped  # nothing left to strip: unchanged
    clean = _jpeg(_variant(0.8))
    assert strip_jpeg_metadata(clean) == clean  # a plain JPEG is stored exactly as uploaded
    for bad in (b"", b"\xff\xd8", b"\xff\xd8\xff\xe1\x00", clean[: len(clean) // 2], b"GIF89a"):
        with pytest.raises(ValueError):
            strip_jpeg_metadata(bad)


# -- deleting a person ---------------------------------------------------------------------------
def _ingest_one(lab: Lab, name: str, data: bytes) -> tuple[int, list[int], str]:
    (result,) = ingest(lab, [Upload(name, data=data)]).files
    assert result.ok and result.faces, (name, result.error)
    return result.image_id, [f.face_id for f in result.faces], result.sha256


def _all_text(lab: Lab) -> str:
    """Every audit detail and label snapshot as one JSON string."""
    with lab.sessions() as s:
        audit = [a.details for a in s.scalars(select(AuditLog))]
        revisions = [(r.boxes_before, r.boxes_after, r.changes) for r in s.scalars(select(LabelRevision))]
    return json.dumps([audit, revisions], ensure_ascii=False)


def test_forget_person_removes_every_trace(lab: Lab, tmp_path: Path) -> None:
    alone1, (f1,), sha1 = _ingest_one(lab, "zelda-1.png", _png(_variant(0.9)))
    alone2, (f2,), sha2 = _ingest_one(lab, "zelda-2.jpg", _jpeg(_variant(0.8, size=400)))
    group, group_faces, group_sha = _ingest_one(lab, "group.png", _png(_two_faces(0.95)))
    assert len(group_faces) == 2
    identities.enroll(lab, f1, ALIAS, user="lena")
    identities.rename_person(lab, ALIAS, NAME, user="lena")
    identities.enroll(lab, f2, NAME, user="lena")
    # the group photo: named in the Label tab, which keeps a history with names in it
    state = labeling.load_for_labeling(lab, group, with_pixels=False)
    boxes = sorted(state.boxes, key=lambda b: b.box[0])
    edits = [labeling.BoxEdit(b.face_id, *b.box, name=n) for b, n in zip(boxes, (NAME, OTHER), strict=True)]
    labeling.save_labels(lab, group, state.version, edits, user="lena")
    zelda_faces = [f1, f2, boxes[0].face_id]
    keeper_face = boxes[1].face_id
    # vectors of an older embedder version, in the database and in its saved index
    rng = np.random.default_rng(0)
    old_vectors = rng.normal(size=(4, 128)).astype(np.float32)
    with lab.session() as s:
        for face_id, vec in zip([*zelda_faces, keeper_face], old_vectors, strict=True):
            s.add(Embedding.from_array(face_id, OTHER_VERSION, vec))
    old_ids = np.array([*zelda_faces, keeper_face])
    FaceIndex.build(OTHER_VERSION, 128, old_ids, old_vectors, lab.settings.index_dir).save()
    cache = tmp_path / "served"
    cache.mkdir()
    (cache / f"{sha1}.png").write_bytes(b"copy")
    (cache / f"{group_sha}.png").write_bytes(b"copy")
    privacy.register_cache_dir(cache)
    # pictures the UI served: crops of every face (pipeline.served) and a copy Gradio made
    served = [Path(path) for path, _ in clustering.cluster_thumbnails(lab, [*zelda_faces, keeper_face])]
    served += [Path(path) for path, _ in views.people(lab).gallery]
    assert {p.name[:64] for p in served} == {sha1, sha2, group_sha} and all(p.is_file() for p in served)
    gradio_copy = lab.settings.ui_cache_dir / "3f2a9c" / f"{group_sha}-0123456789abcdef.webp"
    gradio_copy.parent.mkdir(parents=True)
    gradio_copy.write_bytes(b"copy")
    assert NAME in _all_text(lab) and ALIAS in _all_text(lab)

    report = privacy.forget_person(lab, NAME.lower(), user="boss", delete_photos=True)

    assert (report.faces, report.photos_deleted, report.photos_kept) == (3, 2, 1)
    assert NAME not in report.message
    with lab.sessions() as s:
        assert s.scalar(select(func.count(Identity.id)).where(func.lower(Identity.name).like("zelda%"))) == 0
        assert s.scalar(select(func.count(Face.id)).where(Face.id.in_(zelda_faces))) == 0
        assert s.scalar(select(func.count(Embedding.id)).where(Embedding.face_id.in_(zelda_faces))) == 0
        assert s.get(Image, alone1) is None and s.get(Image, alone2) is None
        assert s.get(Image, group) is not None and s.get(Face, keeper_face) is not None
        entry = s.scalars(select(AuditLog).where(AuditLog.action == "privacy_delete_person")).one()
        assert entry.user == "boss" and entry.details["faces"] == 3
    text = _all_text(lab)
    assert "Zelda" not in text and "zelda" not in text and OTHER in text
    assert not any(int(i) in lab.index() for i in zelda_faces) and keeper_face in lab.index()
    assert not FaceIndex.paths(lab.settings.index_dir, OTHER_VERSION)[0].exists()
    assert not lab.images.exists(sha1) and not lab.images.exists(sha2) and lab.images.exists(group_sha)
    # every picture made from a photo she was on is gone, the kept group photo's included
    # (the UI makes them again from the photo when someone looks at it)
    assert not (cache / f"{sha1}.png").exists() and not (cache / f"{group_sha}.png").exists()
    for sha in (sha1, sha2, group_sha):
        assert list(lab.settings.ui_cache_dir.rglob(f"{sha}*")) == [], sha
    # undo in the Label tab cannot bring the deleted face back
    labeling.undo_last_save(lab, group, user="lena")
    with lab.sessions() as s:
        faces = s.scalars(select(Face).where(Face.image_id == group)).all()
        assert len(faces) == 1 and s.scalar(select(func.count(Identity.id)).where(Identity.name.like("Zelda%"))) == 0
    if lab.engine.dialect.name == "sqlite":  # deleted rows are not left in free pages or the WAL
        for path in lab.settings.data_dir.glob("facelab.sqlite3*"):
            raw = path.read_bytes()
            assert b"Zelda" not in raw and b"zelda" not in raw, path.name
    assert check(lab).ok, check(lab).lines()


# -- deleting a photo ------------------------------------------------------------------------------
def test_delete_image_removes_the_photo_everywhere(lab: Lab) -> None:
    image_id, face_ids, sha = _ingest_one(lab, "secret-holiday.png", _png(_variant(0.7, size=450)))
    identities.enroll(lab, face_ids[0], "Holiday Person", user="lena")
    state = labeling.load_for_labeling(lab, image_id, with_pixels=False)
    edits = [labeling.BoxEdit(b.face_id, *b.box, name=b.name) for b in state.boxes]
    labeling.save_labels(lab, image_id, state.version, edits)

    report = privacy.delete_image(lab, image_id, user="boss")

    assert report.faces == len(face_ids) and report.photos_deleted == 1
    with lab.sessions() as s:
        assert s.get(Image, image_id) is None
        assert s.scalar(select(func.count(Face.id)).where(Face.id.in_(face_ids))) == 0
        assert s.scalar(select(func.count(Embedding.id)).where(Embedding.face_id.in_(face_ids))) == 0
        assert s.scalar(select(func.count(LabelRevision.id)).where(LabelRevision.image_id == image_id)) == 0
        entry = s.scalars(select(AuditLog).where(AuditLog.action == "privacy_delete_image")).one()
        assert entry.target_id == image_id and entry.user == "boss"
        assert "secret-holiday" not in json.dumps(entry.details) and sha not in json.dumps(entry.details)
    assert not lab.images.exists(sha) and not any(i in lab.index() for i in face_ids)
    with pytest.raises(NotFound):
        privacy.delete_image(lab, image_id, user="boss")
    for bad in (0, -1, "1", 1.5, True, None):
        with pytest.raises(InvalidRequest):
            privacy.delete_image(lab, bad, user="boss")  # type: ignore[arg-type]
    assert check(lab).ok, check(lab).lines()
