"""The operator CLI contract (README "Operator CLI"), run as a real ``grantkeeper`` subprocess.

Every command runs the installed console script with an environment built from the test
settings (test PostgreSQL database, test Redis prefix) and a temporary working directory, so
no developer ``.env`` is read. State is checked in the database and at the dev OAuth server,
not only in what the CLI prints.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from config.presets import PRESETS
from config.settings import Settings
from grantkeeper import sealing
from grantkeeper.crypto import Keyring
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.runtime import Runtime
from tests.support.dev import CLIENT, import_grant
from tests.support.processes import settings_env

GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"
PROVIDER_SECRET = "cli-provider-secret-4f1e9a"

Run = Callable[..., subprocess.CompletedProcess[str]]


def _run(
    args: tuple[str, ...], env: Mapping[str, str], cwd: Path, stdin: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRANTKEEPER), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


@pytest.fixture
def cli(runtime: Runtime, cli_env: dict[str, str], tmp_path: Path) -> Run:
    """``cli("connections", "list", stdin=..., env=...)``: the CLI on the test database (clean
    tables, via ``runtime``), from an empty working directory."""
    del runtime

    def run(
        *args: str, stdin: str = "", env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return _run(args, cli_env if env is None else env, tmp_path, stdin)

    return run


def _lines(stream: str) -> list[str]:
    return [line for line in stream.splitlines() if line.strip()]


def _audit_lines(stream: str) -> list[dict[str, Any]]:
    """The structlog JSON lines in a stream (anything else is skipped)."""
    events = []
    for line in _lines(stream):
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The classified error: one line on stderr, after any audit lines."""
    lines = [line for line in _lines(result.stderr) if not line.startswith("{")]
    assert lines, result.stderr
    assert lines[-1].startswith("error ("), result.stderr
    return lines[-1]


def _row(runtime: Runtime, table: str, row_id: str) -> dict[str, Any]:
    with runtime.engine.connect() as conn:
        row = (
            conn.execute(text(f"SELECT * FROM {table} WHERE id = :id"), {"id": row_id})  # noqa: S608
            .mappings()
            .one()
        )
    return dict(row)


def _unseal(runtime: Runtime, connection_id: str, column: str) -> str:
    ciphertext = _row(runtime, "connections", connection_id)[column]
    return sealing.unseal(
        runtime.keyring, sealing.CONNECTIONS, connection_id, column, str(ciphertext)
    )


# -- providers ---------------------------------------------------------------------------------


def test_providers_add_keeps_the_secret_out_of_output_and_storage(
    cli: Run, runtime: Runtime
) -> None:
    """``providers add`` reads the client secret from stdin only, prints the new id, and the
    secret is nowhere in the output nor in the table except as a ``gk1.`` ciphertext. Missing
    ``--client-secret-stdin`` and ``--preset`` with ``--token-url`` are usage errors (exit 2)
    that store nothing; ``--preset teamleader`` stores Teamleader's endpoint and
    client_secret_post; ``providers list --json`` is JSON without any secret."""
    added = cli(
        "providers", "add", "acme",
        "--token-url", "https://acme.example/oauth/token",
        "--client-id", "acme-client",
        "--client-secret-stdin",
        stdin=PROVIDER_SECRET + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert _lines(added.stdout) == [added.stdout.strip()]
    provider_id = str(uuid.UUID(added.stdout.strip()))
    assert PROVIDER_SECRET not in added.stdout + added.stderr
    row = _row(runtime, "providers", provider_id)
    assert row["name"] == "acme"
    assert row["auth_method"] == "client_secret_basic"
    assert str(row["client_secret_ct"]).startswith("gk1.")
    assert not [k for k, v in row.items() if PROVIDER_SECRET in str(v)]
    assert (
        sealing.unseal(
            runtime.keyring,
            sealing.PROVIDERS,
            provider_id,
            sealing.CLIENT_SECRET,
            row["client_secret_ct"],
        )
        == PROVIDER_SECRET
    )

    no_stdin_flag = cli(
        "providers", "add", "nostdin",
        "--token-url", "https://acme.example/oauth/token",
        "--client-id", "x",
        stdin=PROVIDER_SECRET + "\n",
    )  # fmt: skip
    assert no_stdin_flag.returncode == 2, no_stdin_flag.stderr
    assert "--client-secret-stdin" in no_stdin_flag.stderr
    assert "Traceback" not in no_stdin_flag.stderr

    both = cli(
        "providers", "add", "both",
        "--preset", "teamleader",
        "--token-url", "https://acme.example/oauth/token",
        "--client-id", "x",
        "--client-secret-stdin",
        stdin=PROVIDER_SECRET + "\n",
    )  # fmt: skip
    assert both.returncode == 2, both.stderr
    assert "exactly one of --preset or --token-url" in both.stderr
    assert "Traceback" not in both.stderr

    teamleader = cli(
        "providers", "add", "teamleader",
        "--preset", "teamleader",
        "--client-id", "tl-client",
        "--client-secret-stdin",
        stdin=PROVIDER_SECRET + "\n",
    )  # fmt: skip
    assert teamleader.returncode == 0, teamleader.stderr
    tl_row = _row(runtime, "providers", str(uuid.UUID(teamleader.stdout.strip())))
    assert tl_row["token_url"] == PRESETS["teamleader"].token_url
    assert tl_row["auth_method"] == "client_secret_post"
    assert tl_row["default_access_ttl"] == 3600

    listed = cli("providers", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    providers = json.loads(listed.stdout)
    assert sorted(p["name"] for p in providers) == ["acme", "teamleader"]
    assert PROVIDER_SECRET not in listed.stdout + listed.stderr
    assert "gk1." not in listed.stdout
    assert not any("secret" in key for p in providers for key in p)


# -- connections -------------------------------------------------------------------------------


def test_connections_import_prints_an_id_and_refuses_bad_imports(
    cli: Run, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """``connections import`` stores a token response read from stdin and prints only the new
    connection id. A second import of the same account, a response without a refresh token
    and an unknown provider are classified errors (exit 1, one line naming the problem) that
    store nothing."""
    grant = json.dumps(devserver.mint_grant(CLIENT.client_id))
    imported = cli(
        "connections", "import", "--provider", provider_name, "--account", "A", stdin=grant
    )
    assert imported.returncode == 0, imported.stderr
    assert _lines(imported.stdout) == [imported.stdout.strip()]
    connection_id = str(uuid.UUID(imported.stdout.strip()))
    assert _row(runtime, "connections", connection_id)["account"] == "A"

    again = cli(
        "connections", "import", "--provider", provider_name, "--account", "A",
        stdin=json.dumps(devserver.mint_grant(CLIENT.client_id)),
    )  # fmt: skip
    assert again.returncode == 1
    assert "(import_refused)" in _error_line(again)
    assert "connected already" in _error_line(again)

    no_refresh = dict(devserver.mint_grant(CLIENT.client_id))
    del no_refresh["refresh_token"]
    refused = cli(
        "connections", "import", "--provider", provider_name, "--account", "B",
        stdin=json.dumps(no_refresh),
    )  # fmt: skip
    assert refused.returncode == 1
    assert "no refresh_token" in _error_line(refused)

    unknown = cli("connections", "import", "--provider", "nope", "--account", "C", stdin=grant)
    assert unknown.returncode == 1
    assert "no provider named 'nope'" in _error_line(unknown)

    with runtime.engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM connections")).scalars().all()
    assert ids == [connection_id]


def test_connections_list_and_show_never_print_a_token(
    cli: Run, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """``connections list --json`` and ``connections show ID --json`` give the documented
    fields (status, expiry, refreshes, version...) and neither token appears in any output."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct-list")
    fields = {
        "id",
        "provider",
        "account",
        "status",
        "version",
        "access_expires_at",
        "last_refresh_at",
        "refresh_count",
    }
    listed = cli("connections", "list", "--json")
    shown = cli("connections", "show", connection_id, "--json")
    for result in (listed, shown):
        assert result.returncode == 0, result.stderr
        for token in (grant["access_token"], grant["refresh_token"]):
            assert str(token) not in result.stdout + result.stderr
    (item,) = json.loads(listed.stdout)
    view = json.loads(shown.stdout)
    assert item == view
    assert fields <= set(view)
    assert view["id"] == connection_id
    assert view["provider"] == provider_name
    assert view["account"] == "acct-list"
    assert view["status"] == "active"
    assert view["version"] == 1
    assert view["refresh_count"] == 0
    assert view["last_refresh_at"] is None
    assert view["access_expires_at"]


# -- tokens ------------------------------------------------------------------------------------


def test_token_prints_only_the_token_and_audits_on_stderr(
    cli: Run, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """``token ID`` prints exactly one line, an access token the provider accepts, so that
    ``$(grantkeeper token ID)`` works in scripts. The audit event goes to stderr as a JSON
    line (``token.read``) and does not contain the token."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct-token")
    result = cli("token", connection_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    token = result.stdout.strip()
    assert devserver.is_active(token)
    events = _audit_lines(result.stderr)
    reads = [e for e in events if e["event"] == "token.read"]
    assert len(reads) == 1
    assert reads[0]["connection_id"] == connection_id
    assert reads[0]["outcome"] == "ok"
    assert token not in result.stderr


def test_token_refreshes_an_expired_access_token(
    cli: Run, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """For a connection whose access token has expired, ``token ID`` refreshes it on demand
    (one provider refresh), stores the rotated pair and prints the new access token."""
    connection_id, grant = import_grant(
        runtime, devserver, provider_name, "acct-expired", access_ttl=1
    )
    grant_id = devserver.grant_id_of(str(grant["refresh_token"]))
    assert grant_id is not None
    time.sleep(1.5)
    assert not devserver.is_active(str(grant["access_token"]))
    result = cli("token", connection_id)
    assert result.returncode == 0, result.stderr
    assert devserver.stats()["refresh_ok"] == 1
    assert devserver.stats()["reuse_detections"] == 0
    assert result.stdout.count("\n") == 1
    token = result.stdout.strip()
    assert token != grant["access_token"]
    # The dev server keeps this grant's 1 s lifetime, so the new token may already have
    # expired again: check it belongs to the grant and is the one now stored.
    assert devserver.grant_id_of(token) == grant_id
    assert _unseal(runtime, connection_id, sealing.ACCESS_TOKEN) == token
    assert not devserver.is_active(str(grant["refresh_token"]))
    assert devserver.is_active(_unseal(runtime, connection_id, sealing.REFRESH_TOKEN))
    refreshes = [e for e in _audit_lines(result.stderr) if e["event"] == "refresh.succeeded"]
    assert [e["reason"] for e in refreshes] == ["on_demand"]
    assert token not in result.stderr


def test_refresh_bumps_the_version_and_consumes_the_old_refresh_token(
    cli: Run, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """``refresh ID`` refreshes now (exit 0): the version and refresh count go up, the old
    refresh token is consumed at the provider and the stored one is the live one."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct-refresh")
    result = cli("refresh", connection_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    shown = cli("connections", "show", connection_id, "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["version"] == 2
    assert view["refresh_count"] == 1
    assert view["last_refresh_at"]
    assert devserver.stats()["refresh_ok"] == 1
    assert not devserver.is_active(str(grant["refresh_token"]))
    assert devserver.is_active(_unseal(runtime, connection_id, sealing.REFRESH_TOKEN))


def test_revoked_grant_needs_reauthorization(
    cli: Run, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """After the grant is revoked at the provider, ``refresh ID`` fails with exit 1 and the
    error class; the connection becomes ``reauth_required`` and ``token ID`` refuses with a
    message saying it needs re-authorization. The stored ciphertexts are left as they were."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct-revoked")
    assert devserver.state.revoke_token(
        CLIENT.client_id, str(grant["refresh_token"]), "refresh_token"
    )
    before = _row(runtime, "connections", connection_id)

    refreshed = cli("refresh", connection_id)
    assert refreshed.returncode == 1
    assert "(permanent)" in _error_line(refreshed)
    token = cli("token", connection_id)
    assert token.returncode != 0
    message = _error_line(token)
    assert "reauth_required" in message
    assert "re-authorized" in message
    assert token.stdout == ""

    after = _row(runtime, "connections", connection_id)
    assert after["status"] == "reauth_required"
    assert after["last_error_class"] == "permanent"
    assert after["version"] == before["version"] + 1  # a status change moves the version
    assert after["access_token_ct"] == before["access_token_ct"]
    assert after["refresh_token_ct"] == before["refresh_token_ct"]
    assert devserver.stats()["refresh_ok"] == 0


# -- configuration -----------------------------------------------------------------------------


def test_missing_keyring_names_keys_generate(cli: Run, cli_env: dict[str, str]) -> None:
    """Without ``GRANTKEEPER_ENCRYPTION_KEYS`` a command stops (exit 1) with a message naming
    ``grantkeeper keys generate``; ``keys generate`` itself needs no keyring and prints one
    ``KID:KEY`` entry that parses as a keyring."""
    env = {k: v for k, v in cli_env.items() if k != "GRANTKEEPER_ENCRYPTION_KEYS"}
    listed = cli("connections", "list", env=env)
    assert listed.returncode == 1
    message = _error_line(listed)
    assert "(keyring)" in message
    assert "grantkeeper keys generate" in message
    assert listed.stdout == ""

    generated = cli("keys", "generate", env=env)
    assert generated.returncode == 0, generated.stderr
    entry = generated.stdout.strip()
    assert generated.stdout.count("\n") == 1
    kid, _, key = entry.partition(":")
    assert kid
    assert key
    assert Keyring.parse(entry).primary_id == kid


def test_unknown_setting_stops_the_cli(cli: Run, cli_env: dict[str, str]) -> None:
    """A mistyped ``GRANTKEEPER_*`` variable stops start-up, for ``db upgrade`` (the deploy
    step) as for any other command: exit 1, one classified line naming the variable."""
    env = {**cli_env, "GRANTKEEPER_FOO": "1"}
    for args in (("connections", "list"), ("db", "upgrade")):
        result = cli(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        message = _error_line(result)
        assert "(configuration)" in message
        assert "GRANTKEEPER_FOO" in message
        assert "Traceback" not in result.stderr


def test_db_upgrade_creates_a_private_sqlite_database(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    """Without ``GRANTKEEPER_DATABASE_URL`` and without a keyring, ``db upgrade`` creates
    ``grantkeeper.db`` under ``GRANTKEEPER_DATA_DIR``: directory 0700, file 0600."""
    data_dir = tmp_path / "fresh" / "data"
    env = settings_env(sqlite_settings, GRANTKEEPER_DATA_DIR=str(data_dir))
    env.pop("GRANTKEEPER_ENCRYPTION_KEYS")
    assert "GRANTKEEPER_DATABASE_URL" not in env
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = _run(("db", "upgrade"), env, cwd, "")
    assert result.returncode == 0, result.stderr
    db_file = data_dir / "grantkeeper.db"
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(db_file).st_mode) == 0o600
    assert not (cwd / "var").exists()
