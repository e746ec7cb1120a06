"""Initial schema: providers, connections, append-only audit events.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_url", sa.Text, nullable=False),
        sa.Column("revocation_url", sa.Text),
        sa.Column("authorization_url", sa.Text),
        sa.Column("scopes", sa.Text),
        sa.Column("auth_method", sa.String(32), nullable=False),
        sa.Column("client_id", sa.Text, nullable=False),
        sa.Column("client_secret_ct", sa.Text, nullable=False),
        sa.Column("default_access_ttl", sa.Integer),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("name", name="uq_providers_name"),
    )
    op.create_table(
        "connections",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("provider_id", sa.String(36), nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("access_token_ct", sa.Text),
        sa.Column("refresh_token_ct", sa.Text),
        sa.Column("access_expires_at", TZ),
        sa.Column("access_issued_at", TZ),
        sa.Column("refresh_issued_at", TZ),
        sa.Column("last_refresh_at", TZ),
        sa.Column("refresh_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("failure_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error_class", sa.String(64)),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.UniqueConstraint("provider_id", "account", name="uq_connections_provider_id_account"),
        sa.CheckConstraint(
            "status IN ('active', 'reauth_required', 'revoked')", name="ck_connections_status"
        ),
    )
    op.create_index(
        "ix_connections_due",
        "connections",
        ["access_expires_at"],
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", TZ, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("connection_id", sa.String(36)),
        sa.Column("provider", sa.String(100)),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("version", sa.BigInteger),
        sa.Column("details", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_events_connection_at", "audit_events", ["connection_id", "at"])
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    _forbid_audit_updates()


def _forbid_audit_updates() -> None:
    """History is never rewritten: an UPDATE of an audit row fails in the database itself."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION grantkeeper_audit_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'audit_events is append-only';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events"
            " FOR EACH ROW EXECUTE FUNCTION grantkeeper_audit_append_only()"
        )
    else:
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE ON audit_events"
            " BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS grantkeeper_audit_append_only()")
    op.drop_table("audit_events")
    op.drop_table("connections")
    op.drop_table("providers")
