"""``grantkeeper check``: the deployment checklist of the guidance this project grew from,
checked against the live configuration and services instead of ticked by hand.

Two layers: :func:`gather` does the I/O (reads settings, asks Redis, PostgreSQL, the file system
and git) into a plain :class:`Facts`; :func:`evaluate` is pure and turns facts into results,
so every rule is testable without services.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import redis
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.crypto import Keyring
from grantkeeper.db import create_db_engine
from grantkeeper.errors import KeyringError

Status = Literal["pass", "warn", "fail", "manual"]
MIN_REDIS_PASSWORD = 20
# Keys that have appeared in documentation: using one means the key is public.
DOCUMENTED_EXAMPLE_KEYS = frozenset(
    {
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "0000000000000000000000000000000000000000000",
    }
)
# A 256-bit key from a CSPRNG has about 30 distinct byte values; fewer than 16 is not random.
MIN_DISTINCT_KEY_BYTES = 16
KEY_MAX_AGE_DAYS = 365
KEY_DATE = re.compile(r"^k(\d{8})")


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Facts:
    production: bool
    redis_url: str
    broker_url: str
    redis_reachable: bool = False
    redis_error: str | None = None
    maxmemory_policy: str | None = None
    keyring_error: str | None = None
    keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    key_id_entries: list[str] = field(default_factory=list)
    primary_id: str | None = None
    database_url: str = ""
    is_sqlite: bool = True
    db_error: str | None = None
    db_can_create: bool | None = None
    db_owns_tables: bool | None = None
    db_can_rewrite_audit: bool | None = None
    file_modes: dict[str, int] = field(default_factory=dict)
    env_tracked_by_git: bool | None = None
    accept_content: list[str] = field(default_factory=list)
    log_http_bodies: bool = False
    log_level: str = "INFO"
    # provider name -> its token, revocation and authorization URLs (None: not readable)
    provider_urls: dict[str, list[str]] | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


# -- evaluation (pure) --------------------------------------------------------------------------


def _severity(production: bool) -> Status:
    return "fail" if production else "warn"


def _check_redis(f: Facts) -> list[CheckResult]:
    out = []
    schemes = {urlsplit(u).scheme for u in (f.redis_url, f.broker_url)}
    if schemes <= {"redis", "rediss", "unix"}:
        out.append(CheckResult("redis.backend", "pass", "cache, locks and broker are Redis"))
    else:
        out.append(
            CheckResult(
                "redis.backend",
                "fail",
                f"non-Redis backend in use: {sorted(schemes)}",
                "point GRANTKEEPER_REDIS_URL and GRANTKEEPER_BROKER_URL at Redis",
            )
        )
    for name, url in (("redis", f.redis_url), ("broker", f.broker_url)):
        parts = urlsplit(url)
        reqs = parse_qs(parts.query).get("ssl_cert_reqs", ["required"])[0].lower()
        if parts.scheme == "rediss" and reqs not in {"none", "cert_none"}:
            out.append(CheckResult(f"{name}.tls", "pass", "TLS with certificate verification"))
        else:
            problem = (
                "no TLS" if parts.scheme != "rediss" else "TLS without certificate verification"
            )
            out.append(
                CheckResult(
                    f"{name}.tls",
                    _severity(f.production),
                    problem,
                    "use rediss://…?ssl_ca_certs=/path/ca.pem"
                    " (ssl_cert_reqs=required is the default)",
                )
            )
        password = parts.password or ""
        if len(password) >= MIN_REDIS_PASSWORD:
            out.append(CheckResult(f"{name}.password", "pass", f"{len(password)} characters"))
        else:
            out.append(
                CheckResult(
                    f"{name}.password",
                    _severity(f.production),
                    "no password" if not password else f"password of {len(password)} characters",
                    f"set requirepass to {MIN_REDIS_PASSWORD}+ random characters;"
                    " put it in the URL",
                )
            )
    if not f.redis_reachable:
        out.append(
            CheckResult(
                "redis.reachable",
                "fail",
                f"Redis did not answer: {f.redis_error}",
                "start Redis or fix GRANTKEEPER_REDIS_URL",
            )
        )
    elif f.maxmemory_policy == "noeviction":
        out.append(CheckResult("redis.eviction", "pass", "maxmemory-policy noeviction"))
    elif f.maxmemory_policy is None:
        out.append(
            CheckResult(
                "redis.eviction",
                "warn",
                "could not read maxmemory-policy (CONFIG GET refused)",
                "confirm maxmemory-policy is noeviction",
            )
        )
    else:
        out.append(
            CheckResult(
                "redis.eviction",
                _severity(f.production),
                f"maxmemory-policy {f.maxmemory_policy}:"
                " locks, parked tokens and schedules can be evicted",
                "CONFIG SET maxmemory-policy noeviction (and in redis.conf)",
            )
        )
    return out


def _check_keyring(f: Facts) -> list[CheckResult]:
    if f.keyring_error:
        return [
            CheckResult("keyring.present", "fail", f.keyring_error, "grantkeeper keys generate")
        ]
    out = [CheckResult("keyring.present", "pass", f"{len(f.keys)} key(s), primary {f.primary_id}")]
    weak = [
        kid
        for kid, key in f.keys.items()
        if len(set(key)) < MIN_DISTINCT_KEY_BYTES
        or base64.urlsafe_b64encode(key).rstrip(b"=").decode() in DOCUMENTED_EXAMPLE_KEYS
    ]
    if weak:
        out.append(
            CheckResult(
                "keyring.randomness",
                "fail",
                f"key(s) {weak} are not 256 bits of real randomness",
                "replace them: grantkeeper keys generate, then keys rotate",
            )
        )
    else:
        out.append(
            CheckResult("keyring.randomness", "pass", "every key is 256 bits and looks random")
        )
    materials = list(f.keys.values())
    if len(set(materials)) != len(materials) or len(set(f.key_id_entries)) != len(f.key_id_entries):
        out.append(
            CheckResult(
                "keyring.unique",
                "fail",
                "a key id or key appears twice",
                "give every key its own id and material",
            )
        )
    else:
        out.append(CheckResult("keyring.unique", "pass", "no key id or key repeats"))
    match = KEY_DATE.match(f.primary_id or "")
    if match:
        created = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
        age = (f.now - created).days
        status: Status = "warn" if age > KEY_MAX_AGE_DAYS else "pass"
        out.append(
            CheckResult(
                "keyring.age",
                status,
                f"primary key is {age} days old",
                "rotate yearly, and at once if it was exposed: see README, Key rotation",
            )
        )
    return out


def _check_database(f: Facts) -> list[CheckResult]:
    out = []
    if f.is_sqlite:
        out.append(
            CheckResult(
                "database.engine",
                _severity(f.production),
                "embedded SQLite",
                "set GRANTKEEPER_DATABASE_URL to PostgreSQL",
            )
        )
        return out
    out.append(CheckResult("database.engine", "pass", "PostgreSQL"))
    sslmode = parse_qs(urlsplit(f.database_url).query).get("sslmode", [""])[0]
    if sslmode in {"verify-full", "verify-ca"}:
        out.append(CheckResult("database.tls", "pass", f"sslmode={sslmode}"))
    else:
        out.append(
            CheckResult(
                "database.tls",
                _severity(f.production),
                f"sslmode={sslmode or 'unset'}",
                "add ?sslmode=verify-full&sslrootcert=/path/ca.pem to the URL",
            )
        )
    if f.db_error:
        out.append(
            CheckResult("database.reachable", "fail", f.db_error, "check GRANTKEEPER_DATABASE_URL")
        )
        return out
    if f.db_can_create or f.db_owns_tables:
        out.append(
            CheckResult(
                "database.role_ddl",
                _severity(f.production),
                "the runtime role can create, alter or drop tables",
                "run workers as the worker role: grantkeeper db roles",
            )
        )
    else:
        out.append(
            CheckResult("database.role_ddl", "pass", "the runtime role cannot change the schema")
        )
    if f.db_can_rewrite_audit:
        out.append(
            CheckResult(
                "database.audit_append_only",
                _severity(f.production),
                "the runtime role may UPDATE or DELETE audit rows",
                "grant INSERT and SELECT only on audit_events: grantkeeper db roles",
            )
        )
    else:
        out.append(
            CheckResult(
                "database.audit_append_only", "pass", "audit rows cannot be rewritten by this role"
            )
        )
    return out


def _check_files(f: Facts) -> list[CheckResult]:
    out = []
    for path, mode in sorted(f.file_modes.items()):
        is_dir = stat.S_ISDIR(mode)
        loose = mode & (0o007 if is_dir else 0o077)
        limit = "770" if is_dir else "600"
        if loose:
            out.append(
                CheckResult(
                    "files.permissions",
                    "fail",
                    f"{path} is {oct(stat.S_IMODE(mode))}",
                    f"chmod {limit} {path} (at most)",
                )
            )
        else:
            out.append(
                CheckResult("files.permissions", "pass", f"{path} is {oct(stat.S_IMODE(mode))}")
            )
    if f.env_tracked_by_git:
        out.append(
            CheckResult(
                "files.env_untracked",
                "fail",
                ".env is tracked by git",
                "git rm --cached .env, add it to .gitignore, rotate what it held",
            )
        )
    elif f.env_tracked_by_git is False:
        out.append(CheckResult("files.env_untracked", "pass", ".env is not tracked by git"))
    return out


def _check_runtime(f: Facts) -> list[CheckResult]:
    out = []
    if f.accept_content == ["json"]:
        out.append(CheckResult("celery.json_only", "pass", "Celery accepts JSON only"))
    else:
        out.append(
            CheckResult(
                "celery.json_only",
                "fail",
                f"Celery accepts {f.accept_content}",
                "accept_content=['json']",
            )
        )
    if f.log_http_bodies:
        out.append(
            CheckResult(
                "logging.http_bodies",
                "fail",
                "HTTP body logging is on",
                "unset GRANTKEEPER_LOG_HTTP_BODIES",
            )
        )
    else:
        out.append(CheckResult("logging.http_bodies", "pass", "HTTP bodies are never logged"))
    if f.production and f.log_level.upper() == "DEBUG":
        out.append(
            CheckResult(
                "logging.level", "warn", "DEBUG logging in production", "GRANTKEEPER_LOG_LEVEL=INFO"
            )
        )
    out.append(
        CheckResult(
            "audit.enabled", "pass", "every token access and state change is audited (always on)"
        )
    )
    out.append(
        CheckResult(
            "manual.disk_encryption",
            "manual",
            "database and Redis disks: encryption at rest cannot be verified from here",
            "enable volume/disk encryption for PostgreSQL and Redis storage",
        )
    )
    out.append(
        CheckResult(
            "manual.network",
            "manual",
            "firewall rules cannot be verified from here",
            "allow Redis and PostgreSQL only from grantkeeper hosts",
        )
    )
    return out


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_providers(f: Facts) -> list[CheckResult]:
    """The client secret and every token travel to these URLs: plain HTTP to another host
    sends them readable to the network."""
    if f.provider_urls is None:
        return []
    plain = sorted(
        f"{name}: {url}"
        for name, urls in f.provider_urls.items()
        for url in urls
        if urlsplit(url).scheme == "http" and not _is_loopback(urlsplit(url).hostname)
    )
    if plain:
        return [
            CheckResult(
                "providers.https",
                _severity(f.production),
                "plain-HTTP provider endpoints (tokens and the client secret travel unencrypted): "
                + "; ".join(plain),
                "register the provider's https:// URLs (`grantkeeper providers add`)",
            )
        ]
    detail = (
        f"{len(f.provider_urls)} provider(s), every endpoint https:// (or loopback)"
        if f.provider_urls
        else "no provider registered yet"
    )
    return [CheckResult("providers.https", "pass", detail)]


RULES: tuple[Callable[[Facts], list[CheckResult]], ...] = (
    _check_redis,
    _check_keyring,
    _check_database,
    _check_files,
    _check_runtime,
    _check_providers,
)


def evaluate(facts: Facts) -> list[CheckResult]:
    return [result for rule in RULES for result in rule(facts)]


def failed(results: list[CheckResult]) -> bool:
    return any(r.status == "fail" for r in results)


# -- gathering (I/O) ----------------------------------------------------------------------------


def gather(settings: Settings, *, production: bool, cwd: Path | None = None) -> Facts:
    cwd = cwd or Path.cwd()
    facts = Facts(
        production=production,
        redis_url=settings.redis_url.get_secret_value(),
        broker_url=settings.effective_broker_url,
        database_url=settings.effective_database_url,
        is_sqlite=settings.is_sqlite,
        log_http_bodies=settings.log_http_bodies,
        log_level=settings.log_level,
    )
    _gather_redis(facts)
    _gather_keyring(settings, facts)
    _gather_files(settings, facts, cwd)
    if not settings.is_sqlite or settings.sqlite_path.exists():  # check creates no database
        engine = create_db_engine(settings)
        try:
            if not settings.is_sqlite:
                _gather_database(engine, facts)
            _gather_providers(engine, facts)
        finally:
            engine.dispose()
    from worker.app import celery_config  # noqa: PLC0415 - the config the worker really uses

    facts.accept_content = list(celery_config(settings)["accept_content"])
    return facts


def _gather_redis(facts: Facts) -> None:
    client = redis.Redis.from_url(facts.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
        facts.redis_reachable = True
        try:
            facts.maxmemory_policy = str(
                client.config_get("maxmemory-policy").get("maxmemory-policy")
            )
        except redis.ResponseError:
            facts.maxmemory_policy = None
    except redis.RedisError as exc:
        facts.redis_error = type(exc).__name__
    finally:
        client.close()


def _gather_keyring(settings: Settings, facts: Facts) -> None:
    spec = settings.encryption_keys.get_secret_value() if settings.encryption_keys else None
    facts.key_id_entries = [
        e.split(":", 1)[0].strip() for e in (spec or "").split(",") if e.strip()
    ]
    try:
        keyring = Keyring.parse(spec, settings.primary_key_id)
    except (KeyringError, binascii.Error) as exc:
        facts.keyring_error = str(exc)
        return
    facts.keys = dict(keyring.keys)
    facts.primary_id = keyring.primary_id


def _gather_database(engine: Engine, facts: Facts) -> None:
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT has_database_privilege(current_database(), 'CREATE')"
                    " OR has_schema_privilege(current_schema(), 'CREATE') AS can_create,"
                    " EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema()"
                    "         AND tableowner = current_user) AS owns,"
                    " COALESCE(has_table_privilege('audit_events', 'UPDATE')"
                    "          OR has_table_privilege('audit_events', 'DELETE'), false) AS rewrite"
                )
            ).one()
        facts.db_can_create, facts.db_owns_tables, facts.db_can_rewrite_audit = row
    except SQLAlchemyError as exc:
        facts.db_error = f"{type(exc).__name__}: could not query privileges"


def _gather_providers(engine: Engine, facts: Facts) -> None:
    try:
        with engine.connect() as conn:
            facts.provider_urls = {
                p.name: [u for u in (p.token_url, p.revocation_url, p.authorization_url) if u]
                for p in repository.list_providers(conn)
            }
    except SQLAlchemyError:
        facts.provider_urls = None  # not migrated, or unreachable: the database check says so


def _gather_files(settings: Settings, facts: Facts, cwd: Path) -> None:
    candidates = [cwd / ".env"]
    if settings.is_sqlite:
        candidates += [settings.data_dir, settings.sqlite_path]
    for path in candidates:
        if path.exists():
            facts.file_modes[str(path)] = path.stat().st_mode
    env = cwd / ".env"
    if env.exists() and (cwd / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", ".env"],  # noqa: S607 - git from PATH
            cwd=cwd,
            capture_output=True,
            check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
        facts.env_tracked_by_git = tracked.returncode == 0
