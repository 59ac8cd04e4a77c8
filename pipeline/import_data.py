"""Import a labelled face dataset (PASCAL VOC, YOLO or COCO) from a zip or a folder.

All or nothing. Phase one reads everything: the archive is checked as a whole
(``pipeline.archive``: hostile names, links, device files, zip bombs), every annotation
is parsed (``pipeline.dataset_readers``) and every image is decoded (its pixels are
dropped again) to check that it is an image we accept, that its size agrees with the
annotation and that every box lies on it. All problems found are reported together,
naming the file and line. Only a source without any problem reaches phase two: image
files into the same content-addressed store as uploads, then every row in one
transaction, then embeddings and the index (``pipeline.embed.embed_faces``).

Decisions:

* A box that overhangs its image by at most ``EDGE_TOLERANCE_PX`` is clipped (face_mask
  has boxes ending at pixel 401 of 400); further out is an error.
* Imported faces get ``origin = "import:<format>"`` (the row's provenance) and score
  1.0. Whether a person vouched for the label is ``review_status``: taken from the file
  when FaceLab wrote it, else "pending", so someone else's labels still pass review.
* A name creates the person if new (names ignore case, as in ``pipeline.identities``).
* A new image takes its review state (``image_status``: reviewed, skipped ...) from the
  dataset when the dataset gives one (FaceLab's exports do), else it is unreviewed.
* Re-import never duplicates: an image already stored (same bytes, or same stored
  sha256) is reused, and a box within ``SAME_BOX_PX`` on every side of a face already
  on that image (or earlier in the same import) is skipped. Existing faces are left as
  they are, names included, and so is an existing image's review state.
* EXIF-rotated images that carry boxes are refused: the boxes may refer to either
  orientation.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pipeline.archive import ArchiveLimits, DatasetSource, UnsafeInput, open_source
from pipeline.context import Lab
from pipeline.dataset_readers import (
    FORMATS,
    Findings,
    ImageEntry,
    ImportRejected,
    LabelBox,
    read_dataset,
)
from pipeline.embed import embed_faces
from pipeline.errors import FaceLabError, InvalidRequest
from storage.images import ImageRejected, decode_upload
from storage.orm import Face, Identity, Image, ImageStatus, record_audit

__all__ = ["FORMATS", "ImportRejected", "ImportReport", "import_command", "import_dataset"]

Progress = Callable[[float, str], None]

EDGE_TOLERANCE_PX = 1.0
SAME_BOX_PX = 0.5


@dataclass
class _Meta:
    """What phase one learnt about an image, without keeping its pixels."""

    sha256: str
    upload_sha256: str
    width: int
    height: int
    mime: str
    size_bytes: int
    image_id: int | None


@dataclass(frozen=True)
class ImportReport:
    source: str
    format: str
    images: int
    images_new: int
    faces_new: int
    faces_existing: int
    named_faces: int
    people_new: list[str]
    embedded: int
    notes: list[str]

    def summary(self) -> str:
        text = (f"Imported {self.images} image(s) from {self.source} as {self.format.upper()}: "
                f"{self.images_new} new, {self.images - self.images_new} already stored; "
                f"{self.faces_new} new face(s) ({self.named_faces} named)")
        if self.faces_existing:
            text += f", {self.faces_existing} already present"
        if self.people_new:
            text += f"; {len(self.people_new)} new person(s)"
        return text + "."

    def lines(self) -> list[str]:
        return [self.summary(), *self.notes]


# -- phase one: images and boxes ---------------------------------------------------------
def _stored_image(session: Session, sha256: str, upload_sha256: str) -> Image | None:
    return session.scalars(
        select(Image).where(or_(Image.sha256 == sha256, Image.upload_sha256 == upload_sha256))
    ).first()


def _to_pixels(entry: ImageEntry, width: int, height: int, problems: Findings) -> None:
    """Boxes in pixels, checked against the image and clipped within the edge tolerance."""
    for box in entry.boxes:
        if box.normalised:
            box.x1, box.x2 = box.x1 * width, box.x2 * width
            box.y1, box.y2 = box.y1 * height, box.y2 * height
            box.normalised = False
        shown = f"({box.x1:g}, {box.y1:g}, {box.x2:g}, {box.y2:g})"
        if not (box.x2 > box.x1 and box.y2 > box.y1):
            problems.add(f"{box.where}: empty box {shown} (x2 must exceed x1 and y2 exceed y1)")
            continue
        tol = EDGE_TOLERANCE_PX
        if box.x1 < -tol or box.y1 < -tol or box.x2 > width + tol or box.y2 > height + tol:
            problems.add(f"{box.where}: box {shown} lies outside the {width}x{height} image {entry.member}")
            continue
        box.x1, box.y1 = max(0.0, box.x1), max(0.0, box.y1)
        box.x2, box.y2 = min(float(width), box.x2), min(float(height), box.y2)
        if not (box.x2 > box.x1 and box.y2 > box.y1):
            problems.add(f"{box.where}: box {shown} has no area inside the {width}x{height} image")
            continue
        if box.expect is not None:
            (ex1, ey1, ex2, ey2), said = box.expect
            if max(abs(box.x1 - ex1), abs(box.y1 - ey1), abs(box.x2 - ex2), abs(box.y2 - ey2)) > SAME_BOX_PX:
                problems.add(f"{said}: box ({ex1:g}, {ey1:g}, {ex2:g}, {ey2:g}) does not match {box.where} "
                             f"{(round(box.x1, 2), round(box.y1, 2), round(box.x2, 2), round(box.y2, 2))}")


def _check_images(lab: Lab, source: DatasetSource, entries: dict[str, ImageEntry], problems: Findings,
                  progress: Progress | None) -> dict[str, _Meta]:
    """Read and decode every image (pixels are dropped again), check sizes and boxes."""
    metas: dict[str, _Meta] = {}
    limits = {"max_pixels": lab.settings.max_pixels, "max_bytes": lab.settings.max_upload_bytes}
    with lab.sessions() as session:
        for n, (member, entry) in enumerate(sorted(entries.items())):
            if progress and n % 10 == 0:
                progress(0.5 * n / len(entries), f"Checking image {n + 1} of {len(entries)}")
            try:
                data = source.read(member, lab.settings.max_upload_bytes)
            except UnsafeInput as exc:
                problems.add(str(exc))
                continue
            upload_sha = hashlib.sha256(data).hexdigest()
            row = _stored_image(session, upload_sha, upload_sha)
            if row is None:
                try:
                    decoded = decode_upload(data, entry.display_name, **limits)
                except ImageRejected as exc:
                    problems.add(f"{member}: {exc}")
                    continue
                # decode_upload turns EXIF-rotated photos upright; their boxes may be
                # in either orientation, so refuse rather than guess
                if entry.boxes and any(note.startswith("rotated upright") for note in decoded.notes):
                    problems.add(f"{member}: the photo is EXIF-rotated; rotate the pixels (and its boxes) first")
                    continue
                row = _stored_image(session, decoded.sha256, upload_sha)
                meta = _Meta(decoded.sha256, upload_sha, decoded.width, decoded.height, decoded.mime,
                             decoded.size_bytes, row.id if row is not None else None)
            else:
                meta = _Meta(row.sha256, upload_sha, row.width, row.height, row.mime, row.size_bytes, row.id)
            if entry.declared_size is not None and entry.declared_size != (meta.width, meta.height):
                dw, dh = entry.declared_size
                problems.add(f"{entry.where}: says the image is {dw}x{dh}, but {member} is {meta.width}x{meta.height}")
                continue
            _to_pixels(entry, meta.width, meta.height, problems)
            metas[member] = meta
    return metas


# -- phase two: write ---------------------------------------------------------------------
@dataclass
class _Planned:
    entry: ImageEntry
    meta: _Meta
    boxes: list[LabelBox]


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= SAME_BOX_PX


def _plan(lab: Lab, entries: dict[str, ImageEntry], metas: dict[str, _Meta], notes: list[str]) -> tuple[list[_Planned], int]:
    """Which boxes are new: one plan per image member, boxes deduplicated against the
    database and within the import (two members with the same bytes are one image)."""
    known: dict[str, list[tuple[float, ...]]] = {}  # per image: stored boxes first, then planned ones
    stored: dict[str, int] = {}
    plans: list[_Planned] = []
    existing = repeated = 0
    with lab.sessions() as session:
        for member in sorted(entries):
            entry, meta = entries[member], metas[member]
            if meta.sha256 not in known:
                known[meta.sha256] = [] if meta.image_id is None else [
                    tuple(r) for r in session.execute(
                        select(Face.x1, Face.y1, Face.x2, Face.y2).where(Face.image_id == meta.image_id)
                    ).all()
                ]
                stored[meta.sha256] = len(known[meta.sha256])
            stored_count = stored[meta.sha256]
            boxes = []
            for box in entry.boxes:
                coords = (box.x1, box.y1, box.x2, box.y2)
                match = next((i for i, k in enumerate(known[meta.sha256]) if _same(coords, k)), None)
                if match is None:
                    known[meta.sha256].append(coords)
                    boxes.append(box)
                elif match < stored_count:
                    existing += 1
                else:
                    repeated += 1
            plans.append(_Planned(entry, meta, boxes))
    if repeated:
        notes.append(f"{repeated} box(es) repeated within the dataset were imported once")
    return plans, existing


def _person(session: Session, name: str, cache: dict[str, Identity], created: list[str]) -> Identity:
    key = name.lower()
    if key not in cache:
        person = session.scalars(select(Identity).where(func.lower(Identity.name) == key)).one_or_none()
        if person is None:
            person = Identity(name=name)
            session.add(person)
            session.flush()
            created.append(name)
        cache[key] = person
    return cache[key]


def _write(lab: Lab, source: DatasetSource, fmt: str, plans: list[_Planned], user: str) -> tuple[int, list[int], int, list[str]]:
    """Store new image files, then every row in one transaction; returns
    ``(new images, new face ids, named faces, new people)``."""
    limits = {"max_pixels": lab.settings.max_pixels, "max_bytes": lab.settings.max_upload_bytes}
    # new images, and any whose file has gone missing from the store
    to_store = {p.meta.sha256: p for p in plans if p.meta.image_id is None or not lab.images.exists(p.meta.sha256)}
    for plan in to_store.values():  # files before the rows that point to them, as ingest does
        decoded = decode_upload(source.read(plan.entry.member, lab.settings.max_upload_bytes),
                                plan.entry.display_name, **limits)
        if decoded.sha256 != plan.meta.sha256:
            raise InvalidRequest(f"{plan.entry.member} changed while it was being imported; nothing was imported")
        lab.images.put(decoded)
    faces: list[Face] = []
    people: dict[str, Identity] = {}
    created: list[str] = []
    new_images = 0
    origin = f"import:{fmt}"
    with lab.session() as session:
        rows: dict[str, Image] = {}
        for plan in plans:
            meta = plan.meta
            image = rows.get(meta.sha256)
            if image is None:
                image = session.scalars(select(Image).where(Image.sha256 == meta.sha256)).one_or_none()
            if image is None:
                image = Image(sha256=meta.sha256, original_name=plan.entry.display_name, width=meta.width,
                              height=meta.height, size_bytes=meta.size_bytes, mime=meta.mime,
                              upload_sha256=meta.upload_sha256,
                              status=plan.entry.status or ImageStatus.UNREVIEWED)
                session.add(image)
                new_images += 1
            rows[meta.sha256] = image
            for box in plan.boxes:
                face = Face(x1=box.x1, y1=box.y1, x2=box.x2, y2=box.y2, score=1.0, origin=origin,
                            review_status=box.review, updated_by=user)
                image.faces.append(face)  # in the session before _person's query autoflushes
                if box.name:
                    face.identity = _person(session, box.name, people, created)
                faces.append(face)
        session.flush()
        record_audit(session, user, "import", "dataset", None, {
            "source": source.label, "format": fmt, "images": len(rows), "images_new": new_images,
            "faces_new": len(faces), "people_new": created,
        })
        face_ids = [f.id for f in faces]
        named = sum(1 for f in faces if f.identity_id is not None)
    return new_images, face_ids, named, created


def import_dataset(lab: Lab, path: Path | str, fmt: str | None = None, *, limits: ArchiveLimits | None = None,
                   user: str = "local", progress: Progress | None = None) -> ImportReport:
    """Import a VOC / YOLO / COCO dataset (zip or folder; ``fmt`` None = detect). All or nothing."""
    with open_source(path, limits) as source:
        fmt, entries, findings = read_dataset(source, fmt)
        metas = _check_images(lab, source, entries, findings, progress)
        findings.check(source.label)  # parse and image problems, all at once
        notes = list(findings.notes)
        with lab.write_lock:
            plans, existing = _plan(lab, entries, metas, notes)
            if progress:
                progress(0.5, "Writing")
            new_images, face_ids, named, created = _write(lab, source, fmt, plans, user)
        label = source.label
    embedded = 0
    if face_ids:
        def embed_progress(fraction: float, text: str) -> None:
            if progress:
                progress(0.6 + 0.4 * fraction, text)

        try:
            embedded = embed_faces(lab, face_ids, embed_progress)
        except Exception as exc:  # noqa: BLE001 - the rows are committed: say so instead of failing
            notes.append(f"the faces were imported but embedding them failed ({exc}); "
                         "`python app.py check --repair` embeds them")
    if progress:
        progress(1.0, "Done")
    return ImportReport(label, fmt, len({p.meta.sha256 for p in plans}), new_images, len(face_ids), existing,
                        named, created, embedded, notes)


def import_command(lab: Lab, path: Path, fmt: str | None = None) -> int:
    """``python app.py import FILE.zip|FOLDER [--format voc|yolo|coco]``: exit 0, or 1 with the reasons."""
    from tqdm import tqdm

    with tqdm(total=100, unit="%", desc="Importing") as bar:
        def progress(fraction: float, text: str) -> None:
            bar.n = round(fraction * 100)
            bar.set_postfix_str(text)
            bar.refresh()

        try:
            report = import_dataset(lab, path, fmt, progress=progress)
        except FaceLabError as exc:
            bar.close()
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for line in report.lines():
        print(line)
    return 0
