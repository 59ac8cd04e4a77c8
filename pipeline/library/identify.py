"""Who is this face? The one decision rule every part of FaceLab uses.

Detect (suggestions), Search, Label suggestions and the API all call ``decide`` here, so a
face is "Ada" in one place exactly when it is "Ada" everywhere.

Two things decide:

* **Face quality** (``models.face_quality``): a box that may not be a face (a hand, a
  torso, a wall ornament) gets no name, is left out of search results and of
  suggestions, and cannot be enrolled, until a person confirms it (naming it on purpose,
  or saving it as reviewed in the Label tab). It stays in the library for labeling.
* **The 1:N threshold** (``models.open_set``): the similarity the best enrolled person
  must reach, as a function of how many enrolled faces the query is compared with,
  calibrated so that about 1 % of strangers are accepted at any gallery size. A fixed
  ``Settings.match_threshold`` overrides it (for experiments, and to reproduce the old
  behaviour in ``bench/identification.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import func, select

from pipeline.context import Lab
from pipeline.results import PersonMatch
from storage.orm import Embedding, Face, ReviewStatus


@dataclass(frozen=True)
class DecisionRule:
    """The threshold in force for one search, and why."""

    threshold: float
    #: enrolled faces with an embedding of the active version (what a query is compared with)
    gallery_faces: int
    #: "calibrated" (1:N, per gallery size), "fixed" (Settings.match_threshold or the
    #: caller's), or "uncalibrated" (no 1:N calibration for this embedder: its 1:1 threshold)
    kind: str
    target_far: float | None = None

    def describe(self) -> str:
        if self.kind == "calibrated":
            return (f"threshold {self.threshold:.3f}: calibrated so that about {self.target_far:.0%} of strangers "
                    f"are accepted against {self.gallery_faces} enrolled face(s)")
        if self.kind == "fixed":
            return f"threshold {self.threshold:.3f} (fixed)"
        return (f"threshold {self.threshold:.3f}: this embedder has no 1:N calibration, so its 1:1 (pair) "
                "threshold is used; strangers are accepted more often as the gallery grows")


def enrolled_face_count(lab: Lab) -> int:
    """Named faces that have a vector from the active embedder."""
    with lab.sessions() as session:
        return int(session.scalar(
            select(func.count(Face.id))
            .join(Embedding, (Embedding.face_id == Face.id) & (Embedding.model_version == lab.model_version))
            .where(Face.identity_id.is_not(None))
        ) or 0)


def decision_rule(lab: Lab, threshold: float | None = None, gallery_faces: int | None = None) -> DecisionRule:
    """The rule for a search now. ``threshold``: the caller's own fixed value, if any."""
    m = enrolled_face_count(lab) if gallery_faces is None else int(gallery_faces)
    if threshold is not None:
        return DecisionRule(float(threshold), m, "fixed")
    if lab.settings.match_threshold is not None:
        return DecisionRule(float(lab.settings.match_threshold), m, "fixed")
    calibration = lab.open_set_calibration()
    if calibration is not None:
        return DecisionRule(calibration.threshold(m), m, "calibrated", calibration.target_far)
    return DecisionRule(lab.match_threshold, m, "uncalibrated")


def decide(people: Sequence[PersonMatch], rule: DecisionRule, searchable: bool = True) -> list[PersonMatch]:
    """The ranked people with ``is_match`` set on the accepted one only: the best-ranked
    person, if the query face is searchable and their similarity reaches the threshold."""
    people = list(people)
    accepted = searchable and bool(people) and people[0].similarity >= rule.threshold
    return [replace(p, is_match=accepted and i == 0) for i, p in enumerate(people)]


# -- face quality -----------------------------------------------------------------------------
def face_quality(lab: Lab, vectors: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray | None:
    """Probability that each box is a real face (None: no quality model for this embedder,
    or the gate is switched off in the settings)."""
    model = lab.quality_model()
    if model is None or len(boxes) == 0:
        return None if model is None else np.zeros(0, np.float32)
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sides = np.minimum(arr[:, 2] - arr[:, 0], arr[:, 3] - arr[:, 1])
    return model.predict(np.asarray(vectors, dtype=np.float32), sides)


def quality_gate(lab: Lab) -> float | None:
    model = lab.quality_model()
    return None if model is None else model.threshold


def passes_gate(lab: Lab, quality: float | None) -> bool:
    gate = quality_gate(lab)
    return gate is None or quality is None or quality >= gate


def is_confirmed(face: Face) -> bool:
    """A person has said this box is a face: named it, or saved it as reviewed."""
    return face.identity_id is not None or face.review_status == ReviewStatus.ACCEPTED


def primary_face(boxes: Sequence[Sequence[float]], width: int, height: int, searchable: Sequence[bool]) -> int | None:
    """Index of the photo's main face: the biggest searchable face, weighted towards the
    centre (a bystander at the edge rarely is the subject). None if no face is searchable."""
    best, best_key = None, -1.0
    cx, cy = width / 2.0, height / 2.0
    half_diagonal = max(1.0, float(np.hypot(cx, cy)))
    for i, (box, ok) in enumerate(zip(boxes, searchable, strict=True)):
        if not ok:
            continue
        x1, y1, x2, y2 = box
        area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
        off_centre = float(np.hypot((x1 + x2) / 2 - cx, (y1 + y2) / 2 - cy)) / half_diagonal
        key = area * (1.0 - 0.5 * off_centre)
        if key > best_key:
            best, best_key = i, key
    return best


def stored_face_quality(lab: Lab, face_ids: Sequence[int]) -> dict[int, tuple[float | None, bool]]:
    """``face id -> (quality, searchable)`` for stored faces, from their stored vectors
    (no image is read). Faces without a vector of the active embedder get (None, True)."""
    ids = sorted({int(f) for f in face_ids})
    if not ids:
        return {}
    with lab.sessions() as session:
        rows = session.execute(
            select(Face, Embedding.vector)
            .outerjoin(Embedding, (Embedding.face_id == Face.id) & (Embedding.model_version == lab.model_version))
            .where(Face.id.in_(ids))
        ).all()
        facts = [(f.id, f.box, is_confirmed(f), vector) for f, vector in rows]
    with_vec = [x for x in facts if x[3] is not None]
    quality = face_quality(lab, np.stack([np.frombuffer(v, dtype="<f4") for *_, v in with_vec]) if with_vec else
                           np.zeros((0, 1), np.float32), [x[1] for x in with_vec])
    out: dict[int, tuple[float | None, bool]] = {f: (None, True) for f, *_ in facts}
    for i, (face_id, _, confirmed, _) in enumerate(with_vec):
        q = float(quality[i]) if quality is not None else None
        out[face_id] = (q, confirmed or passes_gate(lab, q))
    return out
