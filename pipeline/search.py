"""Search: a photo (or a stored face) in, ranked similar faces and people out."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.results import Match, QueryFace, SearchResult
from pipeline.suggest import nearest_people
from storage.images import ImageRejected, decode_upload
from storage.orm import Embedding, Face, Identity


def _check_params(lab: Lab, k: int, threshold: float | None) -> float:
    if not isinstance(k, int) or k < 1 or k > lab.settings.max_k:
        raise InvalidRequest(f"k must be a whole number from 1 to {lab.settings.max_k}, got {k!r}")
    if threshold is None:
        return lab.match_threshold
    if not (-1.0 <= float(threshold) <= 1.0) or np.isnan(threshold):
        raise InvalidRequest(f"threshold is a cosine similarity between -1 and 1, got {threshold!r}")
    return float(threshold)


def search_image(lab: Lab, data: bytes, name: str = "query", k: int = 10, threshold: float | None = None) -> SearchResult:
    """Find the faces in a photo and, for each, the ``k`` most similar stored faces."""
    threshold = _check_params(lab, k, threshold)
    if len(data) > lab.settings.max_upload_bytes:
        raise InvalidRequest(f"the photo is larger than {lab.settings.max_upload_bytes / 1e6:.0f} MB")
    try:
        image = decode_upload(data, name, max_pixels=lab.settings.max_pixels, max_bytes=lab.settings.max_upload_bytes)
    except ImageRejected as exc:
        raise InvalidRequest(str(exc)) from exc
    boxes = lab.detector.detect(image.rgb)
    if not boxes:
        raise NotFound("No face found in this photo. Try a larger, sharper or more frontal photo.")
    boxes = lab.landmarker.predict(image.rgb, boxes)
    vectors = lab.embedder.embed(image.rgb, boxes)
    faces = _rank(lab, vectors, k, threshold)
    return SearchResult(
        faces=[QueryFace(box.as_tuple(), box.score, matches, people) for box, (matches, people) in zip(boxes, faces)],
        threshold=threshold, model_version=lab.model_version,
    )


def search_face(lab: Lab, face_id: int, k: int = 10, threshold: float | None = None) -> SearchResult:
    """Faces similar to one stored face (the face itself is left out)."""
    threshold = _check_params(lab, k, threshold)
    with lab.sessions() as session:
        row = session.execute(
            select(Face, Embedding)
            .join(Embedding, Embedding.face_id == Face.id)
            .where(Face.id == face_id, Embedding.model_version == lab.model_version)
        ).one_or_none()
        if row is None:
            raise NotFound(f"face {face_id} does not exist (or has no embedding from {lab.model_version})")
        face, embedding = row
        box, score, vector = face.box, face.score, embedding.as_array()
    ((matches, people),) = _rank(lab, vector[None, :], k, threshold, exclude={face_id})
    return SearchResult([QueryFace(box, score, matches, people)], threshold, lab.model_version)


def _rank(lab: Lab, vectors: np.ndarray, k: int, threshold: float, exclude: set[int] | None = None):
    index = lab.index()
    results = []
    people = nearest_people(lab, vectors, people=k, exclude=exclude, index=index)
    if len(index) == 0:
        return [([], p) for p in people]
    depth = min(len(index), k + len(exclude or ()))
    scores, ids = index.search(np.asarray(vectors, dtype=np.float32), depth)
    wanted = {int(i) for row in ids for i in row if i >= 0}
    with lab.sessions() as session:
        rows = {
            f.id: (f, name)
            for f, name in session.execute(
                select(Face, Identity.name).outerjoin(Identity, Face.identity_id == Identity.id).where(Face.id.in_(wanted))
            ).all()
        }
        for row_scores, row_ids, row_people in zip(scores, ids, people, strict=True):
            matches = []
            for score, face_id in zip(row_scores, row_ids, strict=True):
                face_id = int(face_id)
                if face_id < 0 or face_id not in rows or (exclude and face_id in exclude):
                    continue  # -1 padding, or deleted since the index was read
                face, name = rows[face_id]
                matches.append(Match(face_id, face.image_id, float(score), float(score) >= threshold,
                                     face.identity_id, name, face.box))
            results.append((matches[:k], [p for p in row_people]))
    return results
