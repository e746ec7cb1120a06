"""Every response in the corpus (tests/fixtures/token_responses) replayed through the dev
server's fault-injecting token endpoint and grantkeeper's real refresh path: each is
classified as its fixture says, a failure never changes a stored token, and no token or body
text reaches the audit trail or the logs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from grantkeeper import repository, sealing
from grantkeeper.devserver import DevOAuthServer, ScriptedResponse
from grantkeeper.models import ACTIVE, REAUTH_REQUIRED, audit_events
from grantkeeper.refresh import RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "token_responses"
FIXTURES = sorted(CORPUS.glob("*.json"))
SECRET_MARKERS = ("AT-corpus-secret", "RT-corpus-secret", "Bad Gateway", "login</html>")


def _materialise(case: dict[str, Any]) -> ScriptedResponse:
    now = time.time()
    if "body" in case:
        body = json.dumps(case["body"]).replace('"__NOW_PLUS_3600__"', str(int(now + 3600)))
        raw = body.encode()
    else:
        raw = case["raw"].encode()
    headers = {
        k: (
            format_datetime(datetime.now(UTC) + timedelta(seconds=300), usegmt=True)
            if v == "__HTTP_DATE_PLUS_300__"
            else v
        )
        for k, v in case["headers"].items()
    }
    return ScriptedResponse(
        status=case["status"],
        body=raw,
        headers=headers,
        delay=float(case.get("delay", 0)),
        truncate_at=case.get("truncate_at"),
        disconnect=bool(case.get("disconnect", False)),
    )


def _unseal(
    runtime: Runtime, record: repository.ConnectionRecord, column: str, ct: str | None
) -> str:
    return sealing.unseal(runtime.keyring, sealing.CONNECTIONS, record.id, column, ct or "")


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_corpus_response(
    fixture: Path,
    runtime: Runtime,
    devserver: DevOAuthServer,
    provider_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The fixture's expected classification holds, end to end."""
    case = json.loads(fixture.read_text())
    expect = case["expect"]
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct")
    with runtime.engine.connect() as conn:
        before = repository.get_connection(conn, connection_id)
    assert before is not None
    devserver.script(_materialise(case))
    started = datetime.now(UTC)
    result = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert result.outcome.value == expect["outcome"], result.error
    with runtime.engine.connect() as conn:
        after = repository.get_connection(conn, connection_id)
        details = [
            r.details
            for r in conn.execute(
                select(audit_events.c.details).where(audit_events.c.event.like("refresh.%"))
            )
        ]
    assert after is not None
    if expect["outcome"] == "refreshed":
        assert _unseal(runtime, after, sealing.ACCESS_TOKEN, after.access_token_ct).startswith(
            "AT-corpus"
        )
        stored_refresh = _unseal(runtime, after, sealing.REFRESH_TOKEN, after.refresh_token_ct)
        assert (stored_refresh != grant["refresh_token"]) is expect["rotated"]
        if "note" in expect:
            assert expect["note"] in result.notes
    else:
        # A failure loses nothing: both ciphertexts are byte-identical.
        assert after.access_token_ct == before.access_token_ct
        assert after.refresh_token_ct == before.refresh_token_ct
        assert result.error is not None
        assert result.error.error_class == expect["error_class"]
        assert after.last_error_class == expect["error_class"]
        assert after.status == (
            REAUTH_REQUIRED if expect["outcome"] == "failed_permanent" else ACTIVE
        )
        failed = [d for d in details if d.get("result") == expect["outcome"]]
        assert len(failed) == 1
        if "http_status" in expect:
            assert failed[0]["http_status"] == expect["http_status"]
        if "oauth_error" in expect:
            assert failed[0]["oauth_error"] == expect["oauth_error"]
        if expect["outcome"] == "failed_transient":
            assert after.next_attempt_at is not None
            assert after.next_attempt_at > started
            if "retry_after_at_least" in expect:
                delay = (after.next_attempt_at - started).total_seconds()
                assert delay >= expect["retry_after_at_least"]
    observed = json.dumps(details) + capsys.readouterr().out
    for marker in SECRET_MARKERS:
        assert marker not in observed, f"{marker!r} leaked into audit or logs"
    # The grant itself was never touched by a scripted failure.
    assert devserver.stats()["reuse_detections"] == 0
