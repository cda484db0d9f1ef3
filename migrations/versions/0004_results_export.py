"""results export: export attempt numbers, classification findings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

- ``exports.attempt``: the attempt number within an export round of one destination.
- ``findings.kind`` (segment or classification) and ``findings.threshold``; findings are
  unique per job, kind and number (a classification job numbers its outputs 1.. too).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="segment")
        )
        batch_op.add_column(sa.Column("threshold", sa.Float(), nullable=True))
        batch_op.drop_constraint("uq_findings_job_id", type_="unique")
        batch_op.create_unique_constraint(
            "uq_findings_job_kind_number", ["job_id", "kind", "segment_number"]
        )


def downgrade() -> None:
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_constraint("uq_findings_job_kind_number", type_="unique")
        batch_op.create_unique_constraint("uq_findings_job_id", ["job_id", "segment_number"])
        batch_op.drop_column("threshold")
        batch_op.drop_column("kind")
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_column("attempt")
