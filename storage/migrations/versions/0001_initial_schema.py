"""initial schema: images, identities, faces, embeddings, model_versions, audit_log

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written from ``alembic revision --autogenerate`` output and reviewed by hand: column
types are spelled with plain ``sa`` types (migrations must not import application
code, which will change after this revision is frozen); timestamps are naive UTC
(storage.orm.UTCDateTime adds the tzinfo back).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("upload_sha256", sa.String(length=64), nullable=False),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("mime", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("status", _enum("image_status", "unreviewed", "in_progress", "reviewed", "skipped"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint("size_bytes >= 0", name=op.f("ck_images_size_bytes_nonneg")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_images_positive_size")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("sha256", name=op.f("uq_images_sha256")),
    )
    op.create_index(op.f("ix_images_created_at"), "images", ["created_at"])
    op.create_index(op.f("ix_images_status"), "images", ["status"])
    op.create_index(op.f("ix_images_upload_sha256"), "images", ["upload_sha256"])

    op.create_table(
        "identities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.CheckConstraint("length(trim(name)) > 0", name=op.f("ck_identities_name_not_blank")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identities")),
        sa.UniqueConstraint("name", name=op.f("uq_identities_name")),
    )
    # case-insensitive uniqueness (expression index: SQLite >= 3.9 and PostgreSQL)
    op.create_index("uq_identities_name_lower", "identities", [sa.text("lower(name)")], unique=True)

    op.create_table(
        "faces",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("landmarks", sa.JSON(), nullable=True),
        sa.Column("origin", sa.String(length=128), nullable=False),
        sa.Column("review_status", _enum("review_status", "pending", "accepted", "rejected"), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=True),
        sa.Column("updated_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint("x2 > x1 AND y2 > y1", name=op.f("ck_faces_box_not_empty")),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["identities.id"], name=op.f("fk_faces_identity_id_identities"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_faces_image_id_images"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_faces")),
    )
    op.create_index(op.f("ix_faces_identity_id"), "faces", ["identity_id"])
    op.create_index(op.f("ix_faces_image_id"), "faces", ["image_id"])
    op.create_index(op.f("ix_faces_review_status"), "faces", ["review_status"])

    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("face_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("dim > 0", name=op.f("ck_embeddings_dim_positive")),
        sa.ForeignKeyConstraint(["face_id"], ["faces.id"], name=op.f("fk_embeddings_face_id_faces"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embeddings")),
        sa.UniqueConstraint("face_id", "model_version", name=op.f("uq_embeddings_face_id_model_version")),
    )
    op.create_index(op.f("ix_embeddings_model_version"), "embeddings", ["model_version"])

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", _enum("model_kind", "detector", "embedder"), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("file_path", sa.String(length=1024), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("kind", "name", "version", name=op.f("uq_model_versions_kind_name_version")),
    )
    # at most one active model per kind (partial unique index: SQLite >= 3.8 and PostgreSQL)
    op.create_index(
        "uq_model_versions_one_active_per_kind",
        "model_versions",
        ["kind"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index("ix_audit_log_target", "audit_log", ["target_type", "target_id"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("model_versions")
    op.drop_table("embeddings")
    op.drop_table("faces")
    op.drop_table("identities")
    op.drop_table("images")
