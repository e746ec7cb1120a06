"""Pure timing decisions. Every function takes ``now``; none reads a clock.

Why the lifetime matters: a token that lives shorter than the refresh margin would be "born
due" and refreshed in a loop (the Authlib failure). The effective margin is therefore at most
half the token's lifetime: such a token is still served while valid and refreshed promptly.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta


def effective_margin(
    margin: timedelta, issued_at: datetime | None, expires_at: datetime
) -> timedelta:
    if issued_at is None:
        return margin
    lifetime = expires_at - issued_at
    return min(margin, max(lifetime / 2, timedelta(0)))


def refresh_due_at(margin: timedelta, issued_at: datetime | None, expires_at: datetime) -> datetime:
    """The moment a proactive refresh should happen."""
    return expires_at - effective_margin(margin, issued_at, expires_at)


def is_due(
    now: datetime, margin: timedelta, issued_at: datetime | None, expires_at: datetime | None
) -> bool:
    """Whether a connection should be refreshed now. Unknown expiry means: refresh."""
    if expires_at is None:
        return True
    return now >= refresh_due_at(margin, issued_at, expires_at)


def is_servable(now: datetime, expires_at: datetime | None, min_validity: timedelta) -> bool:
    """Whether a token may be handed to a caller: valid for at least ``min_validity`` more."""
    return expires_at is not None and expires_at - now >= min_validity


def compute_expiry(sent_at: datetime, lifetime: timedelta, skew: timedelta) -> datetime:
    """Expiry counted from when the request was *sent*, minus a skew allowance.

    The skew is capped at a quarter of the lifetime so a short-lived token is not born expired.
    """
    return sent_at + lifetime - min(skew, lifetime / 4)


def cache_ttl_seconds(now: datetime, expires_at: datetime, min_validity: timedelta) -> int:
    """A cache TTL that ends before the token stops being servable; 0 means: do not cache."""
    remaining = (expires_at - now - min_validity).total_seconds()
    return max(int(remaining), 0)


def backoff_seconds(
    attempt: int,
    *,
    base: float = 2.0,
    cap: float = 600.0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with full jitter, honouring a provider's Retry-After, capped."""
    # The exponent is bounded so a huge attempt count saturates at the cap instead of
    # overflowing float conversion (2 ** 1024 does not fit a float).
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 1000))
    jittered = (rng or random).uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        return min(cap, max(jittered, retry_after))
    return jittered


def spread_countdown(due_at: datetime, now: datetime, window: float, rng: random.Random) -> float:
    """A jittered delay that spreads a scan's burst but never pushes a refresh past its due
    moment by more than ``window`` seconds, and never beyond the window."""
    slack = max((due_at - now).total_seconds(), 0.0)
    return rng.uniform(0.0, min(window, slack)) if slack > 0 else 0.0
