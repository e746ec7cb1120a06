"""Rotation bookkeeping and provider revocations that still have to be retried.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    # When the monthly rotation last forced a refresh of this connection; lets a run that was
    # killed resume without refreshing anything twice, even for providers that do not rotate.
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("rotation_checked_at", TZ))
    # A token whose revocation at the provider failed: kept encrypted (bound to this row) only
    # until the provider confirms, then deleted. The connection itself holds no token anymore.
    op.create_table(
        "pending_revocations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("connection_id", sa.String(36), nullable=False),
        sa.Column("provider_id", sa.String(36), nullable=False),
        sa.Column("token_ct", sa.Text, nullable=False),
        sa.Column("token_type_hint", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.String(200)),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("next_attempt_at", TZ, nullable=False),
    )
    op.create_index("ix_pending_revocations_next", "pending_revocations", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_pending_revocations_next", "pending_revocations")
    op.drop_table("pending_revocations")
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("rotation_checked_at")
