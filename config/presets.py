"""Provider presets: the facts of a provider an operator should not have to look up.

Teamleader Focus: form-encoded token endpoint that takes the client credentials in the body,
one-hour access tokens, refresh tokens rotated on every refresh, no revocation endpoint
(access is withdrawn in the Teamleader Marketplace).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderPreset:
    token_url: str
    authorization_url: str | None
    revocation_url: str | None
    auth_method: str
    default_access_ttl: int
    scopes: str | None
    revocation_note: str | None


PRESETS: dict[str, ProviderPreset] = {
    "teamleader": ProviderPreset(
        token_url="https://focus.teamleader.eu/oauth2/access_token",  # noqa: S106 - a URL
        authorization_url="https://focus.teamleader.eu/oauth2/authorize",
        revocation_url=None,
        auth_method="client_secret_post",
        default_access_ttl=3600,
        scopes=None,
        revocation_note="disconnect the integration in the Teamleader Marketplace",
    ),
}
