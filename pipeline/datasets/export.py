"""Export the library's face labels as a dataset zip: YOLO, COCO or PASCAL VOC.

Which faces: by default every face a person has not rejected (``selection="all"``);
``selection="reviewed"`` keeps only faces a person accepted. Images: with "all", every
image (an image without faces is a negative example); with "reviewed", images that
have an accepted face or that a person marked reviewed (reviewed with no face = a
true negative).

Layout of every zip (names are safe by construction: the stored image's sha256 and
its extension; the user's original file name appears only inside ``facelab.json``):

    facelab.json             manifest: format, selection, and per image its file,
                             sha256, original display name, width, height and
                             ``image_status`` (see below)
    images/<sha256>.jpg|png  the stored bytes, unchanged (re-import dedupes on them)

plus, per format (box coordinates: FaceLab's own are 0-based, x2/y2 exclusive):

* ``yolo``: ``labels/<sha256>.txt`` with one ``0 cx cy w h`` line per face (class 0 =
  "face", values normalised to the image size, 6 decimals: < 0.01 px on a 10k-pixel
  side), ``data.yaml`` (Ultralytics style, ``names: {0: face}``, and no ``path:`` key:
  Ultralytics then takes the folder holding data.yaml as the dataset root, so the
  unzipped export trains from any working directory; a relative ``path:`` would be read
  from the working directory, an absolute one cannot be known before unzipping) and
  ``identities.csv``: ``image,line,x1,y1,x2,y2,name,review_status``, one row per face,
  keyed by the image file and the 1-based line of the face in its label file; the
  pixel box is repeated so a stale CSV is caught on import. ``name`` is empty for
  unnamed faces.
* ``coco``: ``annotations.json`` with ``images`` (``file_name`` relative to
  ``images/``), one category ``{"id": 1, "name": "face"}`` and ``annotations`` whose
  ``bbox`` is ``[x, y, w, h]`` in pixels (COCO's convention: x = x1, w = x2 - x1) and
  ``attributes: {"identity": name or null, "review_status": ...}`` (CVAT's convention
  for per-box attributes), plus the face's estimated ``emotion``, ``emotion_confidence``,
  ``emotion_probs``, ``age``, ``gender``, ``gender_confidence`` and the
  ``attribute_model`` version when attributes were computed (``coco_attributes``); each
  entry of ``images`` also has ``image_status``.
* ``voc``: ``annotations/<sha256>.xml``, one per image, with ``<size>`` and one
  ``<object>`` per face: ``<name>face</name>``, ``<identity>`` (empty when unnamed),
  ``<review_status>`` and ``<bndbox>`` in VOC's 1-based inclusive convention
  (xmin = x1 + 1, xmax = x2; the same mapping ``models.evaluation.detection`` reads),
  written with up to 3 decimals so detector boxes survive the trip; the image's
  ``<image_status>`` is a child of ``<annotation>``.

``review_status`` (per face) is "accepted" or "pending" (rejected faces are never
exported). ``image_status`` (per image: how far the Label tab's review got) is one of
"unreviewed", "in_progress", "reviewed", "skipped"; it is written into the format's own
per-image record (COCO ``images[]``, the VOC file) and, for every format, the manifest;
YOLO has no per-image record, so there the manifest carries it. Import reads both back
(``pipeline.datasets.readers``), so export -> import keeps names, boxes and review state.
"""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from common.atomic import write_atomically
from pipeline.context import Lab
from pipeline.errors import InvalidRequest
from storage.orm import Face, Identity, Image, ImageStatus, ReviewStatus

Progress = Callable[[float, str], None]

FORMATS = ("yolo", "coco", "voc")
SELECTIONS = ("all", "reviewed")
MANIFEST_NAME = "facelab.json"
MANIFEST_VERSION = 1
IMAGES_DIR = "images"
YOLO_LABELS_DIR = "labels"
YOLO_IDENTITIES = "identities.csv"
YOLO_IDENTITY_COLUMNS = ("image", "line", "x1", "y1", "x2", "y2", "name", "review_status")
COCO_FILE = "annotations.json"
VOC_DIR = "annotations"
FACE_CLASS = "face"
#: no ``path:`` on purpose (see the module docstring): the dataset root is this file's folder
YOLO_DATA_YAML = (
    "# FaceLab export, one class. No 'path:' key: Ultralytics then uses the folder of this\n"
    "# file as the dataset root, so it works from any working directory.\n"
    f"train: {IMAGES_DIR}\nval: {IMAGES_DIR}\nnc: 1\nnames:\n  0: {FACE_CLASS}\n"
)
#: the manifest's and COCO's per-image field, and VOC's element, for ImageStatus
IMAGE_STATUS_FIELD = "image_status"


@dataclass(frozen=True)
class ExportFace:
    box: tuple[float, float, float, float]
    name: str | None
    review_status: str
    #: emotion / age / gender (COCO only, see ``coco_attributes``); None when not computed
    attributes: dict | None = None


@dataclass(frozen=True)
class ExportImage:
    sha256: str
    ext: str
    original_name: str
    width: int
    height: int
    faces: list[ExportFace]
    #: the image's review state (ImageStatus value)
    status: str = ImageStatus.UNREVIEWED.value

    @property
    def file(self) -> str:
        return f"{IMAGES_DIR}/{self.sha256}.{self.ext}"


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    selection: str
    images: int
    faces: int
    named_faces: int

    def summary(self) -> str:
        return (f"Exported {self.images} image(s) and {self.faces} face(s) ({self.named_faces} named) "
                f"as {self.format.upper()} to {self.path.name}.")


def voc_number(value: float) -> str:
    """A coordinate with at most 3 decimals and no trailing zeros ("12", "12.5")."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def coco_attributes(lab: Lab, face_ids: list[int]) -> dict[int, dict]:
    """Per face, its stored emotion/age/gender as COCO per-box attributes (``emotion``,
    ``emotion_confidence``, ``emotion_probs``, ``age``, ``gender``, ``gender_confidence``,
    ``attribute_model``); faces without stored attributes are absent."""
    from pipeline.library.attributes import stored_attributes

    out = {}
    for face_id, a in stored_attributes(lab, face_ids).items():
        out[face_id] = {"emotion": a.emotion, "emotion_confidence": a.emotion_confidence,
                        "emotion_probs": a.emotion_probs, "age": a.age, "gender": a.gender,
                        "gender_confidence": a.gender_confidence, "attribute_model": a.model_version}
    return out


def select_images(lab: Lab, selection: str = "all") -> list[ExportImage]:
    """The images and faces an export with ``selection`` contains, in image id order."""
    if selection not in SELECTIONS:
        raise InvalidRequest(f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}")
    if selection == "reviewed":
        wanted = Face.review_status == ReviewStatus.ACCEPTED
    else:
        wanted = Face.review_status != ReviewStatus.REJECTED
    out: list[ExportImage] = []
    with lab.sessions() as session:
        images = session.scalars(select(Image).order_by(Image.id)).all()
        faces_by_image: dict[int, list[ExportFace]] = {}
        rows = session.execute(
            select(Face.id, Face.image_id, Face.x1, Face.y1, Face.x2, Face.y2, Face.review_status, Identity.name)
            .outerjoin(Identity, Face.identity_id == Identity.id)
            .where(wanted).order_by(Face.id)
        ).all()
        attributes = coco_attributes(lab, [row.id for row in rows])
        for row in rows:
            faces_by_image.setdefault(row.image_id, []).append(
                ExportFace((row.x1, row.y1, row.x2, row.y2), row.name, ReviewStatus(row.review_status).value,
                           attributes.get(row.id))
            )
        for image in images:
            faces = faces_by_image.get(image.id, [])
            if selection == "reviewed" and not faces and image.status != ImageStatus.REVIEWED:
                continue
            ext = "png" if image.mime == "image/png" else "jpg"
            out.append(ExportImage(image.sha256, ext, image.original_name, image.width, image.height, faces,
                                   ImageStatus(image.status).value))
    return out


def export_dataset(
    lab: Lab, fmt: str, out: Path | str, selection: str = "all", progress: Progress | None = None
) -> ExportReport:
    """Write the library's labels as a ``fmt`` dataset zip at ``out`` (replaced atomically)."""
    fmt = (fmt or "").strip().lower()
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    images = select_images(lab, selection)
    if not images:
        raise InvalidRequest("Nothing to export: no images match." if selection == "all" else
                             "Nothing to export: no face has been accepted by a person yet.")
    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            _write(lab, zf, fmt, selection, images, progress)

    write_atomically(out, write_zip)
    faces = sum(len(i.faces) for i in images)
    named = sum(1 for i in images for f in i.faces if f.name)
    if progress:
        progress(1.0, f"Exported {len(images)} image(s)")
    return ExportReport(out, fmt, selection, len(images), faces, named)


def _write(lab: Lab, zf: zipfile.ZipFile, fmt: str, selection: str, images: list[ExportImage],
           progress: Progress | None) -> None:
    manifest = {
        "facelab_export": MANIFEST_VERSION,
        "format": fmt,
        "selection": selection,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "box_convention": "see pipeline/datasets/export.py",
        "images": [
            {"file": img.file, "sha256": img.sha256, "original_name": img.original_name,
             "width": img.width, "height": img.height, "faces": len(img.faces), "image_status": img.status}
            for img in images
        ],
    }
    zf.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False))
    for n, img in enumerate(images):
        # stored images are already compressed: deflating them again only costs time
        try:
            data = lab.images.read_bytes(img.sha256)
        except FileNotFoundError as exc:
            raise InvalidRequest(f"The stored file of {img.original_name!r} ({img.sha256[:12]}…) is missing; "
                                 "`python app.py check` lists what is damaged.") from exc
        zf.writestr(zipfile.ZipInfo(img.file, date_time=(1980, 1, 1, 0, 0, 0)), data,
                    compress_type=zipfile.ZIP_STORED)
        if fmt == "yolo":
            zf.writestr(f"{YOLO_LABELS_DIR}/{img.sha256}.txt", _yolo_labels(img))
        elif fmt == "voc":
            zf.writestr(f"{VOC_DIR}/{img.sha256}.xml", _voc_xml(img))
        if progress and (n % 20 == 0 or n == len(images) - 1):
            progress(n / len(images), f"Writing image {n + 1} of {len(images)}")
    if fmt == "yolo":
        zf.writestr("data.yaml", YOLO_DATA_YAML)
        zf.writestr(YOLO_IDENTITIES, _yolo_identities(images))
    elif fmt == "coco":
        zf.writestr(COCO_FILE, json.dumps(_coco(images), ensure_ascii=False))


def _yolo_labels(img: ExportImage) -> str:
    lines = []
    for face in img.faces:
        x1, y1, x2, y2 = face.box
        cx, cy = (x1 + x2) / 2 / img.width, (y1 + y2) / 2 / img.height
        w, h = (x2 - x1) / img.width, (y2 - y1) / img.height
        lines.append(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def _yolo_identities(images: list[ExportImage]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(YOLO_IDENTITY_COLUMNS)
    for img in images:
        for line, face in enumerate(img.faces, start=1):
            writer.writerow([img.file, line, *(voc_number(v) for v in face.box), face.name or "", face.review_status])
    return buf.getvalue()


def _coco(images: list[ExportImage]) -> dict:
    coco_images, annotations = [], []
    for image_id, img in enumerate(images, start=1):
        coco_images.append({"id": image_id, "file_name": img.file.split("/", 1)[1],
                            "width": img.width, "height": img.height, IMAGE_STATUS_FIELD: img.status})
        for face in img.faces:
            x1, y1, x2, y2 = face.box
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [round(x1, 3), round(y1, 3), round(w, 3), round(h, 3)],
                "area": round(w * h, 3), "iscrowd": 0,
                "attributes": {"identity": face.name, "review_status": face.review_status, **(face.attributes or {})},
            })
    return {
        "info": {"description": "FaceLab export", "version": str(MANIFEST_VERSION)},
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": FACE_CLASS, "supercategory": "person"}],
    }


def _voc_xml(img: ExportImage) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = IMAGES_DIR
    ET.SubElement(root, "filename").text = f"{img.sha256}.{img.ext}"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(img.width)
    ET.SubElement(size, "height").text = str(img.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    ET.SubElement(root, IMAGE_STATUS_FIELD).text = img.status
    for face in img.faces:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = FACE_CLASS
        ET.SubElement(obj, "identity").text = face.name or ""
        ET.SubElement(obj, "review_status").text = face.review_status
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = face.box
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bnd, key).text = voc_number(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
