"""Pure timing decisions: refresh due moments, servability, expiry, cache TTL, backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from grantkeeper.timing import (
    backoff_seconds,
    cache_ttl_seconds,
    compute_expiry,
    effective_margin,
    is_due,
    is_servable,
    refresh_due_at,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
MARGIN = 300 * S


def test_margin_capped_at_half_lifetime_for_short_token() -> None:
    """A 20 s token with a 300 s margin gets a 10 s effective margin, not 300 s."""
    assert effective_margin(MARGIN, NOW, NOW + 20 * S) == 10 * S


def test_short_token_is_due_at_half_life_not_at_birth() -> None:
    """A 20 s token is not due when issued, becomes due with exactly 10 s remaining."""
    issued, expires = NOW, NOW + 20 * S
    assert refresh_due_at(MARGIN, issued, expires) == NOW + 10 * S
    assert not is_due(NOW, MARGIN, issued, expires)
    assert not is_due(NOW + 9 * S, MARGIN, issued, expires)
    assert is_due(NOW + 10 * S, MARGIN, issued, expires)


def test_long_token_uses_full_margin() -> None:
    """A 1 h token keeps the configured 300 s margin."""
    assert effective_margin(MARGIN, NOW, NOW + 3600 * S) == MARGIN
    assert refresh_due_at(MARGIN, NOW, NOW + 3600 * S) == NOW + 3300 * S


def test_margin_without_issued_at_is_configured_margin() -> None:
    """Without an issue time the lifetime is unknown, so the margin is not capped."""
    assert effective_margin(MARGIN, None, NOW + 20 * S) == MARGIN


def test_margin_never_negative_when_issued_after_expiry() -> None:
    """An inverted (issued after expiry) window yields a zero margin, not a negative one."""
    assert effective_margin(MARGIN, NOW + 10 * S, NOW) == timedelta(0)


def test_unknown_expiry_is_always_due() -> None:
    """A connection without a known expiry is refreshed."""
    assert is_due(NOW, MARGIN, None, None)
    assert is_due(NOW, MARGIN, NOW, None)


@pytest.mark.parametrize(
    ("remaining", "min_validity", "expected"),
    [
        (3600, 30, True),
        (30, 30, True),
        (29, 30, False),
        (0, 0, True),
        (-1, 0, False),
        (-100, 30, False),
    ],
)
def test_is_servable(remaining: int, min_validity: int, expected: bool) -> None:
    """A token is servable only while it stays valid for at least min_validity."""
    assert is_servable(NOW, NOW + remaining * S, min_validity * S) is expected


def test_unknown_expiry_is_not_servable() -> None:
    """A token of unknown expiry is never handed out."""
    assert not is_servable(NOW, None, timedelta(0))


def test_compute_expiry_counts_from_sent_at_minus_skew() -> None:
    """Expiry is sent_at + lifetime - skew when the skew is small relative to the lifetime."""
    assert compute_expiry(NOW, 3600 * S, 30 * S) == NOW + 3570 * S


@pytest.mark.parametrize(
    ("lifetime", "skew", "expected_after_sent"),
    [
        (20, 30, 15),  # skew capped at 20/4 = 5 s
        (40, 30, 30),  # capped at 10 s
        (120, 30, 90),  # 30 s == 120/4: the cap is exactly the skew
        (1, 30, 0.75),
    ],
)
def test_compute_expiry_caps_skew_at_quarter_lifetime(
    lifetime: int, skew: int, expected_after_sent: float
) -> None:
    """Skew never exceeds a quarter of the lifetime, so a short token is not born expired."""
    expiry = compute_expiry(NOW, lifetime * S, skew * S)
    assert expiry == NOW + timedelta(seconds=expected_after_sent)
    assert expiry > NOW


@pytest.mark.parametrize("remaining", [0.0, 0.5, 29.9, 30.0, 30.4, 31.0, 90.7, 3600.0, 86400.25])
@pytest.mark.parametrize("min_validity", [0, 30])
def test_cache_ttl_never_outlives_servability(remaining: float, min_validity: int) -> None:
    """Right up to the moment the cache entry expires, the token is still servable."""
    expires = NOW + timedelta(seconds=remaining)
    ttl = cache_ttl_seconds(NOW, expires, min_validity * S)
    assert isinstance(ttl, int)
    assert ttl >= 0
    if ttl > 0:
        assert is_servable(NOW + ttl * S, expires, min_validity * S)


@pytest.mark.parametrize(("remaining", "min_validity"), [(29, 30), (0, 30), (-10, 0), (-3600, 30)])
def test_cache_ttl_is_zero_when_not_servable(remaining: int, min_validity: int) -> None:
    """A token that may not be served is not cached."""
    expires = NOW + remaining * S
    assert not is_servable(NOW, expires, min_validity * S)
    assert cache_ttl_seconds(NOW, expires, min_validity * S) == 0


def test_cache_ttl_exact_value() -> None:
    """TTL is the whole seconds left before servability ends."""
    assert cache_ttl_seconds(NOW, NOW + 3600 * S, 30 * S) == 3570


class _Extreme(random.Random):
    """An rng whose uniform() returns the low or the high end of the range."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 4, 5])
def test_backoff_grows_exponentially(attempt: int) -> None:
    """The ceiling doubles with each attempt (base 2 s: 2, 4, 8...)."""
    ceiling = 2.0 * 2**attempt
    assert backoff_seconds(attempt, rng=_Extreme(high=True)) == ceiling
    assert backoff_seconds(attempt, rng=_Extreme(high=False)) == ceiling / 2


@pytest.mark.parametrize("attempt", range(12))
def test_backoff_jitter_within_half_ceiling_and_ceiling(attempt: int) -> None:
    """Every jittered delay lies in [ceiling/2, ceiling], and the jitter actually varies."""
    rng = random.Random(attempt)
    ceiling = min(600.0, 2.0 * 2**attempt)
    delays = [backoff_seconds(attempt, rng=rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("attempt", [10, 20, 64, 1000, 1100, 10_000])
def test_backoff_is_capped_for_any_attempt(attempt: int) -> None:
    """However many attempts, the delay never exceeds the cap (and never overflows)."""
    rng = random.Random(attempt)
    for _ in range(50):
        assert 300.0 <= backoff_seconds(attempt, cap=600.0, rng=rng) <= 600.0


def test_backoff_negative_attempt_treated_as_zero() -> None:
    """A negative attempt count behaves like the first attempt."""
    assert backoff_seconds(-3, rng=_Extreme(high=True)) == 2.0


def test_backoff_honours_retry_after() -> None:
    """A provider's Retry-After longer than the jittered delay wins."""
    rng = random.Random(1)
    for attempt in range(4):
        assert backoff_seconds(attempt, retry_after=120.0, rng=rng) == 120.0


def test_backoff_retry_after_shorter_than_jitter_keeps_jitter() -> None:
    """A Retry-After shorter than the backoff does not shorten it."""
    assert backoff_seconds(5, retry_after=1.0, rng=_Extreme(high=False)) == 32.0


@pytest.mark.parametrize("retry_after", [601.0, 3600.0, 86400.0, float("inf")])
def test_backoff_retry_after_never_above_cap(retry_after: float) -> None:
    """A huge Retry-After is capped."""
    assert backoff_seconds(0, cap=600.0, retry_after=retry_after, rng=random.Random(0)) == 600.0
