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
    box: tuple[float, float, float, float]
    score: float
    matches: list[Match]
    people: list[PersonMatch]


@dataclass(frozen=True)
class SearchResult:
    faces: list[QueryFace]
    threshold: float
    model_version: str

    @property
    def best_person(self) -> PersonMatch | None:
        people = [p for f in self.faces for p in f.people]
        return max(people, key=lambda p: p.similarity, default=None)


@dataclass(frozen=True)
class PersonSummary:
    identity_id: int
    name: str
    face_count: int
    cover_face_id: int | None
