"""Who is this? The nearest enrolled people for faces, from the FAISS index, decided by
the one rule in ``pipeline.library.identify``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import select

from pipeline.context import Lab
from pipeline.library.identify import DecisionRule, decide, decision_rule
from pipeline.results import FaceInfo, PersonMatch, Suggestion
from storage.embedding_rows import gallery_counter
from storage.faiss_index import FaceIndex
from storage.orm import Face, Identity

#: how many nearest enrolled faces to look through: one person may own many of them
SEARCH_DEPTH = 200


@dataclass(frozen=True)
class Gallery:
    """The enrolled faces a query is compared with (named faces the index holds)."""

    face_ids: np.ndarray  # int64
    person_of: dict[int, int]  # face id -> identity id
    names: dict[int, str]  # identity id -> name

    def __len__(self) -> int:
        return len(self.face_ids)


def enrolled_gallery(lab: Lab, index: FaceIndex) -> Gallery:
    """The enrolled faces the index holds. Cached per Lab: read again only when the
    database's gallery counter (kept by triggers: enrolments, renames, deletions, by any
    process) or the index's contents moved, so a search does not re-read every enrolled
    face."""
    with lab.sessions() as session:
        key = (gallery_counter(session), id(index), index.stamp())
        cached = lab._gallery_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = session.execute(select(Face.id, Face.identity_id).where(Face.identity_id.is_not(None))).all()
        names = dict(session.execute(select(Identity.id, Identity.name)).all())
    held = index.present([f for f, _ in rows]) if rows else np.zeros(0, dtype=bool)
    person_of = {int(f): int(p) for (f, p), ok in zip(rows, held, strict=True) if ok}
    gallery = Gallery(np.fromiter(sorted(person_of), dtype=np.int64, count=len(person_of)), person_of, names)
    lab._gallery_cache = (key, gallery)
    return gallery


def rank_people(lab: Lab, vectors: np.ndarray, people: int = 5, exclude: set[int] | None = None,
                index: FaceIndex | None = None, gallery: Gallery | None = None) -> list[list[PersonMatch]]:
    """For each query vector, up to ``people`` enrolled persons ranked by their most
    similar face (``is_match`` not decided yet: see ``nearest_people``).

    Only enrolled faces compete (FAISS id selector), so any number of unknown faces in
    the library cannot push the right person out of reach.
    """
    if len(vectors) == 0:
        return []
    index = index if index is not None else lab.index()
    gallery = gallery if gallery is not None else enrolled_gallery(lab, index)
    among = gallery.face_ids
    if exclude:
        among = among[~np.isin(among, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))]
    if len(among) == 0:
        return [[] for _ in range(len(vectors))]
    scores, ids = index.search(np.asarray(vectors, dtype=np.float32), min(SEARCH_DEPTH, len(among)), among=among)
    out: list[list[PersonMatch]] = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        best: dict[int, PersonMatch] = {}
        for score, face_id in zip(row_scores, row_ids, strict=True):
            face_id = int(face_id)
            person = gallery.person_of.get(face_id)
            if person is None:
                continue  # -1 padding
            if person not in best:  # results are sorted: the first hit is the best one
                best[person] = PersonMatch(person, gallery.names.get(person, "?"), float(score), False, face_id)
            if len(best) >= people:
                break
        out.append(list(best.values()))
    return out


def nearest_people(lab: Lab, vectors: np.ndarray, people: int = 5, exclude: set[int] | None = None,
                   index: FaceIndex | None = None, searchable: Sequence[bool] | None = None,
                   rule: DecisionRule | None = None) -> list[list[PersonMatch]]:
    """``rank_people`` with the decision made: ``is_match`` is True on the accepted person
    only (the best one, when it reaches the 1:N threshold and the query face passes the
    quality gate: ``searchable``, default all)."""
    index = index if index is not None else lab.index()
    gallery = enrolled_gallery(lab, index)
    ranked = rank_people(lab, vectors, people, exclude, index, gallery)
    rule = rule or decision_rule(lab, gallery_faces=len(gallery))
    searchable = list(searchable) if searchable is not None else [True] * len(ranked)
    return [decide(p, rule, ok) for p, ok in zip(ranked, searchable, strict=True)]


def suggest_people(lab: Lab, faces: list[FaceInfo], vectors: np.ndarray) -> list[FaceInfo]:
    """The same faces with ``suggestion`` set to the nearest enrolled person (if any);
    ``is_match`` says whether the decision rule accepts them. Faces that may not be faces
    (``FaceInfo.searchable`` False) get none."""
    own = {f.face_id for f in faces}
    ranked = nearest_people(lab, vectors, people=1, exclude=own, searchable=[f.searchable for f in faces])
    result = []
    for face, people in zip(faces, ranked, strict=True):
        if people and face.searchable:
            p = people[0]
            face = replace(face, suggestion=Suggestion(p.identity_id, p.name, p.similarity, p.is_match))
        result.append(face)
    return result
