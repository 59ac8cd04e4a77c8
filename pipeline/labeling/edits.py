"""Labeling: load an image's boxes for a person to check, save their edits, undo, history,
and the review queue (which image next, how far along the collection is).

A save is a diff between the boxes the person sent and the faces stored for the image:
new boxes become ``Face(origin="human")``; moved or resized boxes keep their face id but
become human boxes (the detector's origin and score stay in the revision's "before"
snapshot and in the audit log); missing boxes are deleted with their embeddings and
index entries; names become identities (created when new). Boxes whose pixels changed
get fresh landmarks and embeddings, and the FAISS index follows.

Concurrency: every save names the image version it was based on. The database write
starts with ``UPDATE images SET version = v + 1 WHERE id = ? AND version = v``; if
another person (or another process) saved first, no row matches and the save is
refused with ``Conflict`` naming who changed it and when, instead of silently
overwriting their work.

Each save or undo stores a ``LabelRevision`` with the boxes before and after, so
``undo_last_save`` can put back exactly what was there, including boxes whose rows were
deleted (they come back under new face ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.types import FaceBox
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.library.identify import stored_face_quality
from pipeline.library.identities import clean_name
from pipeline.library.suggest import nearest_people
from pipeline.results import PersonMatch
from storage.orm import (
    HUMAN_ORIGIN,
    AuditLog,
    Embedding,
    Face,
    Identity,
    Image,
    ImageStatus,
    LabelRevision,
    ReviewStatus,
    record_audit,
    utcnow,
)

#: pixels; the annotator sends whole-pixel coordinates, so a stored sub-pixel detector
#: box comes back rounded. Within this distance on every side a box counts as unmoved.
MOVE_TOLERANCE = 1.0
#: smallest box side accepted from a person (the annotator's own minimum is 10 px
#: on screen, which can be fewer image pixels on a big photo)
MIN_BOX_SIDE = 2.0
#: suggestions per box
SUGGESTIONS = 5
MAX_USER_LENGTH = 128


# -- values ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxEdit:
    """A box as the person wants it. ``face_id`` None means a new box; ``name`` None means unnamed."""

    face_id: int | None
    x1: float
    y1: float
    x2: float
    y2: float
    name: str | None = None

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class LabelBox:
    """One stored face as the labeler sees it."""

    face_id: int
    box: tuple[float, float, float, float]
    name: str | None
    identity_id: int | None
    score: float
    origin: str
    review_status: str
    version: int
    updated_by: str | None
    #: nearest enrolled people (faces on the same image left out), best first
    suggestions: tuple[PersonMatch, ...] = ()

    @property
    def is_human(self) -> bool:
        return self.origin == HUMAN_ORIGIN


@dataclass(frozen=True)
class LabelState:
    image_id: int
    sha256: str
    name: str
    width: int
    height: int
    status: str
    #: pass this back to ``save_labels`` (optimistic locking)
    version: int
    boxes: tuple[LabelBox, ...]
    #: number of the latest revision (0: never saved in the Label tab)
    revision: int
    #: "alice at 2026-11-28 10:00:00 UTC" for the latest labeling change, if any
    last_change: str | None
    can_undo: bool
    #: (H, W, 3) uint8 RGB, when loaded with ``with_pixels=True``
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def face_versions(self) -> dict[int, int]:
        return {b.face_id: b.version for b in self.boxes}


@dataclass(frozen=True)
class HistoryRow:
    revision: int
    at: str
    user: str
    action: str
    summary: str
    undone: bool


@dataclass(frozen=True)
class QueueFilter:
    """Which images the review queue walks through. Every set condition must hold."""

    #: image statuses to visit; None visits every status
    statuses: frozenset[ImageStatus] | None = frozenset({ImageStatus.UNREVIEWED, ImageStatus.IN_PROGRESS})
    #: only images with at least one unnamed face
    unknown_faces: bool = False
    #: only images with a face of this person (name, ignoring case)
    person: str | None = None
    #: only images with a detector box scoring below this
    max_score: float | None = None


@dataclass(frozen=True)
class QueueCounts:
    total: int
    unreviewed: int
    in_progress: int
    reviewed: int
    skipped: int

    def text(self) -> str:
        return (f"{self.reviewed} of {self.total} reviewed · {self.in_progress} in progress · "
                f"{self.skipped} skipped · {self.unreviewed} not started")


# -- loading ------------------------------------------------------------------------------
def load_for_labeling(lab: Lab, image_id: int, with_pixels: bool = True, suggestions: int = SUGGESTIONS) -> LabelState:
    """The image, its boxes with names, scores and origins, and top suggestions per box."""
    image_id = _check_id(image_id, "image")
    version = lab.model_version
    with lab.sessions() as session:
        image = session.get(Image, image_id)
        if image is None:
            raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
        rows = session.execute(
            select(Face, Identity.name).outerjoin(Identity, Face.identity_id == Identity.id)
            .where(Face.image_id == image_id).order_by(Face.id)
        ).all()
        vectors = dict(session.execute(
            select(Embedding.face_id, Embedding.vector)
            .where(Embedding.face_id.in_([f.id for f, _ in rows]), Embedding.model_version == version)
        ).all())
        revisions = session.execute(
            select(LabelRevision.revision, LabelRevision.action, LabelRevision.undoes, LabelRevision.user, LabelRevision.at)
            .where(LabelRevision.image_id == image_id).order_by(LabelRevision.revision)
        ).all()
        state_fields = dict(image_id=image.id, sha256=image.sha256, name=image.original_name, width=image.width,
                            height=image.height, status=str(image.status), version=image.version)
        faces = [(f, name) for f, name in rows]

    ranked: dict[int, list[PersonMatch]] = {}
    with_vec = [f.id for f, _ in faces if f.id in vectors]
    if with_vec and suggestions > 0:
        mat = np.stack([np.frombuffer(vectors[i], dtype="<f4").astype(np.float32) for i in with_vec])
        own = {f.id for f, _ in faces}
        # boxes that may not be faces get ranked people but nobody is accepted for them
        quality = stored_face_quality(lab, with_vec)
        searchable = [quality.get(f, (None, True))[1] for f in with_vec]
        ranked = dict(zip(with_vec, nearest_people(lab, mat, people=suggestions, exclude=own, searchable=searchable),
                          strict=True))
    boxes = tuple(
        LabelBox(face_id=f.id, box=f.box, name=name, identity_id=f.identity_id, score=float(f.score), origin=f.origin,
                 review_status=str(f.review_status), version=f.version, updated_by=f.updated_by,
                 suggestions=tuple(ranked.get(f.id, ())))
        for f, name in faces
    )
    last = revisions[-1] if revisions else None
    pixels = lab.images.open(state_fields["sha256"]) if with_pixels else None
    return LabelState(
        **state_fields, boxes=boxes, revision=last.revision if last else 0,
        last_change=f"{last.user} at {_when(last.at)}" if last else None,
        can_undo=_undo_target(revisions) is not None, pixels=pixels,
    )


# -- saving -------------------------------------------------------------------------------
@dataclass
class _Target:
    """A box as it should be after the change (from a BoxEdit, or from a snapshot on undo)."""

    face_id: int | None
    box: tuple[float, float, float, float]
    name: str | None
    identity_id: int | None = None  # preferred over the name when it still exists (undo)
    origin: str | None = None  # None: kept if the box did not move, else human
    score: float | None = None
    review_status: ReviewStatus = ReviewStatus.ACCEPTED


@dataclass
class _NoChange(Exception):
    """Raised inside the write transaction to roll back a save that changes nothing."""


@dataclass
class _Changes:
    added: list[dict] = field(default_factory=list)
    moved: list[dict] = field(default_factory=list)
    deleted: list[dict] = field(default_factory=list)
    renamed: list[dict] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    #: other per-face changes (review status put back by undo, origin restored)
    restored: list[int] = field(default_factory=list)

    def any(self) -> bool:
        return bool(self.added or self.moved or self.deleted or self.renamed or self.accepted or self.restored)

    def as_json(self) -> dict:
        return {"added": self.added, "moved": self.moved, "deleted": self.deleted,
                "renamed": self.renamed, "accepted": self.accepted}


def save_labels(
    lab: Lab,
    image_id: int,
    expected_version: int,
    boxes: Sequence[BoxEdit],
    user: str = "local",
    *,
    finished: bool = True,
    face_versions: dict[int, int] | None = None,
) -> LabelState:
    """Make the image's faces exactly ``boxes``; returns the new state (without pixels).

    ``finished`` marks the image reviewed; otherwise it becomes in progress (a reviewed
    image stays reviewed). ``face_versions`` (from ``LabelState.face_versions``) also
    refuses the save when a face was changed elsewhere (e.g. named in the Detect tab)
    since the labeler loaded it. Saving an unchanged, already-reviewed image writes nothing.
    """
    image_id = _check_id(image_id, "image")
    user = _check_user(user)
    if expected_version is None or isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise InvalidRequest("Load the image before saving (its version is missing).")
    targets = [_target_from_edit(b) for b in boxes]
    ids = [t.face_id for t in targets if t.face_id is not None]
    if len(ids) != len(set(ids)):
        raise InvalidRequest("The same face appears twice in the boxes sent; reload the image.")

    def status_after(current: ImageStatus) -> ImageStatus:
        if finished or current == ImageStatus.REVIEWED:
            return ImageStatus.REVIEWED
        return ImageStatus.IN_PROGRESS

    return _commit(lab, image_id, expected_version, targets, user, "save", status_after, face_versions, undoes=None)


def undo_last_save(lab: Lab, image_id: int, user: str = "local", expected_version: int | None = None) -> LabelState:
    """Put back the boxes, names and status from before the latest save not yet undone.

    Repeated undos walk further back. Faces deleted by that save come back under new
    ids (with re-computed landmarks and embeddings). ``expected_version`` (optional)
    refuses the undo if the image changed since the caller looked at it.
    """
    image_id = _check_id(image_id, "image")
    user = _check_user(user)
    with lab.sessions() as session:
        revisions = session.execute(
            select(LabelRevision.revision, LabelRevision.action, LabelRevision.undoes, LabelRevision.user, LabelRevision.at)
            .where(LabelRevision.image_id == image_id).order_by(LabelRevision.revision)
        ).all()
        target_rev = _undo_target(revisions)
        if target_rev is None:
            if session.get(Image, image_id) is None:
                raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
            raise InvalidRequest("Nothing to undo on this image.")
        row = session.scalars(
            select(LabelRevision).where(LabelRevision.image_id == image_id, LabelRevision.revision == target_rev)
        ).one()
        before, status_before = list(row.boxes_before), ImageStatus(row.status_before)
        current_version = session.scalar(select(Image.version).where(Image.id == image_id))
    if expected_version is None:
        expected_version = current_version
    with lab.sessions() as session:
        alive = set(session.scalars(select(Face.id).where(Face.image_id == image_id)).all())
    targets = [
        _Target(
            face_id=snap["face_id"] if snap["face_id"] in alive else None,
            box=(snap["x1"], snap["y1"], snap["x2"], snap["y2"]), name=snap["name"],
            identity_id=snap["identity_id"], origin=snap["origin"], score=snap["score"],
            review_status=ReviewStatus(snap["review_status"]),
        )
        for snap in before
    ]
    return _commit(lab, image_id, expected_version, targets, user, "undo", lambda _: status_before, None,
                   undoes=target_rev)


def _commit(
    lab: Lab,
    image_id: int,
    expected_version: int,
    targets: list[_Target],
    user: str,
    action: str,
    status_after: Callable[[ImageStatus], ImageStatus],
    face_versions: dict[int, int] | None,
    undoes: int | None,
) -> LabelState:
    """The shared write path of save and undo (see the module docstring)."""
    with lab.write_lock:
        with lab.sessions() as session:
            image = session.get(Image, image_id)
            if image is None:
                raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
            if image.version != expected_version:
                raise Conflict(_conflict_message(session, image_id))
            sha, width, height = image.sha256, image.width, image.height
            status_before = ImageStatus(image.status)
            rows = session.execute(
                select(Face, Identity.name).outerjoin(Identity, Face.identity_id == Identity.id)
                .where(Face.image_id == image_id).order_by(Face.id)
            ).all()
            stored = {f.id: f for f, _ in rows}
            names_before = {f.id: name for f, name in rows}
            session.expunge_all()
        new_status = status_after(status_before)

        for t in targets:
            if t.face_id is not None and t.face_id not in stored:
                raise Conflict(f"Face #{t.face_id} is no longer on image {image_id} (deleted elsewhere?); reload.")
            t.box = _clip(t.box, width, height)
        _check_face_versions(stored, face_versions)

        # which boxes need new pixels-derived data (landmarks, embedding)
        moved = [t for t in targets if t.face_id is not None and _moved(stored[t.face_id].box, t.box)]
        fresh = [t for t in targets if t.face_id is None]
        to_embed = moved + fresh
        landmarks, vectors = _embed(lab, sha, [t.box for t in to_embed])
        computed = {id(t): (lm, vec) for t, lm, vec in zip(to_embed, landmarks, vectors, strict=True)}
        deleted_ids = sorted(set(stored) - {t.face_id for t in targets if t.face_id is not None})

        try:
            with lab.session() as session:
                # the compare-and-swap comes first: it takes the database's write lock, so
                # everything below runs on the state this version number describes
                bumped = session.execute(
                    update(Image).where(Image.id == image_id, Image.version == expected_version)
                    .values(version=expected_version + 1, status=new_status)
                    .execution_options(synchronize_session=False)
                )
                if bumped.rowcount != 1:
                    raise Conflict(_conflict_message(session, image_id))
                changes, face_ids, new_rows = _apply(session, lab, image_id, stored, targets, deleted_ids, computed,
                                                     user)
                if not changes.any() and new_status == status_before:
                    # nothing to write: roll back so other people's loaded versions stay valid
                    raise _NoChange
                revision = (session.scalar(
                    select(func.max(LabelRevision.revision)).where(LabelRevision.image_id == image_id)) or 0) + 1
                session.add(LabelRevision(
                    image_id=image_id, revision=revision, action=action, user=user, image_version=expected_version + 1,
                    status_before=str(status_before), status_after=str(new_status),
                    boxes_before=[_snap_face(f, names_before.get(f.id)) for f in stored.values()],
                    boxes_after=_snapshot(session, image_id), changes=changes.as_json(), undoes=undoes,
                ))
                record_audit(session, user, f"label_{action}", "image", image_id,
                             {"revision": revision, "status": str(new_status), **changes.as_json()})
        except _NoChange:
            return load_for_labeling(lab, image_id, with_pixels=False)
        except IntegrityError as exc:  # e.g. two people created the same new name at once
            raise Conflict(f"Someone else changed image {image_id} or created the same name at the same moment; "
                           "reload and try again.") from exc

        if deleted_ids or to_embed:
            with lab.index_for_update() as index:
                if deleted_ids:
                    index.remove(np.asarray(deleted_ids, dtype=np.int64))
                if to_embed:
                    # a moved box keeps its face id and gets a new embedding row
                    index.add(np.asarray([face_ids[id(t)] for t in to_embed], dtype=np.int64), np.stack(vectors),
                              np.asarray([new_rows[id(t)].id for t in to_embed], dtype=np.int64), keep_newer=True)
                index.save()
    return load_for_labeling(lab, image_id, with_pixels=False)


def _apply(session: Session, lab: Lab, image_id: int, stored: dict[int, Face], targets: list[_Target],
           deleted_ids: list[int], computed: dict[int, tuple], user: str,
           ) -> tuple[_Changes, dict[int, int], dict[int, Embedding]]:
    """Write the targets into the session; returns what changed, target -> face id and
    target -> its new embedding row (boxes added or moved)."""
    changes = _Changes()
    version = lab.model_version
    names: dict[str, Identity | None] = {}
    face_ids: dict[int, int] = {}
    new_rows: dict[int, Embedding] = {}
    now = utcnow()
    live = {f.id: f for f in session.scalars(select(Face).where(Face.image_id == image_id)).all()}
    gone = [t.face_id for t in targets if t.face_id is not None and t.face_id not in live]
    if gone:  # deleted by another process (e.g. a privacy delete) since the pre-read
        raise Conflict(f"Face #{gone[0]} was deleted elsewhere a moment ago; reload.")
    deleted_ids = [i for i in deleted_ids if i in live]
    moved_ids = [t.face_id for t in targets if t.face_id is not None and id(t) in computed]
    if moved_ids:
        session.execute(delete(Embedding).where(Embedding.face_id.in_(moved_ids))
                        .execution_options(synchronize_session=False))
    for t in targets:
        identity = _resolve_identity(session, t, names)
        identity_id = identity.id if identity is not None else None
        if t.face_id is None:
            lm, vec = computed[id(t)]
            face = Face(image_id=image_id, x1=t.box[0], y1=t.box[1], x2=t.box[2], y2=t.box[3],
                        score=1.0 if t.score is None else float(t.score), landmarks=Face.landmarks_to_json(lm),
                        origin=t.origin or HUMAN_ORIGIN, review_status=t.review_status, identity_id=identity_id,
                        updated_by=user, updated_at=now)
            session.add(face)
            session.flush()
            new_rows[id(t)] = Embedding.from_array(face.id, version, vec)
            session.add(new_rows[id(t)])
            face_ids[id(t)] = face.id
            changes.added.append({"face_id": face.id, "box": list(t.box), "name": _name_of(identity)})
            continue
        face = live[t.face_id]
        old = stored[t.face_id]
        touched = False
        if id(t) in computed:
            lm, vec = computed[id(t)]
            changes.moved.append({"face_id": face.id, "from": list(old.box), "to": list(t.box),
                                  "origin": old.origin, "score": old.score})
            face.x1, face.y1, face.x2, face.y2 = t.box
            face.landmarks = Face.landmarks_to_json(lm)
            face.origin = t.origin or HUMAN_ORIGIN
            face.score = 1.0 if t.score is None else float(t.score)
            new_rows[id(t)] = Embedding.from_array(face.id, version, vec)
            session.add(new_rows[id(t)])
            face_ids[id(t)] = face.id
            touched = True
        elif t.origin is not None and (face.origin, face.score) != (t.origin, t.score):  # undo of a move within tolerance
            face.origin, face.score = t.origin, float(t.score if t.score is not None else face.score)
            changes.restored.append(face.id)
            touched = True
        if face.identity_id != identity_id:
            changes.renamed.append({"face_id": face.id, "from_identity_id": face.identity_id,
                                    "to": _name_of(identity)})
            face.identity_id = identity_id
            touched = True
        if face.review_status != t.review_status:
            (changes.accepted if t.review_status == ReviewStatus.ACCEPTED else changes.restored).append(face.id)
            face.review_status = t.review_status
            touched = True
        if touched:
            face.updated_by = user
            face.updated_at = now
    for face_id in deleted_ids:
        old = stored[face_id]
        changes.deleted.append({"face_id": face_id, "box": list(old.box), "origin": old.origin, "score": old.score,
                                "identity_id": old.identity_id})
        session.delete(live[face_id])  # embeddings go with it (ON DELETE CASCADE)
    session.flush()  # also gives the new embedding rows their ids
    return changes, face_ids, new_rows


def _resolve_identity(session: Session, t: _Target, cache: dict[str, Identity | None]) -> Identity | None:
    if t.identity_id is not None:
        person = session.get(Identity, t.identity_id)
        if person is not None:
            return person
    if t.name is None:
        return None
    key = t.name.lower()
    if key not in cache:
        person = session.scalars(select(Identity).where(func.lower(Identity.name) == key)).one_or_none()
        if person is None:
            person = Identity(name=t.name)
            session.add(person)
            session.flush()
        cache[key] = person
    return cache[key]


def _embed(lab: Lab, sha: str, boxes: list[tuple[float, float, float, float]]) -> tuple[list, list]:
    """Landmarks and embeddings for boxes on the stored image (one image read)."""
    if not boxes:
        return [], []
    pixels = lab.images.open(sha)
    with_landmarks = lab.landmarker.predict(pixels, [FaceBox(*b) for b in boxes])
    vectors = lab.embedder.embed(pixels, with_landmarks)
    return [b.landmarks for b in with_landmarks], [np.asarray(v, dtype=np.float32) for v in vectors]


# -- history ------------------------------------------------------------------------------
def history(lab: Lab, image_id: int) -> list[HistoryRow]:
    """Every labeling save and undo on the image, newest first."""
    image_id = _check_id(image_id, "image")
    with lab.sessions() as session:
        if session.get(Image, image_id) is None:
            raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
        rows = session.scalars(
            select(LabelRevision).where(LabelRevision.image_id == image_id).order_by(LabelRevision.revision.desc())
        ).all()
    undone = {r.undoes for r in rows if r.undoes is not None}
    return [HistoryRow(r.revision, _when(r.at), r.user, r.action, _summary(r), r.revision in undone) for r in rows]


def _summary(rev: LabelRevision) -> str:
    ch = rev.changes or {}
    parts = [f"{len(ch.get(k, []))} {word}" for k, word in
             (("added", "added"), ("moved", "moved"), ("deleted", "deleted"), ("renamed", "named"),
              ("accepted", "accepted")) if ch.get(k)]
    if rev.action == "undo":
        parts.insert(0, f"undid r{rev.undoes}")
    if rev.status_before != rev.status_after:
        parts.append(f"{rev.status_before} → {rev.status_after}")
    return ", ".join(parts) or "no box changes"


def _undo_target(revisions: Sequence) -> int | None:
    """The latest save not yet undone (saves form a stack; each undo pops one)."""
    stack: list[int] = []
    for rev in revisions:
        if rev.action == "save":
            stack.append(rev.revision)
        elif rev.action == "undo" and stack and stack[-1] == rev.undoes:
            stack.pop()
    return stack[-1] if stack else None


# -- review queue ---------------------------------------------------------------------------
def next_image(lab: Lab, after_id: int | None = None, filters: QueueFilter | None = None) -> int | None:
    """The next image (by id, after ``after_id``, wrapping around) that matches ``filters``."""
    filters = filters or QueueFilter()
    conditions = _filter_conditions(lab, filters)
    with lab.sessions() as session:
        query = select(func.min(Image.id)).where(*conditions)
        if after_id is not None:
            found = session.scalar(query.where(Image.id > int(after_id)))
            if found is None:  # wrap around, but not back onto the image just left
                found = session.scalar(query.where(Image.id < int(after_id)))
            return found
        return session.scalar(query)


def _filter_conditions(lab: Lab, filters: QueueFilter) -> list:
    conditions: list = []
    if filters.statuses is not None:
        if not filters.statuses:
            raise InvalidRequest("Pick at least one image status to review.")
        conditions.append(Image.status.in_([ImageStatus(s) for s in filters.statuses]))
    if filters.unknown_faces:
        conditions.append(exists().where(Face.image_id == Image.id, Face.identity_id.is_(None)))
    if filters.person:
        name = clean_name(filters.person)
        with lab.sessions() as session:
            person_id = session.scalar(select(Identity.id).where(func.lower(Identity.name) == name.lower()))
        if person_id is None:
            raise NotFound(f"No person called {name!r}.")
        conditions.append(exists().where(Face.image_id == Image.id, Face.identity_id == person_id))
    if filters.max_score is not None:
        t = float(filters.max_score)
        if not 0.0 <= t <= 1.0:
            raise InvalidRequest(f"The score threshold must be between 0 and 1, got {t}.")
        conditions.append(exists().where(Face.image_id == Image.id, Face.score < t, Face.origin != HUMAN_ORIGIN))
    return conditions


def queue_counts(lab: Lab) -> QueueCounts:
    with lab.sessions() as session:
        by_status = dict(session.execute(select(Image.status, func.count(Image.id)).group_by(Image.status)).all())
    get = lambda s: int(by_status.get(s, 0))  # noqa: E731
    return QueueCounts(
        total=sum(int(v) for v in by_status.values()), unreviewed=get(ImageStatus.UNREVIEWED),
        in_progress=get(ImageStatus.IN_PROGRESS), reviewed=get(ImageStatus.REVIEWED), skipped=get(ImageStatus.SKIPPED),
    )


#: how far along an image is: Skip may only move an image up this scale, never down
STATUS_RANK = {ImageStatus.UNREVIEWED: 0, ImageStatus.SKIPPED: 1, ImageStatus.IN_PROGRESS: 2, ImageStatus.REVIEWED: 3}


def skip_image(lab: Lab, image_id: int, user: str = "local",
               expected_version: int | None = None) -> tuple[int, ImageStatus]:
    """Skip (K): a not-started image becomes skipped; one a person already started or
    reviewed keeps its status (skipping never lowers it). Returns ``(version, status)``.

    ``expected_version`` refuses the skip when the image changed since the caller loaded it.
    """
    image_id = _check_id(image_id, "image")
    with lab.sessions() as session:
        row = session.execute(select(Image.status, Image.version).where(Image.id == image_id)).one_or_none()
        if row is None:
            raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
        status, version = ImageStatus(row.status), int(row.version)
        if expected_version is not None and version != int(expected_version):
            raise Conflict(_conflict_message(session, image_id))
    if STATUS_RANK[status] >= STATUS_RANK[ImageStatus.SKIPPED]:
        return version, status
    # compare-and-swap on the version read above: a save in between is a Conflict, not overwritten
    return set_status(lab, image_id, ImageStatus.SKIPPED, user, expected_version=version), ImageStatus.SKIPPED


def set_status(lab: Lab, image_id: int, status: ImageStatus | str, user: str = "local",
               expected_version: int | None = None) -> int:
    """Set an image's review status (e.g. skipped); returns its new version."""
    image_id = _check_id(image_id, "image")
    user = _check_user(user)
    try:
        status = ImageStatus(status)
    except ValueError as exc:
        raise InvalidRequest(f"Unknown status {status!r}; use one of {', '.join(s.value for s in ImageStatus)}.") from exc
    with lab.write_lock, lab.session() as session:
        image = session.get(Image, image_id)
        if image is None:
            raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
        version = image.version if expected_version is None else int(expected_version)
        if image.status == status and image.version == version:
            return version
        bumped = session.execute(
            update(Image).where(Image.id == image_id, Image.version == version)
            .values(version=version + 1, status=status).execution_options(synchronize_session=False)
        )
        if bumped.rowcount != 1:
            raise Conflict(_conflict_message(session, image_id))
        record_audit(session, user, "label_status", "image", image_id, {"from": str(image.status), "to": str(status)})
        return version + 1


# -- helpers ---------------------------------------------------------------------------------
def _target_from_edit(edit: BoxEdit) -> _Target:
    if not isinstance(edit, BoxEdit):
        raise InvalidRequest(f"expected BoxEdit, got {type(edit).__name__}")
    coords = []
    for v in edit.box:
        try:
            f = float(v)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"Box coordinates must be numbers, got {v!r}.") from exc
        if not math.isfinite(f):
            raise InvalidRequest("Box coordinates must be finite numbers.")
        coords.append(f)
    x1, y1, x2, y2 = coords
    if edit.face_id is not None:
        _check_id(edit.face_id, "face")
    name = None if edit.name is None or not str(edit.name).strip() else clean_name(edit.name)
    return _Target(face_id=edit.face_id, box=(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), name=name)


def _clip(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
    y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
    if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        raise InvalidRequest(f"Box {tuple(round(v) for v in box)} is empty or outside the {width}x{height} image; "
                             "draw it again.")
    return (x1, y1, x2, y2)


def _moved(old: Iterable[float], new: Iterable[float]) -> bool:
    return any(abs(a - b) > MOVE_TOLERANCE for a, b in zip(old, new, strict=True))


def _check_face_versions(stored: dict[int, Face], face_versions: dict[int, int] | None) -> None:
    if not face_versions:
        return
    for face_id, seen in face_versions.items():
        face = stored.get(int(face_id))
        if face is None:
            raise Conflict(f"Face #{face_id} was deleted since you loaded this image; reload.")
        if face.version != int(seen):
            raise Conflict(f"Face #{face_id} was changed by {face.updated_by or 'someone'} at "
                           f"{_when(face.updated_at)}; reload to see it (your edits were not saved).")


def _snap_face(face: Face, name: str | None) -> dict:
    return {"face_id": face.id, "x1": face.x1, "y1": face.y1, "x2": face.x2, "y2": face.y2, "score": face.score,
            "origin": face.origin, "identity_id": face.identity_id, "name": name,
            "review_status": str(face.review_status)}


def _stored_name(session: Session, face: Face) -> str | None:
    if face.identity_id is None:
        return None
    return session.scalar(select(Identity.name).where(Identity.id == face.identity_id))


def _snapshot(session: Session, image_id: int) -> list[dict]:
    rows = session.execute(
        select(Face, Identity.name).outerjoin(Identity, Face.identity_id == Identity.id)
        .where(Face.image_id == image_id).order_by(Face.id)
    ).all()
    return [_snap_face(f, name) for f, name in rows]


def _name_of(identity: Identity | None) -> str | None:
    return identity.name if identity is not None else None


def _conflict_message(session: Session, image_id: int) -> str:
    last = session.scalars(
        select(AuditLog).where(AuditLog.target_type == "image", AuditLog.target_id == image_id)
        .order_by(AuditLog.id.desc()).limit(1)
    ).first()
    who = f"{last.user} at {_when(last.at)}" if last is not None else "someone else"
    return f"Image {image_id} was changed by {who}; reload it to see the changes (your edits were not saved)."


def _when(at) -> str:  # noqa: ANN001
    return f"{at:%Y-%m-%d %H:%M:%S} UTC"


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InvalidRequest(f"{what} id must be a positive whole number, got {value!r}")
    return int(value)


def _check_user(user: str | None) -> str:
    cleaned = " ".join(str(user or "").split())[:MAX_USER_LENGTH]
    return cleaned or "local"
