"""segment components: connected component count, largest component, volume threshold

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

- ``findings.component_count``: a segment's connected components that count (at least the
  model card's ``min_component_mm3``);
- ``findings.largest_component_mm3``: the volume of the largest of them;
- ``findings.min_volume_mm3``: the card's volume threshold the segment was detected against.

All three are empty for classification outputs and for rows written before this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("component_count", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("largest_component_mm3", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("min_volume_mm3", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_column("min_volume_mm3")
        batch_op.drop_column("largest_component_mm3")
        batch_op.drop_column("component_count")
