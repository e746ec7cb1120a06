"""The Redis TLS recipe of docker-compose.yml, run for real without Docker: the openssl commands
in its header comment make a CA and a server certificate; a redis-server serves TLS only with
them (as the compose service does), and the URL docker/entrypoint.sh builds connects through
grantkeeper's client, verifying the certificate for ``localhost`` (the healthcheck's name).
``redis-cli --tls --cacert`` (the compose healthcheck) answers PONG as well."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from config.settings import Settings
from grantkeeper.redisconn import connect_redis
from tests.support.redis_server import RedisServer, redis_server_has_tls
from tests.support.tls import TlsMaterial

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
PASSWORD = "compose-recipe-pw-0123456789abcdef"


def _recipe() -> str:
    """The shell lines of the header's REDIS TLS recipe (from ``d=secrets/redis_tls`` to the
    ``rm`` of the intermediate files), without their comment prefix."""
    lines = COMPOSE_FILE.read_text("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "d=secrets/redis_tls;" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith('#   rm "$d/'))
    return "\n".join(line.removeprefix("#   ") for line in lines[start : end + 1]) + "\n"


@pytest.fixture
def recipe_output(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    if not redis_server_has_tls():
        pytest.skip("redis-server was built without TLS")
    subprocess.run(
        ["sh", "-eu", "-c", _recipe()], cwd=tmp_path, check=True, capture_output=True, timeout=60
    )
    return tmp_path / "secrets" / "redis_tls"


def test_compose_recipe_makes_a_usable_redis_tls_setup(recipe_output: Path, tmp_path: Path) -> None:
    """The recipe leaves exactly ca.crt, ca.key, redis.crt and redis.key (key 0600), the server
    certificate names redis, localhost and 127.0.0.1, and a TLS-only redis-server with them is
    reachable through the entrypoint's rediss:// URL and through redis-cli --tls."""
    assert sorted(p.name for p in recipe_output.iterdir()) == [
        "ca.crt",
        "ca.key",
        "redis.crt",
        "redis.key",
    ]
    assert (recipe_output / "redis.key").stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate((recipe_output / "redis.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"redis", "localhost"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    material = TlsMaterial(
        ca_cert=recipe_output / "ca.crt",
        ca_key=recipe_output / "ca.key",
        server_cert=recipe_output / "redis.crt",
        server_key=recipe_output / "redis.key",
        other_ca_cert=recipe_output / "ca.crt",
    )
    secrets_dir = tmp_path / "run-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "redis_password").write_text(PASSWORD)
    shutil.copy(recipe_output / "ca.crt", secrets_dir / "redis_ca")
    with RedisServer.start(tmp_path / "redis", password=PASSWORD, tls=material) as server:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "GK_SECRETS_DIR": str(secrets_dir),
            "REDIS_HOST": "localhost",
            "REDIS_PORT": str(server.port),
            "REDIS_DB": "0",
        }
        printed = subprocess.run(
            [
                "sh",
                str(ENTRYPOINT),
                sys.executable,
                "-c",
                "import json, os; print(json.dumps(os.environ['GRANTKEEPER_REDIS_URL']))",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        url = json.loads(printed.stdout)
        assert url.startswith("rediss://")
        settings = Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
        client = connect_redis(settings.redis_url.get_secret_value(), socket_timeout=5)
        try:
            assert client.ping() is True
        finally:
            client.close()

        if shutil.which("redis-cli") is not None:
            tls_args = ["--tls", "--cacert", str(secrets_dir / "redis_ca")]
            check = subprocess.run(
                ["redis-cli", *tls_args, "-h", "localhost", "-p", str(server.port), "ping"],
                env={**os.environ, "REDISCLI_AUTH": PASSWORD},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert check.stdout.strip() == "PONG", check.stderr
