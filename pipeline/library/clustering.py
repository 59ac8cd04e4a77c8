"""Group unknown faces by embedding similarity, then name or correct whole groups.

``cluster_unknown_faces`` groups faces by **average linkage**: two groups merge only if
their faces are, on average over *every* pair between them, at least ``threshold``
similar. (The first version linked faces DBSCAN-style, through single neighbours: one
look-alike pair was enough to chain two people together, and at its defaults it put 190
faces of ~30 LFW people into one group. Figures before/after: bench/clustering.py.)

* Pairs come from batched ``lab.index()`` neighbour searches (at most ``max_neighbours``
  per face, similarity at least ``threshold - FLOOR_MARGIN``). A pair that is not among
  them counts as ``threshold - FLOOR_MARGIN``, an upper bound of its true similarity, so
  a bridge of a few similar pairs cannot carry a merge: most pairs between two people are
  far apart.
* Groups with fewer than ``min_faces`` faces are left out (noise; they can still be
  named one by one).

Only unknown faces take part: no identity, not rejected, and passing the face-quality
gate (``pipeline.library.identify``: boxes that may not be faces are not grouped).

``split_person`` runs the same grouping on one person's faces (``min_faces=1``) to show
whether a name was given to two different people.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select

from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.library import identities
from pipeline.library.identify import stored_face_quality
from pipeline.results import PersonSummary
from pipeline.served import picture_file
from storage.orm import Face, Identity, ReviewStatus, record_audit, utcnow

DEFAULT_MIN_FACES = 3
DEFAULT_MAX_NEIGHBOURS = 64
#: pairs below ``threshold - FLOOR_MARGIN`` (or not found among the neighbours) count as
#: exactly that similarity in a group's average
FLOOR_MARGIN = 0.1
#: the default grouping threshold is the 1:N threshold for a gallery of this many faces
GROUPING_GALLERY = 100
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
    # ids and vectors in one read: a delete by another thread cannot fall in between
    kept, vectors = index.held_vectors([int(i) for i in face_ids])
    if not kept:
        return np.zeros(0, np.int64), np.zeros((0, lab.embedder.dim), np.float32)
    return np.asarray(kept, dtype=np.int64), vectors.astype(np.float32)


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


def _average_linkage(ids: np.ndarray, neighbours: list[list[tuple[int, float]]], threshold: float,
                     floor: float) -> list[list[int]]:
    """Agglomerative clustering, average linkage, on a sparse similarity graph.

    The linkage of groups A and B is the mean similarity over all |A| x |B| pairs, where
    the pairs in ``neighbours`` count with their similarity (at least ``floor``) and every
    other pair counts as ``floor``. The best pair of groups merges while its linkage is at
    least ``threshold``; stale heap entries are skipped by a version check.
    """
    position = {int(f): i for i, f in enumerate(ids)}
    n = len(ids)
    # links[a][b] = [sum of similarities, number of pairs] over known pairs between groups
    links: list[dict[int, list[float]]] = [{} for _ in range(n)]
    for i, found in enumerate(neighbours):
        for face, sim in found:
            j = position[face]
            if j == i or i in links[j]:
                continue  # each pair once (it may be in both faces' lists)
            links[i][j] = [max(sim, floor), 1.0]
            links[j][i] = links[i][j]
    size = [1] * n
    version = [0] * n
    alive = [True] * n
    members: list[list[int]] = [[i] for i in range(n)]

    def linkage(a: int, b: int) -> float:
        total, count = links[a][b]
        pairs = size[a] * size[b]
        return (total + floor * (pairs - count)) / pairs

    heap = [(-linkage(a, b), a, b, 0, 0) for a in range(n) for b in links[a] if a < b]
    heapq.heapify(heap)
    while heap:
        value, a, b, va, vb = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or version[a] != va or version[b] != vb:
            continue  # a group changed since this entry was pushed
        if -value < threshold:
            break
        # merge b into a
        for c, (total, count) in links[b].items():
            if c == a:
                continue
            entry = links[a].get(c)
            if entry is None:
                links[a][c] = [total, count]
            else:
                entry[0] += total
                entry[1] += count
            links[c].pop(b, None)
            links[c][a] = links[a][c]
        links[a].pop(b, None)
        links[b] = {}
        size[a] += size[b]
        members[a].extend(members[b])
        members[b] = []
        alive[b] = False
        version[a] += 1
        for c in links[a]:
            lo, hi = (a, c) if a < c else (c, a)
            heapq.heappush(heap, (-linkage(a, c), lo, hi, version[lo], version[hi]))
    return [[int(ids[i]) for i in group] for group, ok in zip(members, alive, strict=True) if ok]


def _describe(group: list[int], vectors: dict[int, np.ndarray]) -> FaceCluster:
    matrix = np.stack([vectors[f] for f in group])
    centre = matrix.mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    sims = matrix @ centre
    order = np.argsort(-sims, kind="stable")
    ordered = [group[i] for i in order]
    return FaceCluster(ordered, ordered[0], float(sims.mean()))


def default_threshold(lab: Lab) -> float:
    """The grouping threshold used unless the user picks one: the 1:N threshold of a
    100-face gallery (``models.open_set``), or the embedder's 1:1 threshold where it has no
    calibration. Chosen on LFW train identities (bench/clustering.py --split train): for
    dlib, 0.913 (the 1:1 threshold) gave BCubed precision 0.77 at recall 0.91, and 0.942
    gave 0.98 at 0.84: a group someone names at once must be one person."""
    calibration = lab.open_set_calibration() if lab.settings.match_threshold is None else None
    return calibration.threshold(GROUPING_GALLERY) if calibration is not None else lab.match_threshold


def cluster_faces(lab: Lab, face_ids: Sequence[int], threshold: float | None = None,
                  min_faces: int = DEFAULT_MIN_FACES, max_neighbours: int = DEFAULT_MAX_NEIGHBOURS) -> list[FaceCluster]:
    """Group the given faces (see the module docstring); largest group first."""
    if min_faces < 1:
        raise InvalidRequest(f"min_faces must be at least 1, got {min_faces}")
    threshold = default_threshold(lab) if threshold is None else float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise InvalidRequest(f"the similarity threshold must be between -1 and 1, got {threshold}")
    ids, vectors = _vectors(lab, face_ids)
    if len(ids) == 0:
        return []
    floor = threshold - FLOOR_MARGIN
    neighbours = _neighbours(lab, ids, vectors, floor, max_neighbours)
    by_id = {int(f): v for f, v in zip(ids, vectors, strict=True)}
    groups = [g for g in _average_linkage(ids, neighbours, threshold, floor) if len(g) >= min_faces]
    clusters = [_describe(group, by_id) for group in groups]
    return sorted(clusters, key=lambda c: (-c.size, c.representative))


def unknown_face_ids(lab: Lab) -> list[int]:
    """Faces with no name that nobody rejected and that pass the face-quality gate (or
    that a person confirmed as faces)."""
    with lab.sessions() as session:
        ids = list(session.scalars(
            select(Face.id).where(Face.identity_id.is_(None), Face.review_status != ReviewStatus.REJECTED)
            .order_by(Face.id)
        ).all())
    quality = stored_face_quality(lab, ids)
    return [f for f in ids if quality.get(f, (None, True))[1]]


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
            person = identities.enroll(lab, face_id, name, user=user, confirm_face=True)  # the group was looked at
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
