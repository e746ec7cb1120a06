"""The operator CLI: ``grantkeeper ...``. Thin: parse, call a service, print.

Exit codes: 0 success; 1 a classified error (message on stderr); 2 usage error.
Output meant for scripts (``--json``) goes to stdout; progress and messages go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import redis
import sqlalchemy.exc
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config.logging import configure_logging, secrets_held
from config.presets import PRESETS
from config.settings import Settings, describe_validation_error, get_settings
from grantkeeper import repository
from grantkeeper.audit import cli_actor
from grantkeeper.crypto import generate_key_entry
from grantkeeper.errors import ConfigurationError, ConnectionNotFound, GrantkeeperError
from grantkeeper.runtime import Runtime, set_runtime

app = typer.Typer(help="grantkeeper: keeps OAuth 2.0 grants alive, safely.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="Encryption keys.", no_args_is_help=True)
providers_app = typer.Typer(
    help="OAuth providers (token endpoints and client credentials).", no_args_is_help=True
)
connections_app = typer.Typer(help="Connected accounts and their grants.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(providers_app, name="providers")
app.add_typer(connections_app, name="connections")

# Not a terminal (a pipe, a log): wide enough that tables keep ids and fixes on one line.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # One line, as every classified error; the inputs are never echoed (they hold secrets).
        raise ConfigurationError(
            f"invalid configuration: {describe_validation_error(exc)}"
        ) from None
    except ValueError as exc:  # e.g. pydantic-settings' SettingsError for an unreadable .env
        raise ConfigurationError(f"invalid configuration: {exc}") from None


def _runtime() -> Runtime:
    settings = _settings()
    # Audit lines go to stderr: stdout carries only the command's result (an id, a token, JSON).
    configure_logging(settings.log_level, stream=sys.stderr)
    rt = Runtime(settings, actor=cli_actor())
    rt.keyring  # noqa: B018 - a missing keyring is reported before anything else happens
    set_runtime(rt)
    return rt


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _connection_view(
    record: repository.ConnectionRecord, provider_name: str | None
) -> dict[str, Any]:
    return {
        "id": record.id,
        "provider": provider_name,
        "account": record.account,
        "status": record.status,
        "version": record.version,
        "access_expires_at": _iso(record.access_expires_at),
        "last_refresh_at": _iso(record.last_refresh_at),
        "refresh_count": record.refresh_count,
        "failure_count": record.failure_count,
        "last_error_class": record.last_error_class,
    }


# -- db ----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the latest revision."""
    from grantkeeper.db import create_db_engine, current_revision, upgrade  # noqa: PLC0415

    settings = _settings()
    engine = create_db_engine(settings)
    upgrade(engine)
    err.print(f"schema at revision {current_revision(engine)}")
    engine.dispose()


@db_app.command("roles")
def db_roles(
    migrator: Annotated[
        str, typer.Option("--migrator", help="Owns the schema; runs `db upgrade`.")
    ] = "grantkeeper_migrator",
    worker: Annotated[
        str, typer.Option("--worker", help="Worker, beat and CLI: reads and writes tokens.")
    ] = "grantkeeper_worker",
    app_role: Annotated[
        str, typer.Option("--app", help="Application code on the library API: reads tokens.")
    ] = "grantkeeper_app",
    schema: Annotated[str, typer.Option("--schema")] = "public",
) -> None:
    """Print the SQL (for a superuser) that creates least-privilege database roles."""
    from grantkeeper.roles import RoleNames, roles_sql  # noqa: PLC0415

    try:
        names = RoleNames(migrator=migrator, worker=worker, app=app_role, schema=schema)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    print(roles_sql(names), end="")
    err.print(
        "Run it as a superuser, connected to the grantkeeper database, before the first"
        f" `grantkeeper db upgrade` and again after every upgrade (which runs as {migrator})."
        " It sets no passwords: set them with psql's \\password.",
        markup=False,
        soft_wrap=True,
    )


# -- keys --------------------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate() -> None:
    """Print a new keyring entry (KEY_ID:KEY, 256 random bits) for GRANTKEEPER_ENCRYPTION_KEYS."""
    print(generate_key_entry())
    err.print(
        "Put it first in GRANTKEEPER_ENCRYPTION_KEYS (comma-separated; the first entry, or"
        " GRANTKEEPER_PRIMARY_KEY_ID, is the primary). Store it like a password."
    )


@keys_app.command("status")
def keys_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Ciphertexts per key id and kind; which keys are configured, primary, or unknown."""
    from grantkeeper.keys import KINDS, MALFORMED, key_status  # noqa: PLC0415

    status = key_status(_runtime())
    if as_json:
        print(json.dumps(status.to_json(), indent=2))
        return
    table = Table()
    table.add_column("key id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for kind in KINDS:
        table.add_column(kind.short, justify="right")
    table.add_column("total", justify="right")
    for usage in status.keys:
        state = usage.state if usage.configured else "[red]UNKNOWN[/red]"
        table.add_row(
            escape(usage.key_id),
            state,
            *(str(usage.counts.get(k.name, 0)) for k in KINDS),
            str(usage.total),
        )
    out.print(table)
    unknown = [k for k in status.unknown if k != MALFORMED]
    if unknown:
        err.print(
            f"[yellow]warning[/yellow]: ciphertexts under key id(s) {escape(', '.join(unknown))},"
            " which are not in GRANTKEEPER_ENCRYPTION_KEYS: they cannot be decrypted until that"
            " key is configured again",
            soft_wrap=True,
        )
    if MALFORMED in status.unknown:
        err.print("[yellow]warning[/yellow]: some ciphertexts are malformed", soft_wrap=True)
    if status.to_reencrypt:
        err.print(
            f"{status.to_reencrypt} ciphertext(s) are not under the primary key"
            f" {escape(status.primary_key_id)!r}: run `grantkeeper keys rotate`",
            soft_wrap=True,
        )


@keys_app.command("rotate")
def keys_rotate(
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Rows per batch (and per transaction).")
    ] = 500,
    pause: Annotated[
        float,
        typer.Option("--pause", min=0.0, help="Seconds to wait between batches, to spare the DB."),
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout.")] = False,
) -> None:
    """Re-encrypt every ciphertext that is not under the primary key. Safe while workers run."""
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from grantkeeper.keys import (  # noqa: PLC0415
        KINDS,
        RotationIncomplete,
        RotationProgress,
        reencrypt_all,
    )

    rt = _runtime()
    columns = (
        TextColumn("[bold]re-encrypting[/bold] {task.fields[table]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("rotate", total=None, table="", detail="")

        def show(p: RotationProgress) -> None:
            detail = f"{p.superseded} superseded, {p.failed} failed"
            bar.update(task, total=p.total, completed=p.done, table=p.table, detail=detail)

        report = reencrypt_all(rt, batch_size=batch_size, progress=show, pause=pause)
    kinds = ", ".join(f"{report.by_kind[k.name]} {k.label}" for k in KINDS)
    err.print(
        f"re-encrypted {report.reencrypted} ciphertext(s) under {report.primary_key_id!r}"
        f" ({kinds}) in {report.batches} batch(es), {report.elapsed_seconds:.2f} s,"
        f" {report.rows_per_second:.0f} rows/s; {report.superseded} superseded by concurrent"
        f" writes; {report.failed} failed",
        soft_wrap=True,
    )
    if report.failures:
        err.print("left unchanged (never re-saved, never dropped):")
        for failure in report.failures:
            err.print(f"  {escape(failure.describe())}", soft_wrap=True)
        if report.failed > len(report.failures):
            more = report.failed - len(report.failures)
            err.print(f"... and {more} more (audit: key.reencrypt_failed)")
    if report.left_by_others:
        err.print(
            f"[yellow]warning[/yellow]: {report.left_by_others} ciphertext(s) were written under"
            " another key while this ran: restart every process with the new primary key and"
            " run `grantkeeper keys rotate` again",
            soft_wrap=True,
        )
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    if not report.ok:
        raise RotationIncomplete(
            f"{report.failed} ciphertext(s) could not be re-encrypted and were left unchanged"
            " (listed above): configure their key again, or investigate tampering"
        )


@keys_app.command("retire")
def keys_retire(key_id: str) -> None:
    """Confirm a key is no longer needed (refused while anything uses it), then audit it."""
    from grantkeeper.keys import retire_key  # noqa: PLC0415

    result = retire_key(_runtime(), key_id)
    if not result.configured:
        err.print(f"key {key_id!r} is not in the keyring and nothing uses it.", soft_wrap=True)
    else:
        err.print(
            f"No ciphertext uses key {key_id!r}: it is safe to remove it from"
            " GRANTKEEPER_ENCRYPTION_KEYS. grantkeeper cannot do that for you: the keyring lives"
            " in the environment of every worker, beat and CLI host; edit it there and restart"
            " them. Keep a copy of the key for as long as you keep backups taken before the"
            " rotation.",
            soft_wrap=True,
        )
    if result.cache_dropped is None:
        err.print("note: Redis did not answer; cached entries under this key expire on their own")


# -- providers ---------------------------------------------------------------------------------


@providers_app.command("add")
def providers_add(
    name: str,
    client_id: Annotated[str, typer.Option("--client-id")],
    client_secret_stdin: Annotated[
        bool,
        typer.Option(
            "--client-secret-stdin",
            help="Read the client secret from stdin (never from an argument).",
        ),
    ] = False,
    preset: Annotated[
        str | None, typer.Option("--preset", help=f"One of: {', '.join(PRESETS)}")
    ] = None,
    token_url: Annotated[str | None, typer.Option("--token-url")] = None,
    revocation_url: Annotated[str | None, typer.Option("--revocation-url")] = None,
    authorization_url: Annotated[str | None, typer.Option("--authorization-url")] = None,
    scopes: Annotated[
        str | None,
        typer.Option("--scopes", help='Space-separated scopes to authorize, e.g. "a b".'),
    ] = None,
    auth_method: Annotated[
        str | None, typer.Option("--auth-method", help="client_secret_basic or client_secret_post")
    ] = None,
    default_access_ttl: Annotated[
        int | None,
        typer.Option(
            "--default-access-ttl", help="Seconds, used when a response omits expires_in."
        ),
    ] = None,
) -> None:
    """Register a provider. The client secret is read from stdin and stored encrypted."""
    from grantkeeper.connections import ProviderSpec, add_provider  # noqa: PLC0415

    if not client_secret_stdin:
        raise typer.BadParameter(
            "pass --client-secret-stdin and pipe the secret in", param_hint="--client-secret-stdin"
        )
    if (preset is None) == (token_url is None):
        raise typer.BadParameter("give exactly one of --preset or --token-url")
    secret = sys.stdin.readline().strip()
    base = PRESETS.get(preset) if preset else None
    if preset and base is None:
        raise typer.BadParameter(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = ProviderSpec(
        name=name,
        token_url=token_url or (base.token_url if base else ""),
        client_id=client_id,
        client_secret=secret,
        auth_method=auth_method or (base.auth_method if base else "client_secret_basic"),
        revocation_url=revocation_url or (base.revocation_url if base else None),
        authorization_url=authorization_url or (base.authorization_url if base else None),
        scopes=scopes or (base.scopes if base else None),
        default_access_ttl=default_access_ttl or (base.default_access_ttl if base else None),
    )
    provider_id = add_provider(_runtime(), spec)
    print(provider_id)


@providers_app.command("set-secret")
def providers_set_secret(
    name: str,
    client_secret_stdin: Annotated[
        bool,
        typer.Option(
            "--client-secret-stdin",
            help="Read the new client secret from stdin (never from an argument).",
        ),
    ] = False,
) -> None:
    """Replace a provider's client secret (rotated at the provider); stored encrypted."""
    from grantkeeper.connections import set_client_secret  # noqa: PLC0415

    if not client_secret_stdin:
        raise typer.BadParameter(
            "pass --client-secret-stdin and pipe the secret in", param_hint="--client-secret-stdin"
        )
    set_client_secret(_runtime(), name, sys.stdin.readline().strip())
    err.print(f"client secret of provider {name!r} replaced", markup=False)


@providers_app.command("list")
def providers_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List providers (never their secrets)."""
    rt = _runtime()
    with rt.engine.connect() as conn:
        rows = repository.list_providers(conn)
    items = [
        {
            "id": p.id,
            "name": p.name,
            "token_url": p.token_url,
            "revocation_url": p.revocation_url,
            "auth_method": p.auth_method,
            "client_id": p.client_id,
        }
        for p in rows
    ]
    if as_json:
        print(json.dumps(items, indent=2))
        return
    table = Table("name", "token url", "revocation", "auth method", "client id")
    for p in items:
        table.add_row(
            p["name"], p["token_url"], p["revocation_url"] or "-", p["auth_method"], p["client_id"]
        )
    out.print(table)


# -- connections -------------------------------------------------------------------------------


@connections_app.command("import")
def connections_import(
    provider: Annotated[str, typer.Option("--provider")],
    account: Annotated[str, typer.Option("--account")],
) -> None:
    """Import a token pair: the provider's token response JSON on stdin. Prints the new id."""
    from grantkeeper.connections import import_connection  # noqa: PLC0415

    limit = 64 * 1024  # a token response is a few hundred bytes; never buffer a flood
    raw = sys.stdin.buffer.read(limit + 1)
    if len(raw) > limit:
        raise GrantkeeperError(f"the token response on stdin is larger than {limit} bytes")
    print(import_connection(_runtime(), provider, account, raw))


@connections_app.command("authorize")
def connections_authorize(
    provider: Annotated[str, typer.Option("--provider")],
    account: Annotated[
        str | None, typer.Option("--account", help="Connect this account (new, or re-activate).")
    ] = None,
    connection: Annotated[
        str | None, typer.Option("--connection", help="Re-authorize this connection id.")
    ] = None,
    port: Annotated[
        int,
        typer.Option(
            "--port",
            min=0,
            max=65535,
            help="Port of the redirect URI http://127.0.0.1:PORT/callback, which must be"
            " registered at the provider. 0: any free port (only for providers that accept"
            " any loopback port, RFC 8252 7.3).",
        ),
    ] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for the browser.")
    ] = 300,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Only print the URL to open.")
    ] = False,
) -> None:
    """Authorize a connection in a browser (code flow with PKCE). Prints the connection id."""
    from grantkeeper.loopback import run_loopback_authorization  # noqa: PLC0415

    if (account is None) == (connection is None):
        raise typer.BadParameter("give exactly one of --account or --connection")

    def announce(url: str, redirect_uri: str) -> None:
        # Plain prints: Rich would wrap the URL. The URL carries this request's state.
        print(f"Waiting for the provider's redirect to {redirect_uri}", file=sys.stderr)
        print("Open this URL in a browser and approve the access:", file=sys.stderr)
        print(url, file=sys.stderr, flush=True)

    connection_id = run_loopback_authorization(
        _runtime(),
        provider,
        account=account,
        connection_id=connection,
        port=port,
        timeout=timeout,
        open_browser=not no_browser,
        announce=announce,
    )
    err.print(f"authorized: connection {connection_id}")
    print(connection_id)


@connections_app.command("reactivate")
def connections_reactivate(connection_id: str) -> None:
    """Put a reauth_required connection back in service with its stored tokens, then refresh
    it to prove the grant (after fixing a wrong client secret, for example)."""
    from grantkeeper.connections import reactivate_connection  # noqa: PLC0415
    from grantkeeper.refresh import RefreshService  # noqa: PLC0415

    rt = _runtime()
    version = reactivate_connection(rt, connection_id)
    result = RefreshService(rt).refresh(
        connection_id,
        reason="reactivated",
        force=True,
        wait=rt.settings.lock_wait_seconds,
        seen_version=version,
    )
    err.print(f"{connection_id}: reactivated; refresh {result.outcome.value}")
    if result.error is not None:
        raise result.error


@connections_app.command("list")
def connections_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every connection: status, expiry, refreshes, version. Never a token."""
    rt = _runtime()
    with rt.engine.connect() as conn:
        names = {p.id: p.name for p in repository.list_providers(conn)}
        views = [
            _connection_view(r, names.get(r.provider_id)) for r in repository.list_connections(conn)
        ]
    if as_json:
        print(json.dumps(views, indent=2))
        return
    table = Table(
        "id", "provider", "account", "status", "expires", "refreshes", "version", "last error"
    )
    for v in views:
        table.add_row(
            v["id"],
            v["provider"] or "?",
            v["account"],
            v["status"],
            v["access_expires_at"] or "-",
            str(v["refresh_count"]),
            str(v["version"]),
            v["last_error_class"] or "",
        )
    out.print(table)


@connections_app.command("show")
def connections_show(
    connection_id: str, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """One connection's state. Never a token."""
    rt = _runtime()
    with rt.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
        provider = repository.get_provider(conn, record.provider_id) if record else None
    if record is None:
        raise ConnectionNotFound(f"no connection {connection_id}")
    view = _connection_view(record, provider.name if provider else None)
    if as_json:
        print(json.dumps(view, indent=2))
        return
    for key, value in view.items():
        out.print(f"{key:18} {value if value is not None else '-'}")


# -- tokens ------------------------------------------------------------------------------------


@app.command("token")
def token(connection_id: str) -> None:
    """Print a currently valid access token (from the cache, or refreshed under the lock)."""
    from grantkeeper.api import TokenReader  # noqa: PLC0415

    print(TokenReader(_runtime()).get(connection_id, audit_now=True))


@app.command("refresh")
def refresh(connection_id: str) -> None:
    """Refresh now, through the same lock and fencing as the worker."""
    from grantkeeper.refresh import RefreshService  # noqa: PLC0415

    rt = _runtime()
    result = RefreshService(rt).refresh(
        connection_id, reason="manual", force=True, wait=rt.settings.lock_wait_seconds
    )
    err.print(
        f"{connection_id}: {result.outcome.value} (version {result.version},"
        f" expires {_iso(result.access_expires_at) or '-'})"
    )
    if result.error is not None:
        raise result.error
    if not result.ok:
        raise typer.Exit(1)


@app.command("revoke")
def revoke(
    connection_id: Annotated[str | None, typer.Argument(help="The connection to revoke.")] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Recorded in the audit trail.")
    ] = "operator",
    local_only: Annotated[
        bool, typer.Option("--local-only", help="Forget the tokens without calling the provider.")
    ] = False,
    all_connections: Annotated[
        bool, typer.Option("--all", help="Every connection: the compromise runbook.")
    ] = False,
    provider: Annotated[
        str | None, typer.Option("--provider", help="Every connection of one provider.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm a bulk revocation.")] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Suspected exposure time, for the follow-up steps."),
    ] = None,
) -> None:
    """Revoke one connection at its provider (RFC 7009) and locally; or all of them."""
    from grantkeeper.revoke import RevokeService  # noqa: PLC0415

    if sum((connection_id is not None, all_connections, provider is not None)) != 1:
        raise typer.BadParameter("give exactly one of ID, --all or --provider NAME")
    rt = _runtime()
    if connection_id is not None:
        result = RevokeService(rt).revoke(connection_id, reason=reason, local_only=local_only)
        err.print(f"{connection_id}: revoked locally; provider: {result.provider_outcome}")
        for hint, answer in result.answers.items():
            err.print(f"  {hint}: {answer}")
        if result.provider_note:
            err.print(f"[yellow]{result.provider_note}[/yellow]")
        if result.retry_scheduled:
            err.print("the provider did not confirm; the worker retries in the background")
        if not result.cache_cleared:
            raise GrantkeeperError(
                "revoked in the database, but Redis could not be cleared: its cached access token"
                " may still be served until it expires. Run this command again once Redis is back."
            )
        return
    _revoke_bulk(rt, provider, reason=reason, yes=yes, since=since)


def _revoke_bulk(
    rt: Runtime, provider: str | None, *, reason: str, yes: bool, since: str | None
) -> None:
    from rich.progress import Progress  # noqa: PLC0415

    from grantkeeper.compromise import remaining_steps, revoke_many  # noqa: PLC0415

    with rt.engine.connect() as conn:
        provider_id = None
        if provider is not None:
            record = repository.get_provider_by_name(conn, provider)
            if record is None:
                raise ConnectionNotFound(f"no provider named {provider!r}")
            provider_id = record.id
        ids = repository.connection_ids(conn, provider_id=provider_id)
    if not yes:
        raise typer.BadParameter(f"this revokes {len(ids)} connection(s); pass --yes to confirm")
    dispatch = _worker_dispatch(reason)
    err.print(
        f"revoking {len(ids)} connection(s) "
        + ("through the worker" if dispatch else "in this process (no worker answered)")
    )
    with Progress(console=err) as bar:
        task = bar.add_task("revoked", total=len(ids))
        report = revoke_many(
            rt,
            ids,
            reason=reason,
            dispatch=dispatch,
            progress=lambda done, _total: bar.update(task, completed=done),
            flush_all_keys=provider is None,
        )
    if report.via_worker and report.revoked_here:
        err.print(
            f"[yellow]the worker stopped making progress: {report.revoked_here} connection(s)"
            " were revoked by this command instead (see the worker's log for why)[/yellow]"
        )
    err.print(
        f"{report.revoked}/{report.targeted} revoked in {report.seconds:.1f}s"
        f" ({report.revoked / max(report.seconds, 1e-9):.0f}/s);"
        f" {report.redis_keys_removed} grantkeeper keys removed from Redis"
    )
    if report.revoked < report.targeted:
        err.print(
            f"[red]{report.targeted - report.revoked} connection(s) are NOT revoked:"
            " `grantkeeper audit --event token.decryption_failed` and the log above say why;"
            " `grantkeeper revoke ID --local-only` forgets one without the provider[/red]"
        )
    rt.auditor.emit(
        "compromise.bulk_revoked",
        "ok" if report.revoked == report.targeted else "partial",
        provider=provider,
        targeted=report.targeted,
        revoked=report.revoked,
        via_worker=report.via_worker,
        revoked_here=report.revoked_here,
        redis_keys_removed=report.redis_keys_removed,
    )
    out.print("\nWhat remains for a person to do:")
    for number, step in enumerate(remaining_steps(since, report.manual_withdrawals), 1):
        out.print(f"  {number}. {step}", markup=False)
    if report.revoked != report.targeted:
        raise typer.Exit(1)


def _worker_dispatch(reason: str) -> Callable[[str], None] | None:
    """Send revoke tasks if a worker answers a ping; None otherwise."""
    from tasks.revoke import revoke_connection  # noqa: PLC0415
    from worker import app as celery_app  # noqa: PLC0415

    try:
        answered = celery_app.control.ping(timeout=1.5)
    except Exception:  # noqa: BLE001 - no broker means no worker: revoke here
        return None
    if not answered:
        return None
    return lambda connection_id: revoke_connection.delay(connection_id, reason)


@app.command("audit")
def audit(
    connection: Annotated[str | None, typer.Option("--connection")] = None,
    event: Annotated[
        str | None,
        typer.Option("--event", help="Event name; * matches any text, e.g. 'refresh.*'."),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="ISO 8601 time, e.g. 2026-12-01T00:00:00Z")
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            min=1,
            help="At most this many rows (before --follow): the newest ones, or with --since"
            " the first ones from that time.",
        ),
    ] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep printing new events (Ctrl-C stops).")
    ] = False,
) -> None:
    """Read the audit trail, oldest first: the latest --limit events, or those from --since on;
    --follow keeps printing new events as they happen."""
    rt = _runtime()
    since_at = _parse_since(since)
    with rt.engine.connect() as conn:
        rows = repository.list_audit_events(
            conn,
            connection_id=connection,
            event=event,
            since=since_at,
            limit=limit,
            newest=since_at is None,
        )
    if as_json or follow:
        for row in rows:
            _print_audit_line(row, as_json)
    else:
        table = Table("at", "event", "outcome", "connection", "provider", "actor", "details")
        for row in rows:
            table.add_row(
                row["at"].isoformat(timespec="seconds"),
                row["event"],
                row["outcome"],
                row["connection_id"] or "",
                row["provider"] or "",
                row["actor"],
                json.dumps(row["details"], default=str)[:120],
            )
        out.print(table)
    if follow:
        _follow_audit(rt, rows[-1]["id"] if rows else None, connection, event, since_at, as_json)


def _parse_since(since: str | None) -> datetime | None:
    if since is None:
        return None
    try:
        since_at = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter("--since takes an ISO 8601 time") from None
    return since_at if since_at.tzinfo else since_at.replace(tzinfo=UTC)


def _print_audit_line(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({**row, "at": row["at"].isoformat()}, default=str), flush=True)
        return
    print(  # one line per event: greppable while following
        f"{row['at'].isoformat(timespec='seconds')} {row['event']} {row['outcome']}"
        f" connection={row['connection_id'] or '-'} provider={row['provider'] or '-'}"
        f" actor={row['actor']} {json.dumps(row['details'], default=str)}",
        flush=True,
    )


def _follow_audit(
    rt: Runtime,
    after_id: int | None,
    connection: str | None,
    event: str | None,
    since_at: datetime | None,
    as_json: bool,
) -> None:
    """Poll by id (the table is append-only, so ids only grow) until interrupted."""
    import time  # noqa: PLC0415

    if after_id is None:
        with rt.engine.connect() as conn:
            after_id = repository.latest_audit_id(conn)
    try:
        while True:
            with rt.engine.connect() as conn:
                rows = repository.list_audit_events(
                    conn, connection_id=connection, event=event, since=since_at, after_id=after_id
                )
            for row in rows:
                _print_audit_line(row, as_json)
                after_id = row["id"]
            time.sleep(1.0)
    except KeyboardInterrupt:
        return


@app.command("check")
def check(
    production: Annotated[
        bool,
        typer.Option(
            "--production",
            help="Apply production rules (also implied by GRANTKEEPER_ENV=production).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check this deployment against the security checklist; non-zero exit on any fail."""
    from grantkeeper.checks import evaluate, failed, gather  # noqa: PLC0415

    settings = _settings()
    configure_logging(settings.log_level, stream=sys.stderr)
    production = production or settings.env == "production"
    results = evaluate(gather(settings, production=production))
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        colour = {"pass": "green", "warn": "yellow", "fail": "red", "manual": "cyan"}
        table = Table("check", "status", "detail", "fix")
        for r in results:
            table.add_row(r.check, f"[{colour[r.status]}]{r.status}[/]", r.detail, r.fix)
        out.print(table)
    _audit_check(settings, results, production)
    if failed(results):
        raise typer.Exit(1)


def _audit_check(settings: Settings, results: list[Any], production: bool) -> None:
    """Failing checks are audit events too; a database that is not there is one of them."""
    from grantkeeper.audit import Auditor  # noqa: PLC0415
    from grantkeeper.db import create_db_engine  # noqa: PLC0415

    failures = [r.check for r in results if r.status == "fail"]
    if not failures:
        return
    engine = create_db_engine(settings)
    try:
        Auditor(engine, cli_actor()).emit(
            "check.failed", "failed", production=production, checks=failures
        )
    finally:
        engine.dispose()


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Stable keys, for scripts.")] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Connections listed per section.")
    ] = 20,
) -> None:
    """One screen: connections, due and failing ones, last scan, workers, beat.
    Exit 3 when something needs a person."""
    from grantkeeper.status import evaluate, gather, render_text, to_json  # noqa: PLC0415

    facts = gather(_runtime(), list_limit=limit)
    verdict = evaluate(facts)
    if as_json:
        print(json.dumps(to_json(facts, verdict), indent=2))
    else:
        print("\n".join(render_text(facts, verdict)))
    if not verdict.healthy:
        raise typer.Exit(verdict.exit_code)


@app.command("demo")
def demo(
    connections: Annotated[int, typer.Option(help="How many demo connections.")] = 30,
    seconds: Annotated[int, typer.Option(help="How long to run.")] = 45,
    access_ttl: Annotated[int, typer.Option(help="Access token lifetime at the demo server.")] = 12,
) -> None:
    """The main job on a local OAuth server: real worker and beat refreshing short-lived tokens."""
    from grantkeeper.demo import run_demo  # noqa: PLC0415

    raise typer.Exit(run_demo(connections=connections, seconds=seconds, access_ttl=access_ttl))


def _describe_io_error(exc: BaseException) -> str:
    # Exception texts of drivers can quote URLs; keep the class and the errno-like part only.
    return f"{type(exc).__name__}: {str(exc).split(' connecting to ')[0][:80]}"


# SQLSTATE classes and libpq texts that tell an operator what to fix, without quoting the
# driver's message (it can name the user, host and database, never the password, but still).
_DB_REASONS = (
    ("28P01", "password authentication failed", "authentication failed"),
    ("28000", "no pg_hba.conf entry", "this host or user is not allowed (pg_hba.conf)"),
    ("3D000", "does not exist", "the database (or role) does not exist"),
    ("", "connection refused", "connection refused: nothing listens at that host and port"),
    ("", "timeout expired", "connection timed out"),
    ("", "could not translate host name", "the host name does not resolve"),
    ("", "server closed the connection", "the server closed the connection"),
    ("", "ssl", "TLS negotiation failed (check sslmode and certificates)"),
)


def _describe_db_error(exc: BaseException | None) -> str:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    text = str(exc).lower()
    for state, fragment, reason in _DB_REASONS:
        if (state and sqlstate == state) or fragment in text:
            return f"{type(exc).__name__}: {reason}"
    return type(exc).__name__


def _fail(error_class: str, message: str) -> NoReturn:
    """One line on stderr, never a token (any secret this process held is scrubbed), exit 1."""
    text = escape(secrets_held.scrub(message))
    err.print(f"[red]error[/red] ({error_class}): {text}", soft_wrap=True)
    sys.exit(1)


def main() -> None:
    """Entry point: classified errors become one clear line and exit code 1."""
    try:
        # Without standalone mode, Click turns `raise typer.Exit(n)` into a return value.
        code = app(standalone_mode=False)
    except GrantkeeperError as exc:
        _fail(exc.error_class, str(exc))
    except redis.RedisError as exc:
        _fail(
            "redis_unavailable",
            f"Redis did not answer ({_describe_io_error(exc)}); no refresh"
            " happens without its lock. Check GRANTKEEPER_REDIS_URL and that Redis runs.",
        )
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        _fail(
            "database_unavailable",
            f"the database did not answer ({_describe_db_error(exc.orig)});"
            " check GRANTKEEPER_DATABASE_URL and that the database runs",
        )
    except sqlalchemy.exc.ArgumentError:
        _fail(
            "configuration",
            "GRANTKEEPER_DATABASE_URL is not a database URL"
            " (postgresql://user:password@host:5432/name)",
        )
    except sqlalchemy.exc.NoSuchModuleError:
        _fail(
            "configuration",
            "GRANTKEEPER_DATABASE_URL names an unsupported database;"
            " use postgresql://... (or leave it unset for the embedded SQLite file)",
        )
    except (typer.Exit, SystemExit) as exc:
        code = exc.exit_code if isinstance(exc, typer.Exit) else exc.code
        sys.exit(code if isinstance(code, int) else 0)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.TyperException as exc:
        # Usage errors. Typer vendors Click (typer._click), so these are not click.ClickException.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"error: {escape(exc.format_message())}", soft_wrap=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
