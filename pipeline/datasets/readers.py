"""Read PASCAL VOC, YOLO and COCO annotations from a ``DatasetSource`` into one shape.

Parsing only: every problem is collected with the file and line (or JSON element) it
comes from, and nothing touches the library. ``pipeline.datasets.import_data`` then checks the
images and writes. The writer side is ``pipeline.datasets.export``; its docstring describes the
layout FaceLab writes, which these readers accept along with common variants:

* Every box is a face, whatever its class (face_mask's with_mask / without_mask /
  mask_weared_incorrect included); COCO files with several categories keep only the
  ones named "face" (a file with one category keeps it); crowd annotations are skipped.
* VOC: ``<annotation>`` files anywhere; the image is found by ``<filename>`` (base name
  only, never as a path) next to the XML or in a sibling ``images/`` or
  ``JPEGImages/`` folder, else by the XML's stem. Boxes are 1-based inclusive
  (x1 = xmin - 1, x2 = xmax), as in ``models.evaluation.detection``. Name: ``<identity>``.
* YOLO: ``.../labels/<rel>.txt`` belongs to ``.../images/<rel>.<image suffix>``
  (Ultralytics' rule); lines ``class cx cy w h`` normalised to [0, 1]; images without a
  label file are negatives. Names: ``identities.csv`` (``image,line,...,name``).
* COCO: ``annotations.json`` (or every other ``*.json``); ``bbox`` = ``[x, y, w, h]``
  in pixels; name: ``attributes.identity`` (CVAT's per-box attributes).
* ``review_status`` ("accepted" / "pending") is read where FaceLab writes it (VOC
  ``<review_status>``, COCO attributes, YOLO CSV) and defaults to "pending".
* ``image_status`` (the image's review state: unreviewed, in_progress, reviewed,
  skipped) is read from VOC ``<image_status>`` and COCO ``images[].image_status``, else
  from the manifest (the only place a YOLO export has for it); absent means "not given".
* A FaceLab ``facelab.json`` manifest, when present, names the format and gives each
  image its original display name and ``image_status``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipeline.datasets.archive import (
    DatasetSource,
    UnsafeInput,
    parse_xml,
    posix_parent,
)
from pipeline.datasets.export import (
    COCO_FILE,
    FACE_CLASS,
    IMAGE_STATUS_FIELD,
    MANIFEST_NAME,
    YOLO_IDENTITIES,
    YOLO_LABELS_DIR,
)
from pipeline.errors import InvalidRequest
from pipeline.library.identities import clean_name
from pipeline.library.ingest import IMAGE_SUFFIXES
from storage.images import sanitize_name
from storage.orm import ImageStatus, ReviewStatus

FORMATS = ("voc", "yolo", "coco")
#: annotation files (XML, JSON, TXT, CSV) larger than this are refused
MAX_ANNOTATION_BYTES = 256 * 2**20
MAX_PROBLEMS_SHOWN = 25
_WHOLE = re.compile(r"[0-9]{1,9}")
_REVIEW_VALUES = {ReviewStatus.ACCEPTED.value: ReviewStatus.ACCEPTED, ReviewStatus.PENDING.value: ReviewStatus.PENDING}


class ImportRejected(InvalidRequest):
    """Nothing was imported; ``problems`` lists every reason found."""

    def __init__(self, label: str, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n".join(f"- {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n- ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        super().__init__(f"{label}: nothing was imported; {len(problems)} problem(s) found:\n{shown}{more}")


@dataclass
class LabelBox:
    """One box as read from a file: pixels, or fractions of the image when ``normalised``."""

    x1: float
    y1: float
    x2: float
    y2: float
    where: str
    name: str | None = None
    review: ReviewStatus = ReviewStatus.PENDING
    normalised: bool = False
    #: pixel box a side file (YOLO identities.csv) says this is, with where it said so
    expect: tuple[tuple[float, float, float, float], str] | None = None


@dataclass
class ImageEntry:
    """An image of the dataset (by its name in the source) and the boxes read for it."""

    member: str
    display_name: str
    where: str
    boxes: list[LabelBox] = field(default_factory=list)
    declared_size: tuple[int, int] | None = None
    #: the image's review state, when the dataset says (FaceLab's exports do)
    status: ImageStatus | None = None


class Findings:
    """Problems (any one refuses the import) and notes (told to the user) found while reading,
    and the box caps (``pipeline.datasets.archive.ArchiveLimits``): ``keep`` counts every box read."""

    def __init__(self, max_boxes: int | None = None, max_boxes_per_image: int | None = None) -> None:
        self.items: list[str] = []
        self.notes: list[str] = []
        self.max_boxes, self.max_boxes_per_image = max_boxes, max_boxes_per_image
        self.boxes_read = 0

    def keep(self, entry: ImageEntry, box: LabelBox) -> None:
        """Add ``box`` to ``entry``. Past the cap per image it is a problem (once per image);
        past the cap per import the reading stops at once (a hostile archive can hold
        millions of tiny boxes: neither memory nor time is spent on the rest)."""
        self.boxes_read += 1
        if self.max_boxes is not None and self.boxes_read > self.max_boxes:
            raise UnsafeInput(f"more than {self.max_boxes:,} boxes in this dataset; the limit for one import is "
                              f"{self.max_boxes:,} (split the dataset into smaller imports)")
        if self.max_boxes_per_image is not None and len(entry.boxes) >= self.max_boxes_per_image:
            if len(entry.boxes) == self.max_boxes_per_image:
                self.add(f"{entry.member}: more than {self.max_boxes_per_image:,} boxes on one image; "
                         f"the limit is {self.max_boxes_per_image:,}")
                entry.boxes.append(box)  # one over the cap marks the image as reported
            return
        entry.boxes.append(box)

    def add(self, text: str) -> None:
        self.items.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def check(self, label: str) -> None:
        """Raise ImportRejected listing every problem, if there is any."""
        if self.items:
            raise ImportRejected(label, self.items)


# -- format detection -------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _is_yolo_label(name: str) -> bool:
    parts = name.split("/")
    return name.endswith(".txt") and YOLO_LABELS_DIR in parts[:-1] and parts[-1] != "classes.txt"


def _manifest(source: DatasetSource, problems: Findings) -> dict:
    if MANIFEST_NAME not in source:
        return {}
    try:
        doc = json.loads(source.read(MANIFEST_NAME, MAX_ANNOTATION_BYTES))
    except (ValueError, RecursionError, UnsafeInput) as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        problems.add(f"{MANIFEST_NAME}: malformed JSON ({exc})")
        return {}
    if not isinstance(doc, dict):
        problems.add(f"{MANIFEST_NAME}: expected a JSON object")
        return {}
    return doc


def detect_format(source: DatasetSource) -> str:
    """"voc", "yolo" or "coco" from the files present (a FaceLab manifest decides first)."""
    manifest = _manifest(source, Findings())
    if manifest.get("format") in FORMATS:
        return str(manifest["format"])
    names = source.names
    found = []
    if any(n.lower().endswith(".xml") for n in names):
        found.append("voc")
    if any(_is_yolo_label(n) for n in names):
        found.append("yolo")
    if any(n.lower().endswith(".json") and n != MANIFEST_NAME for n in names):
        found.append("coco")
    if not found:
        raise InvalidRequest(
            f"{source.label}: no annotations found: expected PASCAL VOC (*.xml), YOLO (labels/*.txt) "
            "or COCO (*.json) files"
        )
    if len(found) > 1:
        raise InvalidRequest(f"{source.label}: looks like {' and '.join(f.upper() for f in found)} at once; "
                             "choose the format explicitly")
    return found[0]


# -- locating images --------------------------------------------------------------------
class _ImageFinder:
    """Finds the image an annotation refers to, only among the source's own entries."""

    def __init__(self, source: DatasetSource) -> None:
        self.names = {n for n in source.names if _is_image(n)}
        self.by_base: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        for n in sorted(self.names):
            p = PurePosixPath(n)
            self.by_base.setdefault(p.name, []).append(n)
            self.by_stem.setdefault(p.stem, []).append(n)

    def find(self, ref: str, file_name: str | None, stem: str | None, image_dirs: Iterable[str]) -> str | None:
        """``file_name`` (path hint) or ``stem``, near ``ref`` first; None if absent or ambiguous."""
        hint = (file_name or "").replace("\\", "/")
        base = PurePosixPath(hint).name if hint else ""
        here = posix_parent(ref)
        up = posix_parent(here)
        near = [here, up] + [f"{d}/{sub}".strip("/") for d in (here, up) for sub in image_dirs]
        if hint and hint in self.names:
            return hint
        for key, table in ((base, self.by_base), (stem, self.by_stem)):
            if not key or key not in table:
                continue
            matches = table[key]
            close = [m for m in matches if posix_parent(m) in near]
            if len(close) == 1:
                return close[0]
            if len(matches) == 1:
                return matches[0]
        return None


def _image_status(value: object, where: str, problems: Findings) -> ImageStatus | None:
    if value is None or value == "":
        return None
    try:
        return ImageStatus(str(value).strip().lower()) if isinstance(value, str) else ImageStatus(value)
    except ValueError:
        problems.add(f"{where}: {IMAGE_STATUS_FIELD} {str(value)[:40]!r} is not one of: "
                     f"{', '.join(s.value for s in ImageStatus)}")
        return None


def _manifest_statuses(manifest: dict, problems: Findings) -> dict[str, ImageStatus]:
    out: dict[str, ImageStatus] = {}
    items = manifest.get("images") if isinstance(manifest.get("images"), list) else []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("file"), str):
            status = _image_status(item.get(IMAGE_STATUS_FIELD), f"{MANIFEST_NAME}: images[{i}]", problems)
            if status is not None:
                out[item["file"]] = status
    return out


def _display_names(manifest: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in manifest.get("images", []) if isinstance(manifest.get("images"), list) else []:
        if isinstance(item, dict) and isinstance(item.get("file"), str) and isinstance(item.get("original_name"), str):
            out[item["file"]] = sanitize_name(item["original_name"])
    return out


# -- small value parsers ----------------------------------------------------------------
def _number(text: object, what: str, where: str, problems: Findings) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        problems.add(f"{where}: {what} is {text!r}, not a number")
        return None
    if not math.isfinite(value):
        problems.add(f"{where}: {what} is {text!r}, not a finite number")
        return None
    return value


def _name(value: object, where: str, problems: Findings) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        problems.add(f"{where}: identity must be text, got {value!r}")
        return None
    try:
        return clean_name(value)
    except InvalidRequest as exc:
        problems.add(f"{where}: identity {value[:40]!r}: {exc}")
        return None


def _review(value: object, where: str, problems: Findings) -> ReviewStatus:
    if value is None or value == "":
        return ReviewStatus.PENDING
    status = _REVIEW_VALUES.get(str(value).strip().lower()) if isinstance(value, str) else None
    if status is None:
        problems.add(f"{where}: review_status {value!r} is not one of: {', '.join(_REVIEW_VALUES)}")
        return ReviewStatus.PENDING
    return status


def _text(source: DatasetSource, name: str, problems: Findings) -> str | None:
    try:
        return source.read(name, MAX_ANNOTATION_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.add(f"{name}: not UTF-8 text (byte {exc.start})")
    except UnsafeInput as exc:
        problems.add(str(exc))
    return None


def _entry(entries: dict[str, ImageEntry], member: str, where: str, display: dict[str, str]) -> ImageEntry:
    if member not in entries:
        entries[member] = ImageEntry(member, display.get(member) or sanitize_name(PurePosixPath(member).name), where)
    return entries[member]


# -- VOC --------------------------------------------------------------------------------
def _parse_voc(source: DatasetSource, problems: Findings, display: dict[str, str]) -> dict[str, ImageEntry]:
    finder = _ImageFinder(source)
    entries: dict[str, ImageEntry] = {}
    for xml_name in (n for n in source.names if n.lower().endswith(".xml")):
        try:
            data = source.read(xml_name, MAX_ANNOTATION_BYTES)
            root = parse_xml(data, xml_name)
        except InvalidRequest as exc:  # UnsafeInput included: DOCTYPE/entities
            problems.add(str(exc))
            continue
        if root.tag != "annotation":
            problems.add(f"{xml_name} line {root.line}: root element is <{root.tag}>, expected <annotation> (PASCAL VOC)")
            continue
        file_name = root.findtext("filename")
        member = finder.find(xml_name, file_name, PurePosixPath(xml_name).stem, ("images", "JPEGImages"))
        if member is None:
            problems.add(f"{xml_name}: image {file_name or PurePosixPath(xml_name).stem!r} not found "
                         f"(looked next to it and in images/ or JPEGImages/)")
            continue
        entry = _entry(entries, member, xml_name, display)
        status_element = root.find(IMAGE_STATUS_FIELD)
        if status_element is not None:
            entry.status = _image_status(status_element.text, f"{xml_name} line {status_element.line}", problems)
        size = root.find("size")
        if size is not None and size.findtext("width") and size.findtext("height"):
            w = _number(size.findtext("width"), "<width>", f"{xml_name} line {size.line}", problems)
            h = _number(size.findtext("height"), "<height>", f"{xml_name} line {size.line}", problems)
            if w and h and w > 0 and h > 0:  # 0 x 0 is how some tools say "unknown"
                entry.declared_size = (int(w), int(h))
        for obj in root.findall("object"):
            where = f"{xml_name} line {obj.line}"
            bnd = obj.find("bndbox")
            if bnd is None:
                problems.add(f"{where}: <object> has no <bndbox>")
                continue
            values = [_number(bnd.findtext(k), f"<{k}>", f"{xml_name} line {bnd.line}", problems)
                      for k in ("xmin", "ymin", "xmax", "ymax")]
            if any(v is None for v in values):
                continue
            xmin, ymin, xmax, ymax = values  # type: ignore[misc]
            problems.keep(entry, LabelBox(
                xmin - 1.0, ymin - 1.0, xmax, ymax, where,
                name=_name(obj.findtext("identity"), where, problems),
                review=_review(obj.findtext("review_status"), where, problems),
            ))
    return entries


# -- YOLO -------------------------------------------------------------------------------
def _yolo_image_for(label: str, finder: _ImageFinder) -> str | None:
    parts = label.split("/")
    i = len(parts) - 2 - parts[:-1][::-1].index(YOLO_LABELS_DIR)  # the last "labels" folder
    stem = PurePosixPath(label).stem
    folder = "/".join([*parts[:i], "images", *parts[i + 1 : -1]])
    for member in finder.by_stem.get(stem, []):
        if posix_parent(member) == folder:
            return member
    return None


def _parse_yolo(source: DatasetSource, problems: Findings, display: dict[str, str]) -> dict[str, ImageEntry]:
    finder = _ImageFinder(source)
    entries: dict[str, ImageEntry] = {}
    by_line: dict[tuple[str, int], LabelBox] = {}
    labelled: set[str] = set()
    for label in (n for n in source.names if _is_yolo_label(n)):
        member = _yolo_image_for(label, finder)
        if member is None:
            problems.add(f"{label}: no image for it (expected images/{PurePosixPath(label).stem}.jpg or .png "
                         "in the images/ folder matching labels/)")
            continue
        text = _text(source, label, problems)
        if text is None:
            continue
        entry = _entry(entries, member, label, display)
        labelled.add(member)
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{label} line {line_no}"
            tokens = line.split()
            if len(tokens) != 5:
                problems.add(f"{where}: expected 5 values (class cx cy w h), got {len(tokens)}")
                continue
            if not _WHOLE.fullmatch(tokens[0]):
                problems.add(f"{where}: class {tokens[0]!r} is not a non-negative whole number")
                continue
            values = [_number(t, k, where, problems) for t, k in zip(tokens[1:], ("cx", "cy", "w", "h"), strict=True)]
            if any(v is None for v in values):
                continue
            cx, cy, w, h = values  # type: ignore[misc]
            if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0 and 0.0 < w <= 1.0 and 0.0 < h <= 1.0):
                problems.add(f"{where}: values must be fractions of the image in [0, 1] (got {cx} {cy} {w} {h})")
                continue
            box = LabelBox(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, where, normalised=True)
            problems.keep(entry, box)
            by_line[(member, line_no)] = box
    # images without a label file are negatives (no faces), as in Ultralytics
    for member in sorted(finder.names):
        if "images" in member.split("/")[:-1] and member not in labelled:
            _entry(entries, member, member, display)
    if YOLO_IDENTITIES in source:
        _yolo_identities(source, by_line, problems)
    return entries


def _yolo_identities(source: DatasetSource, by_line: dict[tuple[str, int], LabelBox], problems: Findings) -> None:
    text = _text(source, YOLO_IDENTITIES, problems)
    if text is None:
        return
    reader = csv.DictReader(io.StringIO(text))
    missing = {"image", "line", "name"} - set(reader.fieldnames or [])
    if missing:
        problems.add(f"{YOLO_IDENTITIES} line 1: missing column(s) {', '.join(sorted(missing))}")
        return
    try:
        for row in reader:
            where = f"{YOLO_IDENTITIES} line {reader.line_num}"
            line = (row.get("line") or "").strip()
            box = by_line.get((row.get("image") or "", int(line))) if _WHOLE.fullmatch(line) else None
            if box is None:
                problems.add(f"{where}: no face at {row.get('image')!r} line {line!r} in the label files")
                continue
            box.name = _name(row.get("name"), where, problems)
            box.review = _review(row.get("review_status"), where, problems)
            coords = [row.get(k) for k in ("x1", "y1", "x2", "y2")]
            if all(c not in (None, "") for c in coords):
                values = [_number(c, k, where, problems) for c, k in zip(coords, ("x1", "y1", "x2", "y2"), strict=True)]
                if all(v is not None for v in values):
                    box.expect = (tuple(values), where)  # type: ignore[assignment]
    except csv.Error as exc:
        problems.add(f"{YOLO_IDENTITIES} line {reader.line_num}: malformed CSV ({exc})")


# -- COCO -------------------------------------------------------------------------------
def _parse_coco(source: DatasetSource, problems: Findings, display: dict[str, str]) -> dict[str, ImageEntry]:
    finder = _ImageFinder(source)
    entries: dict[str, ImageEntry] = {}
    files = [n for n in source.names if n.lower().endswith(".json") and n != MANIFEST_NAME]
    if COCO_FILE in files:  # a FaceLab export: the one file that matters
        files = [COCO_FILE]
    for json_name in files:
        text = _text(source, json_name, problems)
        if text is None:
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(f"{json_name} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg})")
            continue
        except ValueError as exc:  # e.g. an integer with thousands of digits
            problems.add(f"{json_name}: unreadable JSON ({exc})")
            continue
        except RecursionError:
            problems.add(f"{json_name}: JSON nested too deeply")
            continue
        if isinstance(doc, dict) and "images" not in doc and "annotations" not in doc and len(files) > 1:
            problems.note(f"skipped {json_name}: not a COCO annotation file")
            continue
        _parse_coco_doc(json_name, doc, finder, entries, problems, display)
    return entries


def _coco_categories(json_name: str, doc: dict, problems: Findings) -> set[object] | None:
    """Category ids that are faces; None means "every annotation"."""
    cats = doc.get("categories")
    if cats is None:
        return None
    if not isinstance(cats, list) or not all(isinstance(c, dict) and "id" in c for c in cats):
        problems.add(f"{json_name}: 'categories' must be a list of objects with an 'id'")
        return set()
    faces = {c["id"] for c in cats if str(c.get("name", "")).strip().lower() == FACE_CLASS}
    if faces:
        return faces
    if len(cats) <= 1:
        return None
    names = ", ".join(repr(c.get("name")) for c in cats[:10])
    problems.add(f"{json_name}: {len(cats)} categories and none is named 'face' ({names}); "
                 "rename the face category to 'face'")
    return set()


def _parse_coco_doc(json_name: str, doc: object, finder: _ImageFinder, entries: dict[str, ImageEntry],
                    problems: Findings, display: dict[str, str]) -> None:
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)):
        problems.add(f"{json_name}: not a COCO file (needs 'images' and 'annotations' lists)")
        return
    face_cats = _coco_categories(json_name, doc, problems)
    images: dict[object, ImageEntry] = {}
    for i, img in enumerate(doc["images"]):
        where = f"{json_name}: images[{i}]"
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            problems.add(f"{where}: needs an 'id' and a 'file_name'")
            continue
        where += f" (id {img['id']})"
        if img["id"] in images:
            problems.add(f"{where}: image id {img['id']!r} appears twice")
            continue
        member = finder.find(json_name, img["file_name"], None, ("images",))
        if member is None:
            problems.add(f"{where}: image {img['file_name']!r} not found in the archive")
            continue
        entry = _entry(entries, member, where, display)
        entry.status = _image_status(img.get(IMAGE_STATUS_FIELD), where, problems) or entry.status
        w, h = img.get("width"), img.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            entry.declared_size = (w, h)
        images[img["id"]] = entry
    skipped = 0
    for i, ann in enumerate(doc["annotations"]):
        where = f"{json_name}: annotations[{i}]"
        if not isinstance(ann, dict):
            problems.add(f"{where}: expected an object")
            continue
        where += f" (id {ann.get('id')})"
        if face_cats is not None and ann.get("category_id") not in face_cats:
            skipped += 1
            continue
        if ann.get("iscrowd") in (1, True):
            skipped += 1  # a crowd region is not one face
            continue
        entry = images.get(ann.get("image_id"))
        if entry is None:
            problems.add(f"{where}: image_id {ann.get('image_id')!r} is not in 'images' (or its image is missing)")
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                                   for v in bbox):
            problems.add(f"{where}: bbox must be 4 numbers [x, y, width, height], got {str(bbox)[:60]}")
            continue
        try:
            x, y, w, h = (float(v) for v in bbox)
        except OverflowError:  # an integer like 10**400 has no float
            problems.add(f"{where}: bbox has a number too large to use")
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            problems.add(f"{where}: bbox has a non-finite number")
            continue
        attrs = ann.get("attributes") or {}
        if not isinstance(attrs, dict):
            problems.add(f"{where}: 'attributes' must be an object")
            continue
        problems.keep(entry, LabelBox(x, y, x + w, y + h, where, name=_name(attrs.get("identity"), where, problems),
                                    review=_review(attrs.get("review_status"), where, problems)))
    if skipped:
        problems.note(f"{json_name}: skipped {skipped} annotation(s) that are not single faces (other category or crowd)")


def read_dataset(source: DatasetSource, fmt: str | None = None) -> tuple[str, dict[str, ImageEntry], Findings]:
    """Parse every annotation file: ``(format, entries by image member, findings)``.

    Problems are collected, not raised, so the caller can add the image checks' problems
    and report everything at once. Only an unknown or undetectable format raises here.
    """
    fmt = (fmt or "").strip().lower() or detect_format(source)
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown import format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    findings = Findings(source.limits.max_boxes, source.limits.max_boxes_per_image)
    manifest = _manifest(source, findings)
    display = _display_names(manifest)
    parser = {"voc": _parse_voc, "yolo": _parse_yolo, "coco": _parse_coco}[fmt]
    entries = parser(source, findings, display)
    # the format's own per-image field wins; the manifest fills in (YOLO has no such field)
    for member, status in _manifest_statuses(manifest, findings).items():
        if member in entries and entries[member].status is None:
            entries[member].status = status
    if source.skipped:
        findings.note(f"skipped {len(source.skipped)} macOS metadata file(s) (__MACOSX, ._*, .DS_Store)")
    if not entries and not findings.items:
        findings.add(f"no image with {fmt.upper()} annotations found")
    return fmt, entries, findings
