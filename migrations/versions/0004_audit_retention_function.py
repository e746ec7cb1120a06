"""Audit retention through a SECURITY DEFINER function of the migration role.

The worker role has no DELETE on ``audit_events`` (``grantkeeper db roles``): retention
deletes through ``grantkeeper_prune_audit(before)``, which runs with its owner's rights and
refuses to delete anything younger than MIN_RETENTION_DAYS, whatever the caller asks. So a
leaked worker password cannot erase the recent audit trail. EXECUTE is granted to the worker
role by ``grantkeeper db roles``, to nobody else.

SQLite has no roles: retention deletes directly there, and this revision does nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MIN_RETENTION_DAYS = 30


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    schema = bind.dialect.identifier_preparer.quote(
        bind.execute(sa.text("SELECT current_schema()")).scalar_one()
    )
    message = (
        f"grantkeeper_prune_audit keeps at least {MIN_RETENTION_DAYS} days of audit history;"
        " asked to delete rows before %"
    )
    # search_path pinned: a SECURITY DEFINER function must not resolve names through a
    # caller's search_path (CVE-2007-2138 class); the table is schema-qualified.
    op.execute(
        f"""
        CREATE FUNCTION {schema}.grantkeeper_prune_audit(before timestamptz) RETURNS bigint
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $$
        DECLARE
            removed bigint;
        BEGIN
            IF before IS NULL OR before > now() - interval '{MIN_RETENTION_DAYS} days' THEN
                RAISE EXCEPTION '{message}', before USING ERRCODE = 'invalid_parameter_value';
            END IF;
            DELETE FROM {schema}.audit_events WHERE at < before;
            GET DIAGNOSTICS removed = ROW_COUNT;
            RETURN removed;
        END
        $$
        """  # noqa: S608 - the schema is current_schema(), quoted by the dialect
    )
    op.execute(f"REVOKE ALL ON FUNCTION {schema}.grantkeeper_prune_audit(timestamptz) FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS grantkeeper_prune_audit(timestamptz)")
