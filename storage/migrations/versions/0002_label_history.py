"""label history: one row per labeling save or undo (box snapshots before and after)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Plain ``sa`` types only (see 0001): migrations never import application code.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "label_revisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("image_version", sa.Integer(), nullable=False),
        sa.Column("status_before", sa.String(length=16), nullable=False),
        sa.Column("status_after", sa.String(length=16), nullable=False),
        sa.Column("boxes_before", sa.JSON(), nullable=False),
        sa.Column("boxes_after", sa.JSON(), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=True),
        sa.Column("undoes", sa.Integer(), nullable=True),
        sa.CheckConstraint("revision > 0", name=op.f("ck_label_revisions_revision_positive")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_label_revisions_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_label_revisions")),
        sa.UniqueConstraint("image_id", "revision", name=op.f("uq_label_revisions_image_id_revision")),
    )
    op.create_index(op.f("ix_label_revisions_image_id"), "label_revisions", ["image_id"])


def downgrade() -> None:
    op.drop_table("label_revisions")
