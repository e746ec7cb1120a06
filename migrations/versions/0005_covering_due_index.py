"""The scan's partial index carries the columns the scan needs (PostgreSQL).

``ix_connections_due`` (``access_expires_at WHERE status = 'active'``) found the due rows, but
every one of them was then fetched from the table to read ``id`` and ``next_attempt_at``: on a
table larger than shared buffers those are random page reads, so the scan slowed down as the
table grew (1.5x from 100,000 to 1,000,000 connections, bench/scan_cost.py). With both columns
INCLUDEd, the scan is an index-only scan in expiry order that stops at its limit.

Rebuilt under the same name. The rebuild locks ``connections`` for as long as it takes to
index the active rows (about a second per million).

SQLite has no INCLUDE: its partial index stays as it is, and this revision does nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ACTIVE_ONLY = sa.text("status = 'active'")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_connections_due", "connections")
    op.create_index(
        "ix_connections_due",
        "connections",
        ["access_expires_at"],
        postgresql_where=ACTIVE_ONLY,
        postgresql_include=["id", "next_attempt_at"],
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_connections_due", "connections")
    op.create_index(
        "ix_connections_due", "connections", ["access_expires_at"], postgresql_where=ACTIVE_ONLY
    )
