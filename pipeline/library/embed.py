"""(Re-)embed stored faces with the active embedder: after a model switch, or to repair.

Faces are grouped by image so each photo is read from the store once; the stored box
and landmarks are reused, so a face embeds exactly as it did at ingest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from models.types import FaceBox
from pipeline.context import Lab
from storage.orm import Embedding, Face, Image

Progress = Callable[[float, str], None]


def faces_missing_embeddings(lab: Lab) -> list[int]:
    """Ids of faces the active embedder has not embedded yet."""
    return faces_without(lab, lab.model_version)


def faces_without(lab: Lab, version: str) -> list[int]:
    """Ids of faces that have no embedding from ``version``."""
    with lab.sessions() as session:
        return list(session.scalars(
            select(Face.id)
            .where(~Face.id.in_(select(Embedding.face_id).where(Embedding.model_version == version)))
            .order_by(Face.id)
        ).all())


def faces_by_photo(lab: Lab, face_ids: Sequence[int]) -> dict[str, list[Any]]:
    """The stored boxes and landmarks of these faces (rows with ``id``, ``x1`` ... ``score``,
    ``landmarks``), grouped by their photo's sha256, so each photo is read once."""
    with lab.sessions() as session:
        rows = session.execute(
            select(Face.id, Face.x1, Face.y1, Face.x2, Face.y2, Face.score, Face.landmarks, Image.sha256)
            .join(Image, Face.image_id == Image.id)
            .where(Face.id.in_(list(face_ids)))
            .order_by(Face.id)
        ).all()
    by_photo: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_photo[row.sha256].append(row)
    return dict(by_photo)


def stored_boxes(faces: Sequence[Any]) -> list[FaceBox]:
    """``faces_by_photo`` rows as FaceBoxes (landmarks None where none were stored)."""
    return [FaceBox(f.x1, f.y1, f.x2, f.y2, f.score,
                    np.asarray(f.landmarks, np.float32) if f.landmarks is not None else None) for f in faces]


@dataclass(frozen=True)
class PhotoFaces:
    """One stored photo's faces, as the per-photo loops below see them."""

    #: position of this photo among all photos of the loop (0-based) and their number
    index: int
    photos: int
    #: faces done before this photo, and all faces of the loop
    done_before: int
    total: int
    ids: list[int]
    image: np.ndarray
    boxes: list[FaceBox]


def stored_faces_by_photo(lab: Lab, face_ids: Sequence[int], with_landmarks: bool = False) -> Iterator[PhotoFaces]:
    """The loop every "run a model over stored faces" job shares (re-embedding, a candidate
    embedder, face attributes): each photo read from the store once, its faces' stored
    boxes and landmarks (missing landmarks computed as at ingest with ``with_landmarks``)."""
    by_photo = faces_by_photo(lab, face_ids)
    total = sum(len(faces) for faces in by_photo.values())
    done = 0
    for n, (sha, faces) in enumerate(by_photo.items()):
        image = lab.images.open(sha)
        boxes = stored_boxes(faces)
        if with_landmarks and any(b.landmarks is None for b in boxes):
            boxes = lab.landmarker.predict(image, boxes, only_missing=True)
        yield PhotoFaces(n, len(by_photo), done, total, [f.id for f in faces], image, boxes)
        done += len(faces)


def embed_faces(lab: Lab, face_ids: Sequence[int], progress: Progress | None = None) -> int:
    """Embed the given faces with the active embedder and add them to its index."""
    version = lab.model_version
    done = 0
    for photo in stored_faces_by_photo(lab, face_ids):
        vectors = lab.embedder.embed(photo.image, photo.boxes)
        ids = photo.ids
        with lab.write_lock:
            with lab.session() as session:
                existing = set(session.scalars(
                    select(Embedding.face_id).where(Embedding.face_id.in_(ids), Embedding.model_version == version)
                ).all())
                # only faces still there and not embedded meanwhile: the index gets exactly
                # the rows written here (another writer's rows reach it through its own update)
                added = [(face_id, Embedding.from_array(face_id, version, vec))
                         for face_id, vec in zip(ids, vectors, strict=True)
                         if face_id not in existing and session.get(Face, face_id) is not None]
                session.add_all([row for _, row in added])
            if added:
                with lab.index_for_update() as index:
                    index.add(np.asarray([face_id for face_id, _ in added], np.int64),
                              np.stack([row.as_array() for _, row in added]),
                              np.asarray([row.id for _, row in added], np.int64), keep_newer=True)
        done += len(ids)
        if progress:
            progress((photo.index + 1) / photo.photos, f"Embedded {done} of {photo.total} face(s)")
    with lab.index_for_update() as index:
        index.save()
    return done


def embed_missing(lab: Lab, progress: Progress | None = None) -> int:
    """Embed every face the active embedder has not embedded yet (e.g. after a switch).

    Names, boxes and labels are untouched: only vectors are added, and the old
    embedder's vectors stay in the database so switching back is instant.
    """
    missing = faces_missing_embeddings(lab)
    return embed_faces(lab, missing, progress) if missing else 0
