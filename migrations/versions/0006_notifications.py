"""notifications: the outbox of worklist messages; the AI flag of each job

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

- ``notifications``: one row per job, notifier and event (HL7 v2 ORU, FHIR, webhook) with
  its state, attempts, last error and the time of the next attempt.
- ``jobs.ai_flag`` and ``jobs.ai_flag_reason``: the AI flag of the job's findings.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("notifier", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("response", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_notifications_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint(
            "job_id", "notifier", "event", name="uq_notifications_job_notifier"
        ),
    )
    op.create_index(
        op.f("ix_notifications_job_id"), "notifications", ["job_id"], unique=False
    )
    op.create_index(
        "ix_notifications_state_next",
        "notifications",
        ["state", "next_attempt_at"],
        unique=False,
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ai_flag", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("ai_flag_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("ai_flag_reason")
        batch_op.drop_column("ai_flag")
    op.drop_index("ix_notifications_state_next", table_name="notifications")
    op.drop_index(op.f("ix_notifications_job_id"), table_name="notifications")
    op.drop_table("notifications")
