"""Face attributes (emotion, age, gender): computed at ingest, stored per model version,
recomputed for stored faces when the attribute models change, read back for views,
exports and filters.

Like embeddings, rows are keyed by (face, model version): ``FaceAttributeModel.version``
names the weight files that made them, so new weights mean new rows (the old ones stay
until the face is deleted). Attributes are optional: without their weight files the app
runs as before and ``missing_note`` says which file is absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from sqlalchemy import func, select

from models.attributes.analyzer import UNSURE, FaceAttributes, models_in_version
from models.attributes.emotion_net import EMOTIONS
from models.types import FaceBox
from pipeline.context import Lab
from pipeline.errors import InvalidRequest
from pipeline.library.embed import stored_faces_by_photo
from storage.orm import Face, Identity
from storage.orm import FaceAttributes as AttributeRow

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
GENDERS = ("female", "male")
ANY = "any"


def attribute_version(lab: Lab) -> str | None:
    """The version new attribute rows get, or None when no attribute model is installed."""
    model = lab.attributes
    return model.version if model is not None and model.available else None


def missing_note(lab: Lab) -> str | None:
    """A sentence naming absent attribute weight files (None when all are there)."""
    if lab.attributes is None:
        return "Face attributes are switched off (FACELAB_ATTRIBUTES=0)."
    return lab.attributes.missing_note()


def shared_trunk_cut(lab: Lab) -> int | None:
    """The dlib op where the age/gender model starts, when the active embedder runs the same
    dlib network with the same mirroring: then ingest takes the activations there from the
    embedding pass (``DlibEmbedder.embed_many_keeping``) and the age/gender model runs only
    its tail (measured in bench/speed.py). None: no sharing, each model runs whole."""
    if attribute_version(lab) is None or not hasattr(lab.embedder, "embed_many_keeping"):
        return None
    try:
        return lab.attributes.trunk_cut_for(lab.embedder.network_version, lab.embedder.flip)
    except Exception:  # noqa: BLE001 - broken attribute weights: analyze() logs it per photo
        log.exception("face attributes: could not check whether the embedder's activations can be shared")
        return None


def analyze(lab: Lab, image: np.ndarray, boxes: Sequence[FaceBox], trunk: tuple | None = None
            ) -> list[FaceAttributes] | None:
    """Attributes of the boxes (with landmarks, as ingest has them), or None when no model
    is installed or it fails on this photo (logged: the faces are stored without them and
    the next ``compute_missing`` tries again). ``trunk``: the embedder's activations of
    these faces at ``shared_trunk_cut`` (plain, mirrored)."""
    if not boxes or attribute_version(lab) is None:
        return None
    try:
        return lab.attributes.predict(image, boxes, trunk=trunk)
    except Exception:  # noqa: BLE001 - attributes are an extra; they never cost the user a photo
        log.exception("face attributes failed on a photo; its faces are stored without them")
        return None


def rows_for(face_ids: Sequence[int], attrs: Sequence[FaceAttributes], version: str) -> list[AttributeRow]:
    return [AttributeRow(face_id=face_id, model_version=version, emotion=a.emotion,
                         emotion_confidence=a.emotion_confidence, emotion_probs=a.emotion_probs, age=a.age,
                         gender=a.gender, gender_confidence=a.gender_confidence)
            for face_id, a in zip(face_ids, attrs, strict=True)]


def _as_attributes(row: AttributeRow) -> FaceAttributes:
    # a model that ran for this row but left its fields empty: the face was under that
    # model's smallest readable size, as predict() said when the row was stored
    emotion_ran, age_ran = models_in_version(row.model_version or "")
    too_small = (emotion_ran and row.emotion is None) or (age_ran and row.age is None)
    return FaceAttributes(row.emotion, row.emotion_confidence, row.emotion_probs, row.age, row.gender,
                          row.gender_confidence, row.model_version, too_small=too_small)


def stored_attributes(lab: Lab, face_ids: Sequence[int]) -> dict[int, FaceAttributes]:
    """Per face, the attributes from the installed models' version, else its newest row."""
    ids = [int(i) for i in face_ids]
    if not ids:
        return {}
    version = attribute_version(lab)
    out: dict[int, tuple[bool, int, FaceAttributes]] = {}
    with lab.sessions() as session:
        for row in session.scalars(select(AttributeRow).where(AttributeRow.face_id.in_(ids))):
            key = (row.model_version == version, row.id)
            if row.face_id not in out or key > out[row.face_id][:2]:
                out[row.face_id] = (*key, _as_attributes(row))
    return {face_id: v[2] for face_id, v in out.items()}


def faces_missing_attributes(lab: Lab) -> list[int]:
    """Faces without a row from the installed attribute models (empty when none installed)."""
    version = attribute_version(lab)
    if version is None:
        return []
    with lab.sessions() as session:
        return list(session.scalars(
            select(Face.id)
            .where(~Face.id.in_(select(AttributeRow.face_id).where(AttributeRow.model_version == version)))
            .order_by(Face.id)
        ).all())


def compute_attributes(lab: Lab, face_ids: Sequence[int], progress: Progress | None = None) -> int:
    """Compute and store attributes of stored faces (their stored boxes and landmarks)."""
    version = attribute_version(lab)
    if version is None or not face_ids:
        return 0
    done, written = 0, 0
    for photo in stored_faces_by_photo(lab, face_ids):
        attrs = lab.attributes.predict(photo.image, photo.boxes)
        ids = photo.ids
        with lab.write_lock, lab.session() as session:
            have = set(session.scalars(select(AttributeRow.face_id).where(
                AttributeRow.face_id.in_(ids), AttributeRow.model_version == version)).all())
            alive = set(session.scalars(select(Face.id).where(Face.id.in_(ids))).all())
            keep = [(i, a) for i, a in zip(ids, attrs, strict=True) if i in alive and i not in have]
            session.add_all(rows_for([i for i, _ in keep], [a for _, a in keep], version))
        written += len(keep)
        done += len(ids)
        if progress:
            progress((photo.index + 1) / photo.photos, f"Face attributes: {done} of {photo.total} face(s)")
    return written


def compute_missing(lab: Lab, progress: Progress | None = None) -> int:
    """Attributes for every face the installed models have not seen (after a model change)."""
    missing = faces_missing_attributes(lab)
    return compute_attributes(lab, missing, progress) if missing else 0


# -- filters (Search and People) -----------------------------------------------------------
def check_filter(emotion: str | None = None, gender: str | None = None,
                 min_age: float | None = None, max_age: float | None = None) -> tuple[str | None, str | None]:
    """Normalised (emotion, gender); "any", "" and None mean no filter."""
    emotion = (emotion or ANY).strip().lower()
    gender = (gender or ANY).strip().lower()
    if emotion != ANY and emotion not in (*EMOTIONS, UNSURE):
        raise InvalidRequest(f"unknown emotion {emotion!r}; choose one of: {ANY}, {', '.join(EMOTIONS)}, {UNSURE}")
    if gender != ANY and gender not in GENDERS:
        raise InvalidRequest(f"unknown gender {gender!r}; choose one of: {ANY}, {', '.join(GENDERS)}")
    for name, v in (("minimum age", min_age), ("maximum age", max_age)):
        if v is not None and (not np.isfinite(v) or not 0 <= v <= 130):
            raise InvalidRequest(f"{name} must be between 0 and 130 years, got {v!r}")
    if min_age is not None and max_age is not None and min_age > max_age:
        raise InvalidRequest(f"minimum age {min_age:g} is above maximum age {max_age:g}")
    return (None if emotion == ANY else emotion), (None if gender == ANY else gender)


def matches_filter(a: FaceAttributes | None, emotion: str | None, gender: str | None,
                   min_age: float | None, max_age: float | None) -> bool:
    if emotion is None and gender is None and min_age is None and max_age is None:
        return True
    if a is None:
        return False
    return ((emotion is None or a.emotion == emotion) and (gender is None or a.gender == gender)
            and (min_age is None or (a.age is not None and a.age >= min_age))
            and (max_age is None or (a.age is not None and a.age <= max_age)))


def find_faces(lab: Lab, person: str | None = None, emotion: str | None = None, gender: str | None = None,
               min_age: float | None = None, max_age: float | None = None,
               limit: int = 200) -> list[tuple[int, int, tuple[float, float, float, float], str | None, FaceAttributes | None]]:
    """Stored faces (optionally one person's) whose attributes pass the filter, newest
    first, at most ``limit``: (face id, image id, box, person's name, attributes). The
    filter runs in the database, on the installed models' rows (any version's rows when
    no attribute model is installed)."""
    emotion, gender = check_filter(emotion, gender, min_age, max_age)
    filtered = not (emotion is None and gender is None and min_age is None and max_age is None)
    version = attribute_version(lab)
    with lab.sessions() as session:
        query = (select(Face.id, Face.image_id, Face.x1, Face.y1, Face.x2, Face.y2, Identity.name)
                 .outerjoin(Identity, Face.identity_id == Identity.id))
        if person:
            from pipeline.errors import NotFound
            from pipeline.library.identities import clean_name

            name = clean_name(person)
            ident = session.scalars(select(Identity.id).where(func.lower(Identity.name) == name.lower())).one_or_none()
            if ident is None:
                raise NotFound(f"No person called {name!r}.")
            query = query.where(Face.identity_id == ident)
        if filtered:
            rows = select(AttributeRow.face_id)
            if version is not None:
                rows = rows.where(AttributeRow.model_version == version)
            if emotion is not None:
                rows = rows.where(AttributeRow.emotion == emotion)
            if gender is not None:
                rows = rows.where(AttributeRow.gender == gender)
            if min_age is not None:
                rows = rows.where(AttributeRow.age >= float(min_age))
            if max_age is not None:
                rows = rows.where(AttributeRow.age <= float(max_age))
            query = query.where(Face.id.in_(rows))
        found = session.execute(query.order_by(Face.id.desc()).limit(int(limit))).all()
    attrs = stored_attributes(lab, [r.id for r in found])
    return [(r.id, r.image_id, (r.x1, r.y1, r.x2, r.y2), r.name, attrs.get(r.id)) for r in found]
