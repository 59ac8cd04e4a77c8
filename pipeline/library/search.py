"""Search: a photo (or a stored face) in, ranked similar faces and people out.

Every face of the photo is searched, and each says who it is by the one decision rule of
``pipeline.library.identify`` (1:N threshold for the current gallery size, face-quality gate).
The photo's *primary* face (the biggest searchable face, towards the centre) decides
``SearchResult.best_person``; bystanders never do. A photo without a face gives an empty
result, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select

from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.library.identify import (
    decide,
    decision_rule,
    face_quality,
    is_confirmed,
    passes_gate,
    primary_face,
)
from pipeline.library.suggest import enrolled_gallery, rank_people
from pipeline.results import Match, PersonMatch, QueryFace, SearchResult
from storage.faiss_index import FaceIndex
from storage.images import ImageRejected, decode_upload
from storage.orm import Embedding, Face, Identity

#: similar stored faces are read this much deeper than asked, so that faces left out
#: (boxes that may not be faces, the query itself) do not leave the list short
DEPTH_SLACK = 20


def _check_params(lab: Lab, k: int, threshold: float | None) -> float | None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > lab.settings.max_k:
        raise InvalidRequest(f"k must be a whole number from 1 to {lab.settings.max_k}, got {k!r}")
    if threshold is None:
        return None
    if not (-1.0 <= float(threshold) <= 1.0) or np.isnan(threshold):
        raise InvalidRequest(f"threshold is a cosine similarity between -1 and 1, got {threshold!r}")
    return float(threshold)


def search_image(lab: Lab, data: bytes, name: str = "query", k: int = 10, threshold: float | None = None,
                 with_embeddings: bool = False) -> SearchResult:
    """Find the faces in a photo and, for each, the ``k`` most similar stored faces and
    enrolled people. ``threshold``: a fixed 1:N threshold instead of the calibrated one.
    ``with_embeddings``: also return each query face's unit vector."""
    threshold = _check_params(lab, k, threshold)
    if len(data) > lab.settings.max_upload_bytes:
        raise InvalidRequest(f"the photo is larger than {lab.settings.max_upload_bytes / 1e6:.0f} MB")
    try:
        image = decode_upload(data, name, max_pixels=lab.settings.max_pixels, max_bytes=lab.settings.max_upload_bytes)
    except ImageRejected as exc:
        raise InvalidRequest(str(exc)) from exc
    boxes = lab.detector.detect(image.rgb)
    if not boxes:
        rule = decision_rule(lab, threshold)
        return SearchResult([], rule.threshold, lab.model_version, None, rule.gallery_faces, rule.describe())
    boxes = lab.landmarker.predict(image.rgb, boxes)
    vectors = lab.embedder.embed(image.rgb, boxes)
    quality = face_quality(lab, vectors, [b.as_tuple() for b in boxes])
    qualities = [float(q) for q in quality] if quality is not None else [None] * len(boxes)
    searchable = [passes_gate(lab, q) for q in qualities]
    primary = primary_face([b.as_tuple() for b in boxes], image.width, image.height, searchable)
    return _search(lab, vectors, [b.as_tuple() for b in boxes], [b.score for b in boxes], qualities, searchable,
                   primary, k, threshold, with_embeddings)


def search_face(lab: Lab, face_id: int, k: int = 10, threshold: float | None = None,
                with_embeddings: bool = False) -> SearchResult:
    """Faces and people similar to one stored face (the face itself is left out)."""
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
        box, score, vector, confirmed = face.box, face.score, embedding.as_array(), is_confirmed(face)
    quality = face_quality(lab, vector[None, :], [box])
    q = float(quality[0]) if quality is not None else None
    searchable = confirmed or passes_gate(lab, q)
    return _search(lab, vector[None, :], [box], [score], [q], [searchable], 0 if searchable else None, k,
                   threshold, with_embeddings, exclude={int(face_id)})


def _search(lab: Lab, vectors: np.ndarray, boxes: Sequence[tuple[float, float, float, float]],
            scores: Sequence[float], qualities: Sequence[float | None], searchable: Sequence[bool],
            primary: int | None, k: int, threshold: float | None, with_embeddings: bool,
            exclude: set[int] | None = None) -> SearchResult:
    index = lab.index()
    gallery = enrolled_gallery(lab, index)
    rule = decision_rule(lab, threshold, gallery_faces=len(gallery))
    vectors = np.asarray(vectors, dtype=np.float32)
    people = rank_people(lab, vectors, people=k, exclude=exclude, index=index, gallery=gallery)
    decided = [decide(p, rule, ok) for p, ok in zip(people, searchable, strict=True)]
    matches = _similar_faces(lab, index, vectors, k, decided, searchable, exclude)
    faces = [
        QueryFace(tuple(float(v) for v in box), float(score), face_matches, ppl, quality, ok, i == primary,
                  [float(v) for v in vectors[i]] if with_embeddings else None)
        for i, (box, score, face_matches, ppl, quality, ok) in
        enumerate(zip(boxes, scores, matches, decided, qualities, searchable, strict=True))
    ]
    return SearchResult(faces, rule.threshold, lab.model_version, primary, rule.gallery_faces, rule.describe())


def _similar_faces(lab: Lab, index: FaceIndex, vectors: np.ndarray, k: int, decided: list[list[PersonMatch]],
                   searchable: Sequence[bool], exclude: set[int] | None) -> list[list[Match]]:
    """The ``k`` most similar stored faces per query, leaving out boxes that may not be
    faces (unless a person confirmed them). A match ``is_match`` only if it is a face of
    the person the query was accepted as."""
    if len(index) == 0:
        return [[] for _ in range(len(vectors))]
    depth = min(len(index), k + len(exclude or ()) + DEPTH_SLACK)
    sims, ids = index.search(vectors, depth)
    wanted = sorted({int(i) for row in ids for i in row if i >= 0})
    with lab.sessions() as session:
        rows = {f.id: (f, name, is_confirmed(f)) for f, name in session.execute(
            select(Face, Identity.name).outerjoin(Identity, Face.identity_id == Identity.id).where(Face.id.in_(wanted))
        ).all()}
    # still in the index (a delete may have run since the search): ids and vectors in one read
    present, vectors = index.held_vectors([f for f in wanted if f in rows])
    quality = face_quality(lab, vectors, [rows[f][0].box for f in present])
    usable = {f: rows[f][2] or passes_gate(lab, float(quality[i]) if quality is not None else None)
              for i, f in enumerate(present)}
    out = []
    for row_sims, row_ids, people, ok in zip(sims, ids, decided, searchable, strict=True):
        accepted = next((p.identity_id for p in people if p.is_match), None)
        found: list[Match] = []
        for sim, face_id in zip(row_sims, row_ids, strict=True):
            face_id = int(face_id)
            if not ok or face_id < 0 or not usable.get(face_id) or (exclude and face_id in exclude):
                continue  # padding, deleted since, maybe not a face, or the query itself
            face, name, _ = rows[face_id]
            found.append(Match(face_id, face.image_id, float(sim),
                               accepted is not None and face.identity_id == accepted, face.identity_id, name, face.box))
            if len(found) >= k:
                break
        out.append(found)
    return out

