"""face_attributes: emotion, age and gender per face, per attribute-model version

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

One row per (face, attribute-model version), like ``embeddings``: switching the
attribute models adds rows for the new version and keeps the old ones. Deleting a face
deletes its rows in the database itself (ON DELETE CASCADE). ``emotion`` is indexed
because Search and People filter on it.

Plain ``sa`` types only (see 0001): migrations never import application code.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "face_attributes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("face_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("emotion", sa.String(length=16), nullable=True),
        sa.Column("emotion_confidence", sa.Float(), nullable=True),
        sa.Column("emotion_probs", sa.JSON(), nullable=True),
        sa.Column("age", sa.Float(), nullable=True),
        sa.Column("gender", sa.String(length=8), nullable=True),
        sa.Column("gender_confidence", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["face_id"], ["faces.id"], name=op.f("fk_face_attributes_face_id_faces"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_face_attributes")),
        sa.UniqueConstraint("face_id", "model_version", name=op.f("uq_face_attributes_face_id_model_version")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_face_attributes_model_version"), "face_attributes", ["model_version"])
    op.create_index(op.f("ix_face_attributes_emotion"), "face_attributes", ["emotion"])


def downgrade() -> None:
    op.drop_index(op.f("ix_face_attributes_emotion"), table_name="face_attributes")
    op.drop_index(op.f("ix_face_attributes_model_version"), table_name="face_attributes")
    op.drop_table("face_attributes")
