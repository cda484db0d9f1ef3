"""listener: second copies of instances kept by the keep-both duplicates policy

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_copies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_instance_copies_instance_id_instances"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_copies")),
        sa.UniqueConstraint("path", name=op.f("uq_instance_copies_path")),
    )
    with op.batch_alter_table("instance_copies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instance_copies_instance_id"), ["instance_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("instance_copies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_copies_instance_id"))
    op.drop_table("instance_copies")
