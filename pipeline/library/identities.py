"""People: enroll faces under a name, list, rename, merge and delete identities."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.faults import fault_point
from pipeline.library.identify import primary_face, quality_gate, stored_face_quality
from pipeline.results import PersonSummary
from storage.orm import Face, Identity, Image, ReviewStatus, record_audit, utcnow

MAX_NAME_LENGTH = 120


def clean_name(name: str | None) -> str:
    """A person's name as stored: trimmed, inner whitespace collapsed, no control characters."""
    if name is None:
        raise InvalidRequest("Type a name for the person.")
    cleaned = " ".join("".join(ch for ch in str(name) if ch.isprintable()).split())
    if not cleaned:
        raise InvalidRequest("Type a name for the person.")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"Names are at most {MAX_NAME_LENGTH} characters ({len(cleaned)} given).")
    return cleaned


def _find(session: Session, name: str) -> Identity | None:
    return session.scalars(select(Identity).where(func.lower(Identity.name) == name.lower())).one_or_none()


def _require(session: Session, name: str) -> Identity:
    person = _find(session, clean_name(name))
    if person is None:
        raise NotFound(f"No person called {clean_name(name)!r}.")
    return person


def enroll(lab: Lab, face_id: int, name: str, user: str = "local", confirm_face: bool = False) -> PersonSummary:
    """Name a face: creates the person when the name is new (names ignore case).

    A box that may not be a face (below the quality gate, ``pipeline.library.identify``) and that
    no person has confirmed is refused unless ``confirm_face``: enrolling a hand or a
    torso would make it match every other non-face.
    """
    name = clean_name(name)
    if not isinstance(face_id, int) or isinstance(face_id, bool) or face_id < 1:
        raise InvalidRequest(f"face id must be a positive whole number, got {face_id!r}")
    if not confirm_face:
        quality, searchable = stored_face_quality(lab, [face_id]).get(face_id, (None, True))
        if not searchable:
            raise InvalidRequest(
                f"Face #{face_id} may not be a face (quality {quality:.2f}, below {quality_gate(lab):.2f}). "
                "Look at it, and if it is a face, confirm it (tick \"it is a face\") to name it.")
    with lab.write_lock:
        try:
            with lab.session() as session:
                face = session.get(Face, face_id)
                if face is None:
                    raise NotFound(f"Face {face_id} does not exist (it may have been deleted).")
                person = _find(session, name)
                if person is None:
                    person = Identity(name=name)
                    session.add(person)
                    session.flush()
                previous = face.identity_id
                face.identity_id = person.id
                face.review_status = ReviewStatus.ACCEPTED
                face.updated_by = user
                face.updated_at = utcnow()
                record_audit(session, user, "enroll", "face", face_id, {"identity": person.name, "previous_identity_id": previous})
                session.flush()
                summary = _summary(session, person)
            fault_point("enroll_after_commit")
            return summary
        except (IntegrityError, StaleDataError) as exc:  # same new name, or the face changed, in another process
            raise Conflict(f"Someone else just changed face {face_id} or created {name!r}; try again.") from exc


def enroll_photo(lab: Lab, image_id: int, name: str, user: str = "local") -> PersonSummary:
    """Name the main face of a stored photo (the biggest face that passes the quality gate,
    towards the centre; never a box that may not be a face)."""
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 1:
        raise InvalidRequest(f"image id must be a positive whole number, got {image_id!r}")
    with lab.sessions() as session:
        image = session.get(Image, image_id)
        if image is None:
            raise NotFound(f"Image {image_id} does not exist (it may have been deleted).")
        faces = [(f.id, f.box) for f in image.faces]
        width, height = image.width, image.height
    quality = stored_face_quality(lab, [f for f, _ in faces])
    main = primary_face([b for _, b in faces], width, height, [quality.get(f, (None, True))[1] for f, _ in faces])
    if main is None:
        raise InvalidRequest(f"Image {image_id} has no face that can be named (none found, or none that surely "
                             "is a face): name a face by its id instead.")
    return enroll(lab, faces[main][0], name, user=user)


def get_person(lab: Lab, name: str) -> PersonSummary:
    """One person by name (ignoring case); NotFound if there is none."""
    with lab.sessions() as session:
        return _summary(session, _require(session, name))


def list_people(lab: Lab) -> list[PersonSummary]:
    with lab.sessions() as session:
        people = session.scalars(select(Identity).order_by(func.lower(Identity.name))).all()
        return [_summary(session, p) for p in people]


def rename_person(lab: Lab, old: str, new: str, user: str = "local") -> PersonSummary:
    new = clean_name(new)
    with lab.write_lock, lab.session() as session:
        person = _require(session, old)
        clash = _find(session, new)
        if clash is not None and clash.id != person.id:
            raise Conflict(f"{clash.name!r} already exists; merge the two people instead.")
        record_audit(session, user, "rename", "identity", person.id, {"from": person.name, "to": new})
        person.name = new
        session.flush()
        return _summary(session, person)


def merge_people(lab: Lab, source: str, target: str, user: str = "local") -> PersonSummary:
    """Move every face of ``source`` to ``target`` and remove ``source``."""
    with lab.write_lock, lab.session() as session:
        src, dst = _require(session, source), _require(session, target)
        if src.id == dst.id:
            raise InvalidRequest("Pick two different people to merge.")
        moved = session.scalars(select(Face).where(Face.identity_id == src.id)).all()
        for face in moved:
            face.identity_id = dst.id
            face.updated_by = user
            face.updated_at = utcnow()
        record_audit(session, user, "merge", "identity", dst.id,
                     {"from": src.name, "from_id": src.id, "into": dst.name, "faces": [f.id for f in moved]})
        session.delete(src)
        session.flush()
        return _summary(session, dst)


def delete_person(lab: Lab, name: str, delete_faces: bool, user: str = "local") -> str:
    """Delete a person. With ``delete_faces`` their faces, embeddings and index entries go too
    (privacy delete); otherwise the faces stay, unnamed."""
    with lab.write_lock:
        with lab.session() as session:
            person = _require(session, name)
            faces = session.scalars(select(Face).where(Face.identity_id == person.id)).all()
            face_ids = [f.id for f in faces]
            record_audit(session, user, "delete_person", "identity", person.id,
                         {"name_deleted": True, "faces": len(face_ids), "faces_deleted": bool(delete_faces)})
            if delete_faces:
                for face in faces:
                    session.delete(face)  # embeddings go with it (ON DELETE CASCADE)
            session.delete(person)
            label = person.name
        fault_point("delete_person_after_commit")
        if delete_faces and face_ids:
            with lab.index_for_update() as index:
                index.remove(np.asarray(face_ids, dtype=np.int64))
                index.save(checkpoint=True)  # a privacy delete: the vectors leave the disk too
    if delete_faces:
        return f"Deleted {label} and {len(face_ids)} face(s) with their embeddings."
    return f"Deleted {label}; their {len(face_ids)} face(s) are kept, unnamed."


def _summary(session: Session, person: Identity) -> PersonSummary:
    count, cover = session.execute(
        select(func.count(Face.id), func.max(Face.id)).where(Face.identity_id == person.id)
    ).one()
    return PersonSummary(person.id, person.name, int(count or 0), int(cover) if cover is not None else None)


def cover_face(lab: Lab, face_id: int) -> tuple[str, tuple[float, float, float, float]] | None:
    """The photo (sha256) and box of a person's cover face, or None when it is gone."""
    with lab.sessions() as session:
        face = session.get(Face, face_id)
        return None if face is None else (face.image.sha256, face.box)


def image_sha256(lab: Lab, image_id: int) -> str:
    """The stored photo's sha256 (its name in the image store)."""
    with lab.sessions() as session:
        row = session.get(Image, image_id)
        if row is None:
            raise InvalidRequest(f"image {image_id} was deleted")
        return row.sha256
