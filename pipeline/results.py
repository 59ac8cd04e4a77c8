"""What pipeline operations return: plain dataclasses the UI and API turn into views."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Suggestion:
    """The nearest enrolled person for a face."""

    identity_id: int
    name: str
    similarity: float
    is_match: bool


@dataclass(frozen=True)
class FaceInfo:
    face_id: int
    image_id: int
    box: tuple[float, float, float, float]
    score: float
    origin: str
    identity_id: int | None = None
    identity: str | None = None
    suggestion: Suggestion | None = None
    #: probability that the box is a real face (models.face_quality); None: not assessed
    quality: float | None = None
    #: passes the quality gate or was confirmed by a person: searchable and enrollable
    searchable: bool = True


@dataclass(frozen=True)
class FileResult:
    """The outcome of one uploaded file. ``error`` is set when the file was refused."""

    name: str
    image_id: int | None = None
    sha256: str | None = None
    duplicate: bool = False
    faces: list[FaceInfo] = field(default_factory=list)
    error: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class IngestReport:
    files: list[FileResult]

    @property
    def ok_count(self) -> int:
        return sum(1 for f in self.files if f.ok)

    @property
    def error_count(self) -> int:
        return sum(1 for f in self.files if not f.ok)

    @property
    def face_count(self) -> int:
        return sum(len(f.faces) for f in self.files)

    def summary(self) -> str:
        text = f"{self.ok_count} image(s) processed, {self.face_count} face(s) found"
        if self.error_count:
            text += f", {self.error_count} file(s) refused"
        return text


@dataclass(frozen=True)
class Match:
    """One enrolled/known face similar to a query face."""

    face_id: int
    image_id: int
    similarity: float
    is_match: bool
    identity_id: int | None
    name: str | None
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class PersonMatch:
    """A person ranked by the best similarity of any of their faces to the query."""

    identity_id: int
    name: str
    similarity: float
    is_match: bool
    face_id: int


@dataclass(frozen=True)
class QueryFace:
    """One face of a search photo (or a stored face searched for) and what it matched.

    ``people`` are enrolled persons ranked by similarity; at most the first has
    ``is_match`` (accepted by the decision rule). ``matches`` are the most similar stored
    faces; a match's ``is_match`` is True only for faces of the accepted person.
    """

    box: tuple[float, float, float, float]
    score: float
    matches: list[Match]
    people: list[PersonMatch]
    #: probability that the box is a real face; None: no quality model for this embedder
    quality: float | None = None
    #: False: the box may not be a face, so it was not searched and names nobody
    searchable: bool = True
    is_primary: bool = False
    #: the query's unit embedding, when the caller asked for it
    embedding: list[float] | None = None

    @property
    def decision(self) -> PersonMatch | None:
        """The enrolled person this face is, by the decision rule; None: nobody."""
        return next((p for p in self.people if p.is_match), None)


@dataclass(frozen=True)
class SearchResult:
    faces: list[QueryFace]
    #: the similarity the best enrolled person had to reach
    threshold: float
    model_version: str
    #: index in ``faces`` of the photo's main face (biggest searchable, towards the centre)
    primary: int | None = None
    #: enrolled faces the query was compared with
    gallery_faces: int = 0
    #: how the threshold was set (pipeline.library.identify.DecisionRule.describe)
    rule: str = ""
    #: how a search photo's faces were found (pipeline.library.search.query_faces); "" for a stored face
    faces_found_by: str = ""

    @property
    def primary_face(self) -> QueryFace | None:
        return self.faces[self.primary] if self.primary is not None else None

    @property
    def best_person(self) -> PersonMatch | None:
        """Who the photo's main face is (None: nobody enrolled reaches the threshold, or no
        searchable face). Bystanders never decide it."""
        face = self.primary_face
        return face.decision if face is not None else None


@dataclass(frozen=True)
class PersonSummary:
    identity_id: int
    name: str
    face_count: int
    cover_face_id: int | None
