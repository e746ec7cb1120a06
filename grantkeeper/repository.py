"""Every SQL statement grantkeeper runs. Functions take an open SQLAlchemy connection; the
caller owns the transaction (services never commit, the unit-of-work scope does).

All token writes are fenced: ``UPDATE ... WHERE id = :id AND version = :expected``. A stale
lock holder's write matches no row and is refused instead of overwriting a newer token.
Key rotation is the one exception, on purpose: it re-encrypts with a compare-and-swap on
the ciphertext itself and leaves the version alone (see "key rotation" below).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Row,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    union_all,
    update,
)

from grantkeeper.models import (
    ACTIVE,
    REAUTH_REQUIRED,
    audit_events,
    connections,
    pending_revocations,
    providers,
)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything grantkeeper stores is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ProviderRecord:
    id: str
    name: str
    token_url: str
    revocation_url: str | None
    authorization_url: str | None
    scopes: str | None
    auth_method: str
    client_id: str
    client_secret_ct: str
    default_access_ttl: int | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> ProviderRecord:
        m = row._mapping
        return cls(**{f: m[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ConnectionRecord:
    id: str
    provider_id: str
    account: str
    status: str
    version: int
    access_token_ct: str | None
    refresh_token_ct: str | None
    access_expires_at: datetime | None
    access_issued_at: datetime | None
    refresh_issued_at: datetime | None
    last_refresh_at: datetime | None
    refresh_count: int
    failure_count: int
    last_error_class: str | None
    created_at: datetime
    updated_at: datetime
    rotation_checked_at: datetime | None
    next_attempt_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> ConnectionRecord:
        m = row._mapping
        values = {f: m[f] for f in cls.__dataclass_fields__}
        for f in (
            "access_expires_at",
            "access_issued_at",
            "refresh_issued_at",
            "last_refresh_at",
            "rotation_checked_at",
            "next_attempt_at",
        ):
            values[f] = _utc(values[f])
        values["created_at"] = _utc(values["created_at"])
        values["updated_at"] = _utc(values["updated_at"])
        return cls(**values)


# -- providers ---------------------------------------------------------------------------------


def insert_provider(conn: Connection, values: Mapping[str, Any]) -> None:
    conn.execute(insert(providers).values(**values))


def get_provider(conn: Connection, provider_id: str) -> ProviderRecord | None:
    row = conn.execute(select(providers).where(providers.c.id == provider_id)).first()
    return ProviderRecord.from_row(row) if row else None


def get_provider_by_name(conn: Connection, name: str) -> ProviderRecord | None:
    row = conn.execute(select(providers).where(providers.c.name == name)).first()
    return ProviderRecord.from_row(row) if row else None


def list_providers(conn: Connection) -> list[ProviderRecord]:
    rows = conn.execute(select(providers).order_by(providers.c.name))
    return [ProviderRecord.from_row(r) for r in rows]


def delete_provider(conn: Connection, provider_id: str) -> None:
    conn.execute(providers.delete().where(providers.c.id == provider_id))


def update_provider_secret(conn: Connection, provider_id: str, client_secret_ct: str) -> bool:
    """Replace a provider's encrypted client secret (a rotation at the provider)."""
    result = conn.execute(
        update(providers)
        .where(providers.c.id == provider_id)
        .values(client_secret_ct=client_secret_ct)
    )
    return result.rowcount == 1


# -- connections -------------------------------------------------------------------------------


def insert_connection(conn: Connection, values: Mapping[str, Any]) -> None:
    conn.execute(insert(connections).values(**values))


def get_connection(conn: Connection, connection_id: str) -> ConnectionRecord | None:
    row = conn.execute(select(connections).where(connections.c.id == connection_id)).first()
    return ConnectionRecord.from_row(row) if row else None


# Built once: the refresh path runs it twice per refresh, and building a SELECT of 29 labelled
# columns costs more than PostgreSQL takes to answer it.
_CONNECTION_WITH_PROVIDER = (
    select(
        connections,
        *[providers.c[f].label(f"provider__{f}") for f in ProviderRecord.__dataclass_fields__],
    )
    .select_from(connections.outerjoin(providers, providers.c.id == connections.c.provider_id))
    .where(connections.c.id == bindparam("connection_id"))
)


def get_connection_with_provider(
    conn: Connection, connection_id: str
) -> tuple[ConnectionRecord, ProviderRecord | None] | None:
    """A connection and its provider in one round trip: the refresh path reads both twice
    (before and under the lock), and each statement is a round trip to the database."""
    row = conn.execute(_CONNECTION_WITH_PROVIDER, {"connection_id": connection_id}).first()
    if row is None:
        return None
    m = row._mapping
    provider = None
    if m["provider__id"] is not None:
        provider = ProviderRecord(
            **{f: m[f"provider__{f}"] for f in ProviderRecord.__dataclass_fields__}
        )
    return ConnectionRecord.from_row(row), provider


def find_connection(conn: Connection, provider_id: str, account: str) -> ConnectionRecord | None:
    row = conn.execute(
        select(connections).where(
            connections.c.provider_id == provider_id, connections.c.account == account
        )
    ).first()
    return ConnectionRecord.from_row(row) if row else None


def list_connections(
    conn: Connection, *, provider_id: str | None = None, limit: int | None = None
) -> list[ConnectionRecord]:
    query = select(connections).order_by(connections.c.created_at, connections.c.id)
    if provider_id is not None:
        query = query.where(connections.c.provider_id == provider_id)
    if limit is not None:
        query = query.limit(limit)
    return [ConnectionRecord.from_row(r) for r in conn.execute(query)]


def delete_connections_of_provider(conn: Connection, provider_id: str) -> int:
    result = conn.execute(connections.delete().where(connections.c.provider_id == provider_id))
    return result.rowcount


def due_connection_ids(
    conn: Connection, due_before: datetime, limit: int, now: datetime
) -> list[str]:
    """Active connections whose access token expires before ``due_before``, soonest first,
    leaving out those backing off after a transient failure until ``next_attempt_at``.

    Served by the partial index ``ix_connections_due`` (migration 0005: it also carries ``id``
    and ``next_attempt_at``, so PostgreSQL answers from the index alone, in expiry order, and
    stops at ``limit``): cost grows with the rows due, not with the table. The status is
    written into the SQL as a literal, not a bound parameter: only then can a *generic* plan
    (a statement psycopg has prepared after five runs) prove the index predicate
    ``status = 'active'``; with ``status = $1`` it falls back to a sequential scan.
    """
    rows = conn.execute(
        select(connections.c.id)
        .where(
            connections.c.status == bindparam("due_status", ACTIVE, literal_execute=True),
            connections.c.access_expires_at <= due_before,
            (connections.c.next_attempt_at.is_(None)) | (connections.c.next_attempt_at <= now),
        )
        .order_by(connections.c.access_expires_at)
        .limit(limit)
    )
    return [r.id for r in rows]


def rotation_candidates(conn: Connection, cutoff: datetime, limit: int) -> list[str]:
    """Active connections whose refresh token was issued before ``cutoff`` and that the
    rotation has not already tried since then (providers that do not rotate keep old tokens)."""
    rows = conn.execute(
        select(connections.c.id)
        .where(
            connections.c.status == ACTIVE,
            connections.c.refresh_issued_at < cutoff,
            (connections.c.rotation_checked_at.is_(None))
            | (connections.c.rotation_checked_at < cutoff),
        )
        .order_by(connections.c.refresh_issued_at)
        .limit(limit)
    )
    return [r.id for r in rows]


# Built once; the columns to SET come from the execution parameters (SQLAlchemy compiles,
# and caches, one statement per set of column names).
_FENCED_UPDATE = (
    update(connections)
    .where(
        connections.c.id == bindparam("fence_id"),
        connections.c.version == bindparam("fence_version"),
    )
    .values(version=connections.c.version + 1)
)


def fenced_update(
    conn: Connection, connection_id: str, expected_version: int, values: Mapping[str, Any]
) -> bool:
    """Apply ``values`` and bump the version, only if nobody wrote since ``expected_version``."""
    if "version" in values:
        raise ValueError("the fence bumps the version itself")
    result = conn.execute(
        _FENCED_UPDATE, {**values, "fence_id": connection_id, "fence_version": expected_version}
    )
    return result.rowcount == 1


def record_failure(
    conn: Connection,
    connection_id: str,
    expected_version: int,
    *,
    error_class: str,
    new_status: str | None,
    now: datetime,
    next_attempt_at: datetime | None = None,
) -> bool:
    """Count a failed refresh. Tokens are never touched: a failure loses nothing."""
    values: dict[str, Any] = {
        "failure_count": connections.c.failure_count + 1,
        "last_error_class": error_class,
        "updated_at": now,
        "next_attempt_at": next_attempt_at,
    }
    if new_status is not None:
        values["status"] = new_status
        values["version"] = connections.c.version + 1
    result = conn.execute(
        update(connections)
        .where(connections.c.id == connection_id, connections.c.version == expected_version)
        .values(**values)
    )
    return result.rowcount == 1


def reauthorize_connection(
    conn: Connection,
    connection_id: str,
    expected_version: int,
    *,
    access_token_ct: str,
    refresh_token_ct: str,
    access_expires_at: datetime,
    now: datetime,
) -> bool:
    """Store a freshly authorized token pair and make the connection active again, fenced
    like a refresh: the version read under the connection's lock, bumped by the write."""
    return fenced_update(
        conn,
        connection_id,
        expected_version,
        {
            "status": ACTIVE,
            "access_token_ct": access_token_ct,
            "refresh_token_ct": refresh_token_ct,
            "access_expires_at": access_expires_at,
            "access_issued_at": now,
            "refresh_issued_at": now,
            "failure_count": 0,
            "last_error_class": None,
            "updated_at": now,
        },
    )


def reactivate(conn: Connection, connection_id: str, expected_version: int, now: datetime) -> bool:
    """Back from reauth_required with the stored tokens (fenced): for grants that were never
    dead, e.g. refused because the client secret was wrong at the time."""
    result = conn.execute(
        update(connections)
        .where(
            connections.c.id == connection_id,
            connections.c.version == expected_version,
            connections.c.status == REAUTH_REQUIRED,
            connections.c.refresh_token_ct.is_not(None),
        )
        .values(
            status=ACTIVE,
            version=connections.c.version + 1,
            failure_count=0,
            last_error_class=None,
            next_attempt_at=None,
            updated_at=now,
        )
    )
    return result.rowcount == 1


def count_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(
        select(connections.c.status, func.count()).group_by(connections.c.status)
    ).all()
    return {str(status): int(count) for status, count in rows}


# -- monitoring (grantkeeper status, metrics) --------------------------------------------------


def soonest_active_expiry(conn: Connection) -> datetime | None:
    """The earliest access-token expiry of an active connection (served by the partial index
    ``ix_connections_due``); None when no active connection has one."""
    value = conn.execute(
        select(func.min(connections.c.access_expires_at)).where(connections.c.status == ACTIVE)
    ).scalar_one()
    return _utc(value)


@dataclass(frozen=True)
class ConnectionHealth:
    """What ``grantkeeper status`` shows of a connection: no ciphertext."""

    id: str
    provider: str | None
    account: str
    status: str
    access_expires_at: datetime | None
    next_attempt_at: datetime | None
    failure_count: int
    last_error_class: str | None


def _health_select(*where: ColumnElement[bool]) -> Any:
    return (
        select(
            connections.c.id,
            providers.c.name.label("provider"),
            connections.c.account,
            connections.c.status,
            connections.c.access_expires_at,
            connections.c.next_attempt_at,
            connections.c.failure_count,
            connections.c.last_error_class,
        )
        .select_from(connections.outerjoin(providers, providers.c.id == connections.c.provider_id))
        .where(*where)
    )


def _health(rows: Any) -> list[ConnectionHealth]:
    return [
        ConnectionHealth(
            id=r.id,
            provider=r.provider,
            account=r.account,
            status=r.status,
            access_expires_at=_utc(r.access_expires_at),
            next_attempt_at=_utc(r.next_attempt_at),
            failure_count=int(r.failure_count),
            last_error_class=r.last_error_class,
        )
        for r in rows
    ]


def due_connection_health(
    conn: Connection, due_before: datetime, limit: int
) -> list[ConnectionHealth]:
    """Active connections whose access token expires before ``due_before``, soonest first,
    including those backing off (unlike :func:`due_connection_ids`)."""
    query = _health_select(
        connections.c.status == ACTIVE, connections.c.access_expires_at <= due_before
    )
    return _health(conn.execute(query.order_by(connections.c.access_expires_at).limit(limit)))


def connection_health_by_status(
    conn: Connection, status: str, *, min_failures: int, limit: int
) -> list[ConnectionHealth]:
    """Connections with ``status`` and at least ``min_failures`` failures; most failures
    first."""
    query = _health_select(
        connections.c.status == status, connections.c.failure_count >= min_failures
    )
    ordered = query.order_by(connections.c.failure_count.desc(), connections.c.id).limit(limit)
    return _health(conn.execute(ordered))


def attention_counts(conn: Connection, now: datetime, max_retries: int) -> dict[str, int]:
    """Exact counts over active connections: ``failing`` (failure_count > 0),
    ``retries_exhausted`` (failure_count >= max_retries) and ``overdue`` (token expired)."""

    def flag(condition: ColumnElement[bool]) -> ColumnElement[Any]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    row = conn.execute(
        select(
            flag(connections.c.failure_count > 0).label("failing"),
            flag(
                and_(connections.c.failure_count > 0, connections.c.failure_count >= max_retries)
            ).label("retries_exhausted"),
            flag(connections.c.access_expires_at <= now).label("overdue"),
        ).where(connections.c.status == ACTIVE)
    ).one()
    return {
        "failing": int(row.failing),
        "retries_exhausted": int(row.retries_exhausted),
        "overdue": int(row.overdue),
    }


def latest_audit_event(conn: Connection, event: str, since: datetime) -> dict[str, Any] | None:
    """The newest audit row named ``event`` at or after ``since`` (bounded by ``since``, so
    it reads the ``at`` index, never the whole trail)."""
    row = conn.execute(
        select(audit_events)
        .where(audit_events.c.event == event, audit_events.c.at >= since)
        .order_by(audit_events.c.at.desc(), audit_events.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    item = dict(row._mapping)
    item["at"] = _utc(item["at"])
    return item


# -- key rotation ------------------------------------------------------------------------------
# Re-encryption writes are a compare-and-swap on the ciphertext itself:
#     UPDATE t SET col = :new WHERE id = :id AND col = :old
# and never touch ``connections.version``. A refresh in flight holds its lock and will write
# ``WHERE version = :seen``; bumping the version under it would refuse that write and lose the
# refresh token the provider just rotated. A swap that matches no row means someone (a refresh,
# a revocation) wrote a newer ciphertext first: there is nothing left to re-encrypt.

# Every ciphertext column. (table, column) is also what each ciphertext's associated data binds
# (grantkeeper.sealing), so these names say how to open and re-seal it.
CIPHERTEXT_COLUMNS: dict[tuple[str, str], Column[Any]] = {
    ("connections", "access_token_ct"): connections.c.access_token_ct,
    ("connections", "refresh_token_ct"): connections.c.refresh_token_ct,
    ("providers", "client_secret_ct"): providers.c.client_secret_ct,
    ("pending_revocations", "token_ct"): pending_revocations.c.token_ct,
}
# Per table: the columns that name, in a report, whose ciphertext a row holds.
_REENCRYPT_CONTEXT: dict[str, tuple[Table, str | None, str | None]] = {
    # table: (table, connection id column, provider name column)
    "connections": (connections, "id", None),
    "providers": (providers, None, "name"),
    "pending_revocations": (pending_revocations, "connection_id", None),
}


@dataclass(frozen=True)
class SealedRow:
    """One row's ciphertexts that are not under the primary key (by column name)."""

    table: str
    id: str
    ciphertexts: dict[str, str]
    connection_id: str | None
    provider: str | None


def _key_id_sql(conn: Connection, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The key id a ``gk1.<kid>.<data>`` ciphertext names, computed by the database."""
    if conn.dialect.name == "postgresql":
        return func.split_part(column, ".", 2)
    # SQLite has no split_part: the text between the first and the second dot ('' if none).
    rest = func.substr(column, func.instr(column, ".") + 1)
    second_dot = func.instr(rest, ".")
    return case((second_dot > 0, func.substr(rest, 1, second_dot - 1)), else_="")


def count_ciphertexts_by_key(conn: Connection) -> list[tuple[str, str, str, int]]:
    """``(table, column, key id, count)`` for every ciphertext column: one grouped query, no
    ciphertext leaves the database."""
    parts = [
        select(
            # Constants from CIPHERTEXT_COLUMNS, never input: safe to inline.
            literal_column(f"'{table}'").label("tbl"),
            literal_column(f"'{name}'").label("col"),
            _key_id_sql(conn, column).label("key_id"),
        ).where(column.is_not(None))
        for (table, name), column in CIPHERTEXT_COLUMNS.items()
    ]
    sealed = union_all(*parts).subquery("sealed")
    rows = conn.execute(
        select(sealed.c.tbl, sealed.c.col, sealed.c.key_id, func.count())
        .group_by(sealed.c.tbl, sealed.c.col, sealed.c.key_id)
        .order_by(sealed.c.tbl, sealed.c.col, sealed.c.key_id)
    )
    return [(str(t), str(c), str(k or ""), int(n)) for t, c, k, n in rows]


def _not_under(column: ColumnElement[Any], primary_prefix: str) -> ColumnElement[bool]:
    return and_(column.is_not(None), func.substr(column, 1, len(primary_prefix)) != primary_prefix)


def rows_to_reencrypt(
    conn: Connection, table: str, primary_prefix: str, after_id: str | None, limit: int
) -> list[SealedRow]:
    """The next ``limit`` rows of ``table`` (by id, after ``after_id``: keyset pagination) with
    a ciphertext that does not start with ``primary_prefix`` (``gk1.<primary>.``)."""
    source, connection_column, provider_column = _REENCRYPT_CONTEXT[table]
    sealed = [name for (t, name) in CIPHERTEXT_COLUMNS if t == table]
    columns = [source.c.id, *(source.c[name] for name in sealed)]
    for extra in (connection_column, provider_column):
        if extra is not None and extra != "id":
            columns.append(source.c[extra])
    query = (
        select(*columns)
        .where(or_(*(_not_under(source.c[name], primary_prefix) for name in sealed)))
        .order_by(source.c.id)
        .limit(limit)
    )
    if after_id is not None:
        query = query.where(source.c.id > after_id)
    out = []
    for row in conn.execute(query):
        m = row._mapping
        out.append(
            SealedRow(
                table=table,
                id=str(m["id"]),
                ciphertexts={
                    name: str(m[name])
                    for name in sealed
                    if m[name] is not None and not str(m[name]).startswith(primary_prefix)
                },
                connection_id=str(m[connection_column]) if connection_column else None,
                provider=str(m[provider_column]) if provider_column else None,
            )
        )
    return out


def swap_ciphertexts(
    conn: Connection, table: str, column: str, swaps: Sequence[tuple[str, str, str]]
) -> int:
    """Compare-and-swap ``(id, old, new)`` triples in one executemany (pipelined by psycopg 3).
    Only rows whose ``column`` still holds ``old`` change; the version is left alone. Returns
    how many rows changed."""
    if not swaps:
        return 0
    target = CIPHERTEXT_COLUMNS[(table, column)]
    source = _REENCRYPT_CONTEXT[table][0]
    result = conn.execute(
        update(source)
        .where(source.c.id == bindparam("cas_id"), target == bindparam("cas_old"))
        .values({column: bindparam("cas_new")}),
        [{"cas_id": i, "cas_old": old, "cas_new": new} for i, old, new in swaps],
    )
    return int(result.rowcount)


@dataclass(frozen=True)
class RowSwap:
    """The compare-and-swaps of one row: column -> (old ciphertext, new ciphertext)."""

    id: str
    columns: Mapping[str, tuple[str, str]]


def swap_row_ciphertexts(conn: Connection, table: str, swaps: Sequence[RowSwap]) -> dict[str, int]:
    """Compare-and-swap every column of a batch of rows; returns, per column, how many
    ciphertexts changed. Each column of each row changes only if it still holds its ``old``
    value, and the version is left alone: the same semantics as :func:`swap_ciphertexts`.

    On PostgreSQL this is one statement per batch: the batch travels as arrays (``unnest``), one
    ``UPDATE ... FROM`` joins it on the primary key and swaps each column with
    ``CASE WHEN col = old THEN new ELSE col END``, skipping rows where no column matches, and
    ``RETURNING`` counts the columns that took their new value. Elsewhere (SQLite): one
    executemany per column."""
    if not swaps:
        return {}
    sealed = [name for (t, name) in CIPHERTEXT_COLUMNS if t == table]
    if conn.dialect.name != "postgresql":
        written: dict[str, int] = {}
        for column in sealed:
            items = [(s.id, *s.columns[column]) for s in swaps if column in s.columns]
            if items:
                written[column] = swap_ciphertexts(conn, table, column, items)
        return written
    quote = conn.dialect.identifier_preparer.quote
    cols = [quote(c) for c in sealed]
    olds, news = [f"o{i}" for i in range(len(cols))], [f"n{i}" for i in range(len(cols))]
    arrays = ", ".join(f"CAST(:{name} AS text[])" for name in ["id", *olds, *news])
    sets = ", ".join(
        f"{c} = CASE WHEN t.{c} = v.{o} THEN v.{n} ELSE t.{c} END"
        for c, o, n in zip(cols, olds, news, strict=True)
    )
    matches = " OR ".join(f"t.{c} = v.{o}" for c, o in zip(cols, olds, strict=True))
    returned = ", ".join(
        f"t.{c} = v.{n} AS w{i}" for i, (c, n) in enumerate(zip(cols, news, strict=True))
    )
    counts = ", ".join(f"count(*) FILTER (WHERE w{i})" for i in range(len(cols)))
    # Identifiers are the constants of CIPHERTEXT_COLUMNS, quoted; every value is a parameter.
    statement = (
        f"WITH v (id, {', '.join(olds)}, {', '.join(news)}) AS (SELECT * FROM unnest({arrays})),"  # noqa: S608
        f" w AS (UPDATE {quote(table)} AS t SET {sets} FROM v"
        f" WHERE t.id = v.id AND ({matches}) RETURNING {returned})"
        f" SELECT {counts} FROM w"
    )
    params = {"id": _text_array([s.id for s in swaps])}
    for column, o, n in zip(sealed, olds, news, strict=True):
        pairs = [s.columns.get(column) for s in swaps]
        params[o] = _text_array([p[0] if p else None for p in pairs])
        params[n] = _text_array([p[1] if p else None for p in pairs])
    # Losing the last batches in a server crash costs nothing: their rows are still under the
    # old key, which still decrypts them, and the next run re-encrypts them. So this
    # transaction does not wait for its WAL flush.
    conn.execute(text("SET LOCAL synchronous_commit = off"))
    row = conn.execute(text(statement), params).one()
    return {column: int(row[i]) for i, column in enumerate(sealed)}


def _text_array(values: Sequence[str | None]) -> str:
    """A PostgreSQL text[] literal: every element quoted (backslash and double quote escaped),
    ``NULL`` for None. Thousands of values travel as one string parameter, which the server
    parses in C, instead of being adapted one by one by the driver."""
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


# -- audit -------------------------------------------------------------------------------------


def insert_audit_events(conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
    if events:
        # inline(): no RETURNING id, which would need SELECT on audit_events; the app role
        # (grantkeeper db roles) may only INSERT there.
        conn.execute(insert(audit_events).inline(), list(events))


def latest_audit_id(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(audit_events.c.id), 0))).scalar_one())


def prune_audit_events(conn: Connection, before: datetime) -> int:
    """Retention: the only statement that deletes audit rows, run by the retention task.

    On PostgreSQL it goes through ``grantkeeper_prune_audit`` (migration 0004), a SECURITY
    DEFINER function of the migration role: the worker role has no DELETE on audit_events,
    and the function keeps at least 30 days whatever it is asked."""
    if conn.dialect.name == "postgresql":
        return int(conn.execute(select(func.grantkeeper_prune_audit(before))).scalar_one())
    result = conn.execute(audit_events.delete().where(audit_events.c.at < before))
    return int(result.rowcount)


def list_audit_events(
    conn: Connection,
    *,
    connection_id: str | None = None,
    event: str | None = None,
    since: datetime | None = None,
    after_id: int | None = None,
    limit: int = 1000,
    newest: bool = False,
) -> list[dict[str, Any]]:
    """Matching events, oldest first: the first ``limit`` of them, or with ``newest`` the
    last ``limit`` (what an operator asking "what happened lately?" wants)."""
    order = audit_events.c.id.desc() if newest else audit_events.c.id
    query = select(audit_events).order_by(order).limit(limit)
    if connection_id is not None:
        query = query.where(audit_events.c.connection_id == connection_id)
    if event is not None:
        query = query.where(audit_events.c.event.like(event.replace("*", "%")))
    if since is not None:
        query = query.where(audit_events.c.at >= since)
    if after_id is not None:
        query = query.where(audit_events.c.id > after_id)
    out = []
    for row in conn.execute(query):
        item = dict(row._mapping)
        item["at"] = _utc(item["at"])
        out.append(item)
    return out[::-1] if newest else out


# -- revocation --------------------------------------------------------------------------------


def destroy_tokens(
    conn: Connection, connection_id: str, expected_version: int, *, status: str, now: datetime
) -> bool:
    """Forget a connection's tokens (fenced): the only delete of a token grantkeeper does, and
    only on an operator's or a revocation's explicit request, never on a failure."""
    return fenced_update(
        conn,
        connection_id,
        expected_version,
        {
            "access_token_ct": None,
            "refresh_token_ct": None,
            "access_expires_at": None,
            "status": status,
            "updated_at": now,
        },
    )


def insert_pending_revocations(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
        conn.execute(insert(pending_revocations), list(rows))


def due_pending_revocations(conn: Connection, now: datetime, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(pending_revocations)
        .where(pending_revocations.c.next_attempt_at <= now)
        .order_by(pending_revocations.c.next_attempt_at)
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


def delete_pending_revocation(conn: Connection, pending_id: str) -> None:
    conn.execute(pending_revocations.delete().where(pending_revocations.c.id == pending_id))


def postpone_pending_revocation(
    conn: Connection, pending_id: str, *, next_attempt_at: datetime, error: str
) -> None:
    conn.execute(
        update(pending_revocations)
        .where(pending_revocations.c.id == pending_id)
        .values(
            attempts=pending_revocations.c.attempts + 1,
            next_attempt_at=next_attempt_at,
            last_error=error[:200],
        )
    )


def count_pending_revocations(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(pending_revocations)).scalar_one())


def connection_ids(
    conn: Connection, *, provider_id: str | None = None, exclude_status: str | None = None
) -> list[str]:
    query = select(connections.c.id).order_by(connections.c.id)
    if provider_id is not None:
        query = query.where(connections.c.provider_id == provider_id)
    if exclude_status is not None:
        query = query.where(connections.c.status != exclude_status)
    return [r.id for r in conn.execute(query)]


def ids_without_status(conn: Connection, ids: Sequence[str], status: str) -> list[str]:
    """Those of ``ids`` whose status is not ``status``."""
    left: list[str] = []
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        left.extend(
            conn.execute(
                select(connections.c.id).where(
                    connections.c.id.in_(chunk), connections.c.status != status
                )
            ).scalars()
        )
    return left


def count_with_status(conn: Connection, ids: Sequence[str], status: str) -> int:
    total = 0
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        total += int(
            conn.execute(
                select(func.count()).where(
                    connections.c.id.in_(chunk), connections.c.status == status
                )
            ).scalar_one()
        )
    return total
