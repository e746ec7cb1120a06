"""Fixtures for integration tests: a running dev OAuth server and a registered provider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.runtime import Runtime
from tests.support.dev import CLIENT


@pytest.fixture
def devserver() -> Iterator[DevOAuthServer]:
    server = DevOAuthServer([CLIENT], access_ttl=3600).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def provider_name(runtime: Runtime, devserver: DevOAuthServer) -> str:
    add_provider(
        runtime,
        ProviderSpec(
            name="dev",
            token_url=devserver.token_url,
            revocation_url=devserver.revocation_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
            auth_method=CLIENT.auth_method,
        ),
    )
    return "dev"
