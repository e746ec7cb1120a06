"""Per-connection retry schedule for transient refresh failures.

Retries are scheduled in the database, not with long Celery countdowns (a countdown beyond
the Redis broker's visibility timeout is redelivered again and again).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("next_attempt_at")
