"""ups workitems: AI jobs as Unified Procedure Steps, subscriptions and the event outbox

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

- ``ups_workitems``: workitem UID <-> job (or a client's request to process a study), with the
  state and progress last reported to subscribers;
- ``ups_subscriptions``: AE titles subscribed to one workitem or to all (empty UID);
- ``ups_events``: N-EVENT-REPORTs owed to subscribers, kept until delivered.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ups_workitems",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("requested_by", sa.String(length=16), nullable=True),
        sa.Column("attributes", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("cancel_requested_by", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_ups_workitems_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ups_workitems")),
        sa.UniqueConstraint("job_id", name=op.f("uq_ups_workitems_job_id")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_ups_workitems_sop_instance_uid")),
    )
    with op.batch_alter_table("ups_workitems", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ups_workitems_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ups_workitems_study_instance_uid"), ["study_instance_uid"], unique=False
        )
    op.create_table(
        "ups_subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("workitem_uid", sa.String(length=64), nullable=False),
        sa.Column("deletion_lock", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ups_subscriptions")),
        sa.UniqueConstraint(
            "ae_title", "workitem_uid", name=op.f("uq_ups_subscriptions_ae_title")
        ),
    )
    op.create_table(
        "ups_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workitem_uid", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("event_type", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ups_events")),
    )
    with op.batch_alter_table("ups_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ups_events_pending", ["delivered_at", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ups_events_workitem_uid"), ["workitem_uid"], unique=False
        )


def downgrade() -> None:
    op.drop_table("ups_events")
    op.drop_table("ups_subscriptions")
    op.drop_table("ups_workitems")
