"""Who is this? The nearest enrolled people for faces, from the FAISS index."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sqlalchemy import select

from pipeline.context import Lab
from pipeline.results import FaceInfo, PersonMatch, Suggestion
from storage.faiss_index import FaceIndex
from storage.orm import Face, Identity

#: how many nearest faces to look through for enrolled ones; unknown faces crowd the
#: top ranks in a big library, so look further than the number of people wanted
SEARCH_DEPTH = 200


def nearest_people(lab: Lab, vectors: np.ndarray, people: int = 5, exclude: set[int] | None = None,
                   index: FaceIndex | None = None) -> list[list[PersonMatch]]:
    """For each query vector, up to ``people`` named persons ranked by best face similarity.

    ``index``: the caller's ``lab.index()`` when it already has one for this request
    (spares a second change check against the database).
    """
    if len(vectors) == 0:
        return []
    index = index if index is not None else lab.index()
    if len(index) == 0:
        return [[] for _ in range(len(vectors))]
    scores, ids = index.search(np.asarray(vectors, dtype=np.float32), min(SEARCH_DEPTH, len(index)))
    wanted = {int(i) for row in ids for i in row if i >= 0}
    with lab.sessions() as session:
        named = dict(
            session.execute(
                select(Face.id, Identity.id).join(Identity, Face.identity_id == Identity.id).where(Face.id.in_(wanted))
            ).all()
        ) if wanted else {}
        names = dict(session.execute(select(Identity.id, Identity.name).where(Identity.id.in_(set(named.values())))).all())
    threshold = lab.match_threshold
    out: list[list[PersonMatch]] = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        best: dict[int, PersonMatch] = {}
        for score, face_id in zip(row_scores, row_ids, strict=True):
            face_id = int(face_id)
            if face_id < 0 or (exclude and face_id in exclude) or face_id not in named:
                continue
            person = named[face_id]
            if person not in best:  # results are sorted: the first hit is the best one
                best[person] = PersonMatch(person, names[person], float(score), float(score) >= threshold, face_id)
            if len(best) >= people:
                break
        out.append(list(best.values()))
    return out


def suggest_people(lab: Lab, faces: list[FaceInfo], vectors: np.ndarray) -> list[FaceInfo]:
    """The same faces with ``suggestion`` set to the nearest enrolled person (if any)."""
    own = {f.face_id for f in faces}
    ranked = nearest_people(lab, vectors, people=1, exclude=own)
    result = []
    for face, people in zip(faces, ranked, strict=True):
        if people:
            p = people[0]
            face = replace(face, suggestion=Suggestion(p.identity_id, p.name, p.similarity, p.is_match))
        result.append(face)
    return result
