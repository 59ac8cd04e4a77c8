"""Group unknown faces by embedding similarity, then name or correct whole groups.

``cluster_unknown_faces`` works in the spirit of Immich's face clustering (a
DBSCAN-like pass over FAISS neighbour searches):

* neighbours of a face = other faces with cosine similarity >= ``threshold`` (the
  embedder's same-person threshold by default), found with batched ``lab.index()``
  searches, looking at most ``max_neighbours`` deep;
* a *core* face has at least ``min_faces`` faces within the threshold, itself included
  (Immich's ``minFaces``, DBSCAN's ``minPts``);
* core faces that are neighbours are connected into one cluster; a non-core face joins
  the cluster of its most similar core neighbour; everything else is noise and is left
  alone (it may still get a name one by one).

Only unknown faces take part: no identity and not rejected. Named faces in the index
are skipped. Because each search looks at most ``max_neighbours`` deep, two cores
whose only links lie beyond that depth stay apart (a known approximation, cheap in
the common case of a few hundred faces per person).

``split_person`` runs the same grouping on one person's faces (``min_faces=1``, i.e.
connected components) to show whether a name was given to two different people.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select

from pipeline import identities
from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.results import PersonSummary
from pipeline.served import picture_file
from storage.orm import Face, Identity, ReviewStatus, record_audit, utcnow

DEFAULT_MIN_FACES = 3
DEFAULT_MAX_NEIGHBOURS = 64
SEARCH_BATCH = 256
#: named faces crowd the neighbour lists: search this much deeper than wanted
SEARCH_SLACK = 64


@dataclass(frozen=True)
class FaceCluster:
    """One group of faces: ``face_ids`` most typical first; ``representative`` is the first."""

    face_ids: list[int]
    representative: int
    #: mean cosine similarity of the members to the group's mean direction
    cohesion: float

    @property
    def size(self) -> int:
        return len(self.face_ids)


@dataclass(frozen=True)
class NamedGroup:
    person: PersonSummary
    named: list[int]
    #: faces left alone because someone named them as another person meanwhile
    skipped: list[int]


def _vectors(lab: Lab, face_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, unit vectors)`` for the faces the index holds (others are dropped)."""
    index = lab.index()
    ids = [int(i) for i in face_ids if int(i) in index]
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, lab.embedder.dim), np.float32)
    return np.asarray(ids, np.int64), np.stack([index.reconstruct(i) for i in ids]).astype(np.float32)


def _neighbours(lab: Lab, ids: np.ndarray, vectors: np.ndarray, threshold: float,
                max_neighbours: int) -> list[list[tuple[int, float]]]:
    """For each face, its neighbours among ``ids`` (not itself), most similar first."""
    index = lab.index()
    members = {int(i) for i in ids}
    k = min(len(index), max_neighbours + SEARCH_SLACK + 1)
    out: list[list[tuple[int, float]]] = []
    for start in range(0, len(ids), SEARCH_BATCH):
        scores, hits = index.search(vectors[start : start + SEARCH_BATCH], k)
        for own, row_scores, row_ids in zip(ids[start : start + SEARCH_BATCH], scores, hits, strict=True):
            found = []
            for score, hit in zip(row_scores, row_ids, strict=True):
                if score < threshold:
                    break  # results are sorted by similarity
                hit = int(hit)
                if hit != int(own) and hit in members:
                    found.append((hit, float(score)))
                    if len(found) >= max_neighbours:
                        break
            out.append(found)
    return out


def _group(ids: np.ndarray, neighbours: list[list[tuple[int, float]]], min_faces: int) -> list[list[int]]:
    """DBSCAN on precomputed neighbour lists: core faces joined, borders attached, noise dropped."""
    position = {int(f): i for i, f in enumerate(ids)}
    core = [len(n) + 1 >= min_faces for n in neighbours]
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, found in enumerate(neighbours):
        if not core[i]:
            continue
        for face, _ in found:
            j = position[face]
            if core[j]:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        if core[i]:
            groups.setdefault(root(i), []).append(int(ids[i]))
    for i, found in enumerate(neighbours):
        if core[i]:
            continue
        # a border face joins its most similar core neighbour (lists are sorted)
        best = next((position[f] for f, _ in found if core[position[f]]), None)
        if best is not None:
            groups[root(best)].append(int(ids[i]))
    return list(groups.values())


def _describe(group: list[int], vectors: dict[int, np.ndarray]) -> FaceCluster:
    matrix = np.stack([vectors[f] for f in group])
    centre = matrix.mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    sims = matrix @ centre
    order = np.argsort(-sims, kind="stable")
    ordered = [group[i] for i in order]
    return FaceCluster(ordered, ordered[0], float(sims.mean()))


def cluster_faces(lab: Lab, face_ids: Sequence[int], threshold: float | None = None,
                  min_faces: int = DEFAULT_MIN_FACES, max_neighbours: int = DEFAULT_MAX_NEIGHBOURS) -> list[FaceCluster]:
    """Group the given faces (see the module docstring); largest group first."""
    if min_faces < 1:
        raise InvalidRequest(f"min_faces must be at least 1, got {min_faces}")
    threshold = lab.match_threshold if threshold is None else float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise InvalidRequest(f"the similarity threshold must be between -1 and 1, got {threshold}")
    ids, vectors = _vectors(lab, face_ids)
    if len(ids) == 0:
        return []
    neighbours = _neighbours(lab, ids, vectors, threshold, max_neighbours)
    by_id = {int(f): v for f, v in zip(ids, vectors, strict=True)}
    clusters = [_describe(group, by_id) for group in _group(ids, neighbours, min_faces)]
    return sorted(clusters, key=lambda c: (-c.size, c.representative))


def unknown_face_ids(lab: Lab) -> list[int]:
    """Faces with no name that nobody rejected."""
    with lab.sessions() as session:
        return list(session.scalars(
            select(Face.id).where(Face.identity_id.is_(None), Face.review_status != ReviewStatus.REJECTED)
            .order_by(Face.id)
        ).all())


def cluster_unknown_faces(lab: Lab, threshold: float | None = None, min_faces: int = DEFAULT_MIN_FACES,
                          max_neighbours: int = DEFAULT_MAX_NEIGHBOURS) -> list[FaceCluster]:
    """Groups of unknown faces that look like the same person, largest first."""
    return cluster_faces(lab, unknown_face_ids(lab), threshold, min_faces, max_neighbours)


def split_person(lab: Lab, name: str, threshold: float | None = None) -> list[FaceCluster]:
    """One person's faces in groups of mutually similar faces, largest first. More than
    one group suggests the name covers two people (or very different photos)."""
    with lab.sessions() as session:
        person = session.scalars(select(Identity).where(func.lower(Identity.name) == identities.clean_name(name).lower())).first()
        if person is None:
            raise NotFound(f"No person called {identities.clean_name(name)!r}.")
        face_ids = list(session.scalars(select(Face.id).where(Face.identity_id == person.id)).all())
    # min_faces=1: every face is a core face, so groups are the connected components
    return cluster_faces(lab, face_ids, threshold, min_faces=1, max_neighbours=max(1, len(face_ids)))


def name_cluster(lab: Lab, face_ids: Sequence[int], name: str, user: str = "local") -> NamedGroup:
    """Give every face of a group one name (creating the person if new).

    Faces someone has meanwhile named as another person are skipped, not overwritten.
    Holds the write lock throughout, so no other edit in this process interleaves.
    """
    name = identities.clean_name(name)
    ids = sorted({int(f) for f in face_ids})
    if not ids:
        raise InvalidRequest("The group is empty: find groups first.")
    with lab.write_lock:
        with lab.sessions() as session:
            rows = dict(session.execute(select(Face.id, Face.identity_id).where(Face.id.in_(ids))).all())
            target = session.scalars(select(Identity.id).where(func.lower(Identity.name) == name.lower())).first()
        missing = [f for f in ids if f not in rows]
        if missing:
            raise NotFound(f"Face(s) {', '.join(map(str, missing))} no longer exist; find groups again.")
        skipped = [f for f in ids if rows[f] is not None and rows[f] != target]
        named = [f for f in ids if f not in skipped]
        person = None
        for face_id in named:
            person = identities.enroll(lab, face_id, name, user=user)
    if person is None:
        raise InvalidRequest("Every face of this group has been named as someone else meanwhile.")
    return NamedGroup(person, named, skipped)


def remove_from_person(lab: Lab, face_id: int, user: str = "local") -> str:
    """"Not this person": take the name off one face.

    The face keeps its box (it is still a face) and goes back to "pending" review so it
    shows up for naming again; the audit log records which person it was rejected for.
    """
    if not isinstance(face_id, int) or face_id < 1:
        raise InvalidRequest(f"face id must be a positive whole number, got {face_id!r}")
    with lab.write_lock, lab.session() as session:
        face = session.get(Face, face_id)
        if face is None:
            raise NotFound(f"Face {face_id} does not exist (it may have been deleted).")
        if face.identity_id is None:
            raise InvalidRequest(f"Face {face_id} has no name to remove.")
        person = face.identity
        record_audit(session, user, "remove_from_person", "face", face_id,
                     {"identity_id": person.id, "identity": person.name, "verdict": "rejected",
                      "previous_review_status": str(face.review_status)})
        face.identity_id = None
        face.review_status = ReviewStatus.PENDING
        face.updated_by = user
        face.updated_at = utcnow()
        return f"Face #{face_id} is no longer {person.name}."


def remove_group_from_person(lab: Lab, face_ids: Sequence[int], user: str = "local") -> str:
    """"Not this person" for every named face of a group (unnamed ones are left alone)."""
    ids = sorted({int(f) for f in face_ids})
    with lab.write_lock:
        with lab.sessions() as session:
            named = list(session.scalars(select(Face.id).where(Face.id.in_(ids), Face.identity_id.is_not(None))).all())
        if not named:
            raise InvalidRequest("None of these faces has a name to remove.")
        for face_id in named:
            remove_from_person(lab, face_id, user=user)
    return f"Removed the name from {len(named)} face(s); they are unknown faces again."


def cluster_thumbnails(lab: Lab, face_ids: Sequence[int], limit: int = 24, size: int = 112) -> list[tuple[str, str]]:
    """Face crops of the first ``limit`` faces (files named after their photo, see
    pipeline.served), captioned with their ids (and names)."""
    out = []
    with lab.sessions() as session:
        for face_id in list(face_ids)[:limit]:
            face = session.get(Face, int(face_id))
            if face is None:
                continue
            caption = f"#{face_id}" + (f" {face.identity.name}" if face.identity_id is not None else "")
            sha = face.image.sha256
            out.append((picture_file(lab, lab.images.thumbnail(sha, face.box, size=size, margin=0.2), sha), caption))
    return out
