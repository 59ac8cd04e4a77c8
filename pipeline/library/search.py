"""Search: a photo (or a stored face) in, ranked similar faces and people out.

Every face of the photo is searched, and each says who it is by the one decision rule of
``pipeline.library.identify`` (1:N threshold for the current gallery size, face-quality gate).
The photo's *primary* face (the biggest searchable face, towards the centre) decides
``SearchResult.best_person``; bystanders never do. A photo without a face gives an empty
result, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import select

from models.types import FaceBox
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
    query = query_faces(lab, image.rgb)
    if query is None:
        rule = decision_rule(lab, threshold)
        return SearchResult([], rule.threshold, lab.model_version, None, rule.gallery_faces, rule.describe())
    result = _search(lab, query.vectors, query.boxes, query.scores, query.qualities, query.searchable,
                     query.primary, k, threshold, with_embeddings)
    return replace(result, faces_found_by=QUICK_LOOK if query.quick else FULL_DETECTOR)


QUICK_LOOK = "quick look (the photo at its own size)"
FULL_DETECTOR = "full detector (as at ingest)"


def query_faces(lab: Lab, rgb: np.ndarray) -> QueryFaces | None:
    """A search photo's faces (None: no face). The quick look first
    (``quick_query_boxes``); its answer stands if it has a searchable main face, else the
    full detector runs, as ingest does."""
    quick = quick_query_boxes(lab, rgb)
    if quick:
        query = QueryFaces.of(lab, rgb, quick, quick=True)
        if query.primary is not None:
            return query
    boxes = lab.detector.detect(rgb)
    return QueryFaces.of(lab, rgb, boxes, quick=False) if boxes else None


def quick_query_boxes(lab: Lab, rgb: np.ndarray) -> list[FaceBox]:
    """The quick look at a search photo (``search_detect="quick"``): the detector at the
    photo's own size (no 2x upscale: about a quarter of its time, most of a search's
    cost). Kept only when it holds a face at least ``search_quick_min_face_px`` on its
    short side, else empty: a search is about the photo's main face, and when that is
    plain to see the small background faces the 2x run would add rarely matter. The
    caller runs the full detector when this is empty or finds no searchable main face
    (bench/search_detect.py measures what changes)."""
    if lab.settings.search_detect != "quick" or not lab.detector.upscales:
        return []  # (a detector that does not upscale has no cheaper pass: run it once)
    boxes = lab.detector.detect_without_upscale(rgb)
    if any(min(b.x2 - b.x1, b.y2 - b.y1) >= lab.settings.search_quick_min_face_px for b in boxes):
        return boxes
    return []


@dataclass
class QueryFaces:
    """A search photo's faces after landmarks, embedding, the quality gate and the choice
    of the main face."""

    boxes: list[tuple[float, float, float, float]]
    scores: list[float]
    vectors: np.ndarray
    qualities: list[float | None]
    searchable: list[bool]
    primary: int | None
    #: found by the quick look (no full detector run)
    quick: bool = False

    @classmethod
    def of(cls, lab: Lab, rgb: np.ndarray, boxes: list[FaceBox], quick: bool = False) -> QueryFaces:
        boxes = lab.landmarker.predict(rgb, boxes)
        vectors = lab.embedder.embed(rgb, boxes)
        tuples = [b.as_tuple() for b in boxes]
        quality = face_quality(lab, vectors, tuples)
        qualities = [float(q) for q in quality] if quality is not None else [None] * len(boxes)
        searchable = [passes_gate(lab, q) for q in qualities]
        primary = primary_face(tuples, rgb.shape[1], rgb.shape[0], searchable)
        return cls(tuples, [b.score for b in boxes], vectors, qualities, searchable, primary, quick)


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

