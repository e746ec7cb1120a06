"""The pure verdict of ``grantkeeper status``: what needs a person, from gathered facts."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from grantkeeper.repository import ConnectionHealth
from grantkeeper.status import (
    BEAT_NOT_ALIVE,
    NEEDS_ATTENTION_EXIT,
    NO_WORKER,
    OVERDUE,
    REAUTH,
    REDIS_UNAVAILABLE,
    RETRIES_EXHAUSTED,
    StatusFacts,
    WorkerProbe,
    evaluate,
    render_text,
    to_json,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def conn(
    cid: str,
    *,
    expires_in: float | None = 3600,
    next_attempt_in: float | None = None,
    failures: int = 0,
    status: str = "active",
    error: str | None = None,
) -> ConnectionHealth:
    return ConnectionHealth(
        id=cid,
        provider="dev",
        account=f"acct-{cid}",
        status=status,
        access_expires_at=NOW + expires_in * S if expires_in is not None else None,
        next_attempt_at=NOW + next_attempt_in * S if next_attempt_in is not None else None,
        failure_count=failures,
        last_error_class=error,
    )


def healthy_facts(**changes: Any) -> StatusFacts:
    facts = StatusFacts(
        checked_at=NOW,
        queue="grantkeeper",
        refresh_margin_seconds=300,
        scan_interval_seconds=30,
        max_transient_retries=8,
        by_status={"active": 3},
        due=[],
        queued_ids=frozenset(),
        reauth_required=[],
        failing=[],
        failing_total=0,
        retries_exhausted_total=0,
        overdue_total=0,
        last_scan_at=NOW - 10 * S,
        last_scan_details={"due": 0, "enqueued": 0},
        workers=WorkerProbe(consuming=["celery@w1"]),
        beat_lock_held=True,
    )
    return dataclasses.replace(facts, **changes)


def codes(facts: StatusFacts) -> list[str]:
    return [p.code for p in evaluate(facts).problems]


def test_everything_running_and_nothing_failing_is_healthy() -> None:
    verdict = evaluate(healthy_facts())
    assert verdict.healthy
    assert verdict.exit_code == 0
    assert verdict.beat_alive
    assert render_text(healthy_facts(), verdict)[-1] == "OK: nothing needs a person"


def test_nothing_running_names_worker_and_beat() -> None:
    facts = healthy_facts(
        workers=WorkerProbe(consuming=()), beat_lock_held=False, last_scan_at=None
    )
    verdict = evaluate(facts)
    assert [p.code for p in verdict.problems] == [NO_WORKER, BEAT_NOT_ALIVE]
    assert verdict.exit_code == NEEDS_ATTENTION_EXIT
    text = "\n".join(render_text(facts, verdict))
    assert "no worker" in text
    assert "beat not alive" in text
    assert "no RedBeat lock" in text


def test_workers_of_other_queues_do_not_count() -> None:
    facts = healthy_facts(workers=WorkerProbe(consuming=(), other=["celery@someone-else"]))
    verdict = evaluate(facts)
    assert [p.code for p in verdict.problems] == [NO_WORKER]
    assert "1 worker(s) of other queues answered" in verdict.problems[0].message


def test_worker_control_channel_error_is_no_worker() -> None:
    facts = healthy_facts(workers=WorkerProbe(consuming=(), error="OperationalError"))
    assert codes(facts) == [NO_WORKER]
    assert "OperationalError" in evaluate(facts).problems[0].message


@pytest.mark.parametrize(
    ("lock", "scan_age", "alive"),
    [
        (True, 10, True),
        (True, 90, True),  # exactly 3 intervals
        (True, 91, False),  # the lock holder does not scan
        (False, 10, False),  # the scan was by a beat that is gone
        (True, None, False),
    ],
)
def test_beat_alive_needs_the_lock_and_a_scan_within_three_intervals(
    lock: bool, scan_age: float | None, alive: bool
) -> None:
    last = NOW - scan_age * S if scan_age is not None else None
    verdict = evaluate(healthy_facts(beat_lock_held=lock, last_scan_at=last))
    assert verdict.beat_alive is alive
    assert (BEAT_NOT_ALIVE in [p.code for p in verdict.problems]) is not alive


def test_stale_scan_is_reported_with_its_age() -> None:
    verdict = evaluate(healthy_facts(last_scan_at=NOW - 600 * S))
    assert "last scan 10 min ago, more than 90 s" in verdict.problems[0].message
    assert verdict.last_scan_age_seconds == 600


def test_reauth_required_needs_a_person() -> None:
    facts = healthy_facts(
        by_status={"active": 2, "reauth_required": 1},
        reauth_required=[conn("r1", status="reauth_required", failures=1, error="invalid_grant")],
    )
    verdict = evaluate(facts)
    assert [p.code for p in verdict.problems] == [REAUTH]
    assert "1 connection(s) need re-authorization" in verdict.problems[0].message
    text = "\n".join(render_text(facts, verdict))
    assert "r1  dev/acct-r1" in text
    assert "last error invalid_grant" in text


def test_overdue_token_needs_a_person_even_when_queued() -> None:
    expired = conn("o1", expires_in=-5)
    facts = healthy_facts(due=[expired], queued_ids=frozenset({"o1"}), overdue_total=1)
    verdict = evaluate(facts)
    assert [p.code for p in verdict.problems] == [OVERDUE]
    assert verdict.overdue == [expired]
    assert verdict.queued == [expired]


def test_due_rows_are_queued_backing_off_or_not_queued() -> None:
    queued = conn("q", expires_in=100, next_attempt_in=50)  # a marker wins over the backoff
    backing = conn("b", expires_in=120, next_attempt_in=30, failures=2, error="transient")
    retry_now = conn("n1", expires_in=130, next_attempt_in=-1, failures=1)
    plain = conn("n2", expires_in=140)
    facts = healthy_facts(
        due=[queued, backing, retry_now, plain],
        queued_ids=frozenset({"q"}),
        failing=[backing, retry_now],
        failing_total=2,
    )
    verdict = evaluate(facts)
    assert verdict.healthy  # due and failing, but nothing a person must do yet
    assert verdict.queued == [queued]
    assert verdict.backing_off == [backing]
    assert verdict.not_queued == [retry_now, plain]
    doc = to_json(facts, verdict)
    assert doc["due"]["count"] == 4
    assert doc["due"]["queued"] == 1
    assert doc["due"]["backing_off"]["count"] == 1
    assert [c["id"] for c in doc["due"]["not_queued"]["connections"]] == ["n1", "n2"]
    text = "\n".join(render_text(facts, verdict))
    assert "4 expiring within 300 s: 1 queued, 1 backing off, 2 not queued" in text
    assert "next attempt in 30 s" in text


def test_retries_exhausted_needs_a_person() -> None:
    worn = conn("x", failures=8, error="provider_unavailable", next_attempt_in=3600)
    facts = healthy_facts(failing=[worn], failing_total=1, retries_exhausted_total=1)
    verdict = evaluate(facts)
    assert [p.code for p in verdict.problems] == [RETRIES_EXHAUSTED]
    assert verdict.retries_exhausted == [worn]


def test_failures_below_the_retry_limit_do_not_page() -> None:
    facts = healthy_facts(failing=[conn("f", failures=7)], failing_total=1)
    assert evaluate(facts).healthy


def test_redis_error_is_a_problem() -> None:
    facts = healthy_facts(redis_error="ConnectionError", beat_lock_held=False)
    assert codes(facts) == [BEAT_NOT_ALIVE, REDIS_UNAVAILABLE]


def test_every_problem_at_once_keeps_a_stable_order() -> None:
    facts = healthy_facts(
        by_status={"active": 1, "reauth_required": 2},
        overdue_total=1,
        retries_exhausted_total=1,
        workers=WorkerProbe(consuming=()),
        beat_lock_held=False,
    )
    assert codes(facts) == [REAUTH, OVERDUE, RETRIES_EXHAUSTED, NO_WORKER, BEAT_NOT_ALIVE]


def test_json_document_has_the_documented_keys() -> None:
    facts = healthy_facts(by_status={"active": 2, "revoked": 1})
    doc = to_json(facts, evaluate(facts))
    json.dumps(doc)  # serialisable as is
    assert set(doc) == {
        "healthy",
        "exit_code",
        "checked_at",
        "problems",
        "notes",
        "connections",
        "due",
        "overdue",
        "failures",
        "reauth_required",
        "last_scan",
        "workers",
        "beat",
        "redis_error",
    }
    assert doc["connections"] == {"active": 2, "reauth_required": 0, "revoked": 1, "total": 3}
    assert doc["healthy"] is True
    assert doc["exit_code"] == 0
    assert doc["last_scan"] == {
        "at": (NOW - 10 * S).isoformat(),
        "age_seconds": 10.0,
        "due": 0,
        "enqueued": 0,
    }
    assert doc["workers"] == {
        "queue": "grantkeeper",
        "count": 1,
        "hostnames": ["celery@w1"],
        "other_queues_count": 0,
        "error": None,
    }
    assert doc["beat"] == {
        "alive": True,
        "lock_held": True,
        "scan_interval_seconds": 30,
        "stale_after_seconds": 90,
    }


def test_lists_are_capped_but_counts_are_exact() -> None:
    due = [conn(f"n{i}", expires_in=10 + i) for i in range(5)]
    facts = healthy_facts(due=due, list_limit=2)
    verdict = evaluate(facts)
    doc = to_json(facts, verdict)
    assert doc["due"]["not_queued"]["count"] == 5
    assert len(doc["due"]["not_queued"]["connections"]) == 2
    assert "    ... and 3 more" in render_text(facts, verdict)
