"""Helpers around the dev OAuth server shared by several test modules."""

from __future__ import annotations

import json

from grantkeeper.connections import import_connection
from grantkeeper.devserver import DevClient, DevOAuthServer
from grantkeeper.runtime import Runtime

CLIENT = DevClient("gk-client", "s3cret-client-value-for-tests", "client_secret_basic")


def import_grant(
    runtime: Runtime, devserver: DevOAuthServer, provider: str, account: str, access_ttl: int = 3600
) -> tuple[str, dict[str, object]]:
    grant = dict(devserver.mint_grant(CLIENT.client_id, access_ttl=access_ttl))
    connection_id = import_connection(runtime, provider, account, json.dumps(grant).encode())
    return connection_id, grant
