"""Import a labelled face dataset (PASCAL VOC, YOLO or COCO) from a zip or a folder.

All or nothing. Phase one reads everything: the archive is checked as a whole
(``pipeline.datasets.archive``: hostile names, links, device files, zip bombs), every annotation
is parsed (``pipeline.datasets.readers``) and every image is decoded (its pixels are
dropped again) to check that it is an image we accept, that its size agrees with the
annotation and that every box lies on it. All problems found are reported together,
naming the file and line. Only a source without any problem reaches phase two: the
plan (which boxes are new), image files into the same content-addressed store as
uploads, then every row in one transaction, then embeddings and the index
(``pipeline.library.embed.embed_faces``).

Only the row transaction holds ``lab.write_lock`` (the one writer at a time of the whole
app): parsing, decoding, planning and storing files run before it, so a big import does
not stop everyone else's saves. Under the lock the plan is checked against the faces
then stored on its images (count, highest id, sum of versions) and made again if anyone
changed them meanwhile.

Caps (``pipeline.datasets.archive.ArchiveLimits``): at most ``max_boxes`` boxes per import
(250,000; reading stops at the first box over it) and ``max_boxes_per_image`` per image
(5,000), besides the archive's own limits on files and bytes.

Decisions:

* A box that overhangs its image by at most ``EDGE_TOLERANCE_PX`` is clipped (face_mask
  has boxes ending at pixel 401 of 400); further out is an error.
* Imported faces get ``origin = "import:<format>"`` (the row's provenance) and score
  1.0. Whether a person vouched for the label is ``review_status``: taken from the file
  when FaceLab wrote it, else "pending", so someone else's labels still pass review.
* A name creates the person if new (names ignore case, as in ``pipeline.library.identities``).
* A new image takes its review state (``image_status``: reviewed, skipped ...) from the
  dataset when the dataset gives one (FaceLab's exports do), else it is unreviewed.
* Re-import never duplicates: an image already stored (same bytes, or same stored
  sha256) is reused, and a box within ``SAME_BOX_PX`` on every side of a face already
  on that image (or earlier in the same import) is skipped. Existing faces are left as
  they are, names included, and so is an existing image's review state. Finding those
  takes constant time per box (``BoxDeduper``).
* EXIF-rotated images that carry boxes are refused: the boxes may refer to either
  orientation.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pipeline.context import Lab
from pipeline.datasets.archive import (
    ArchiveLimits,
    DatasetSource,
    UnsafeInput,
    open_source,
)
from pipeline.datasets.readers import (
    FORMATS,
    Findings,
    ImageEntry,
    ImportRejected,
    LabelBox,
    read_dataset,
)
from pipeline.errors import InvalidRequest
from pipeline.library.embed import embed_faces
from storage.images import ImageRejected, decode_upload
from storage.orm import Face, Identity, Image, ImageStatus, record_audit

__all__ = ["FORMATS", "BoxDeduper", "ImportRejected", "ImportReport", "import_dataset"]

log = logging.getLogger(__name__)

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


# -- planning: which boxes are new ---------------------------------------------------------
@dataclass
class _Planned:
    entry: ImageEntry
    meta: _Meta
    boxes: list[LabelBox]


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= SAME_BOX_PX


class BoxDeduper:
    """The boxes known on one image, and for a new box the first known box within
    ``SAME_BOX_PX`` on every side, in constant time per box instead of a scan of all.

    The four coordinates are hashed into a grid of cells ``2 * SAME_BOX_PX`` wide. A
    coordinate in the lower half of its cell can only match one in the same cell or the
    one below, in the upper half the same or the one above: 2**4 = 16 cells to look in.
    Boxes kept because they matched nothing are pairwise farther apart than SAME_BOX_PX,
    so at most 16 of them share a cell: at most 256 comparisons per box, whatever the
    input (4,000 boxes on one image took 22 s with the scan it replaces, ~8 million
    comparisons; bench/import_plan.py). ``comparisons`` counts them (tests check it).
    """

    CELL = 2 * SAME_BOX_PX

    def __init__(self, boxes: Iterable[tuple[float, ...]] = ()) -> None:
        self._boxes: list[tuple[float, ...]] = []
        self._cells: dict[tuple[int, ...], list[int]] = {}
        self.comparisons = 0
        for box in boxes:
            self.add(box)

    def __len__(self) -> int:
        return len(self._boxes)

    def add(self, box: tuple[float, ...]) -> int:
        index = len(self._boxes)
        self._boxes.append(box)
        self._cells.setdefault(tuple(math.floor(v / self.CELL) for v in box), []).append(index)
        return index

    def first_match(self, box: tuple[float, ...]) -> int | None:
        """The lowest index of a known box within SAME_BOX_PX on every side, or None."""
        ranges = []
        for v in box:
            cell = math.floor(v / self.CELL)
            ranges.append((cell, cell - 1 if v / self.CELL - cell < 0.5 else cell + 1))
        best = None
        for key in itertools.product(*ranges):
            for index in self._cells.get(key, ()):
                self.comparisons += 1
                if (best is None or index < best) and _same(box, self._boxes[index]):
                    best = index
        return best


@dataclass
class _Plan:
    plans: list[_Planned]
    #: boxes already stored on their image
    existing: int
    #: boxes given twice within the dataset (imported once)
    repeated: int
    #: per image sha256, what its stored faces looked like when planned (``_faces_state``)
    state: dict[str, tuple[int, int, int, int] | None]
    comparisons: int
    seconds: float


def _faces_state(session: Session, shas: list[str]) -> dict[str, tuple[int, int, int, int] | None]:
    """Per image: (image id, face count, highest face id, sum of face versions), or None
    if no such image is stored. Any face added, deleted or changed since changes it
    (face ids are never reused; every update raises the face's version)."""
    state: dict[str, tuple[int, int, int, int] | None] = dict.fromkeys(shas)
    for start in range(0, len(shas), 500):
        rows = session.execute(
            select(Image.sha256, Image.id, func.count(Face.id), func.coalesce(func.max(Face.id), 0),
                   func.coalesce(func.sum(Face.version), 0))
            .outerjoin(Face, Face.image_id == Image.id)
            .where(Image.sha256.in_(shas[start : start + 500]))
            .group_by(Image.sha256, Image.id)
        ).all()
        for sha, image_id, count, top, versions in rows:
            state[sha] = (int(image_id), int(count), int(top), int(versions))
    return state


def _stored_boxes(session: Session, shas: list[str]) -> dict[str, list[tuple[float, ...]]]:
    boxes: dict[str, list[tuple[float, ...]]] = {sha: [] for sha in shas}
    for start in range(0, len(shas), 500):
        rows = session.execute(
            select(Image.sha256, Face.x1, Face.y1, Face.x2, Face.y2).join(Face, Face.image_id == Image.id)
            .where(Image.sha256.in_(shas[start : start + 500])).order_by(Face.id)
        ).all()
        for sha, *coords in rows:
            boxes[sha].append(tuple(coords))
    return boxes


def _plan(lab: Lab, entries: dict[str, ImageEntry], metas: dict[str, _Meta]) -> _Plan:
    """Which boxes are new: one plan per image member, boxes deduplicated against the
    database and within the import (two members with the same bytes are one image)."""
    started = time.perf_counter()
    shas = sorted({meta.sha256 for meta in metas.values()})
    with lab.sessions() as session:
        state = _faces_state(session, shas)  # first: a change after it is seen at commit
        stored_boxes = _stored_boxes(session, shas)
    known: dict[str, BoxDeduper] = {}  # per image: stored boxes first, then planned ones
    stored: dict[str, int] = {}
    plans: list[_Planned] = []
    existing = repeated = 0
    for member in sorted(entries):
        entry, meta = entries[member], metas[member]
        if meta.sha256 not in known:
            known[meta.sha256] = BoxDeduper(stored_boxes[meta.sha256])
            stored[meta.sha256] = len(known[meta.sha256])
        dedupe, stored_count = known[meta.sha256], stored[meta.sha256]
        boxes = []
        for box in entry.boxes:
            coords = (box.x1, box.y1, box.x2, box.y2)
            match = dedupe.first_match(coords)
            if match is None:
                dedupe.add(coords)
                boxes.append(box)
            elif match < stored_count:
                existing += 1
            else:
                repeated += 1
        plans.append(_Planned(entry, meta, boxes))
    comparisons = sum(d.comparisons for d in known.values())
    plan = _Plan(plans, existing, repeated, state, comparisons, time.perf_counter() - started)
    log.info("import plan: %d box(es) on %d image(s) in %.3f s (%d comparisons)",
             sum(len(e.boxes) for e in entries.values()), len(shas), plan.seconds, comparisons)
    return plan


# -- writing ----------------------------------------------------------------------------
def _store_files(lab: Lab, source: DatasetSource, plans: list[_Planned]) -> None:
    """Put the image files that are not in the store yet (new images, and any whose file
    went missing). Content-addressed and atomic, so it runs outside the write lock; the
    rows that point to them are written under it, after ``_store_files`` ran again there
    (a privacy delete in between may have removed a file)."""
    limits = {"max_pixels": lab.settings.max_pixels, "max_bytes": lab.settings.max_upload_bytes}
    to_store = {p.meta.sha256: p for p in plans if not lab.images.exists(p.meta.sha256)}
    for plan in to_store.values():  # files before the rows that point to them, as ingest does
        decoded = decode_upload(source.read(plan.entry.member, lab.settings.max_upload_bytes),
                                plan.entry.display_name, **limits)
        if decoded.sha256 != plan.meta.sha256:
            raise InvalidRequest(f"{plan.entry.member} changed while it was being imported; nothing was imported")
        lab.images.put(decoded)


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
    """Every row in one transaction (call under ``lab.write_lock``, after
    ``_store_files``); returns ``(new images, new face ids, named faces, new people)``."""
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
        # the heavy part (parsing, decoding every image, planning, storing the files) runs
        # outside the write lock: other users' writes go on meanwhile
        fmt, entries, findings = read_dataset(source, fmt)
        metas = _check_images(lab, source, entries, findings, progress)
        findings.check(source.label)  # parse and image problems, all at once
        notes = list(findings.notes)
        plan = _plan(lab, entries, metas)
        if progress:
            progress(0.5, "Writing")
        _store_files(lab, source, plan.plans)
        with lab.write_lock:
            with lab.sessions() as session:
                changed = _faces_state(session, sorted(plan.state)) != plan.state
            if changed:  # someone labelled, deleted or added these images meanwhile: plan again
                plan = _plan(lab, entries, metas)
            _store_files(lab, source, plan.plans)  # cheap when every file is there
            new_images, face_ids, named, created = _write(lab, source, fmt, plan.plans, user)
        label = source.label
    plans, existing = plan.plans, plan.existing
    if plan.repeated:
        notes.append(f"{plan.repeated} box(es) repeated within the dataset were imported once")
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
