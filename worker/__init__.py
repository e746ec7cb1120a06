"""The Celery application: ``celery -A worker worker`` and ``celery -A worker beat``.

Configuration comes from grantkeeper's settings, read once when the process imports this
module. Beat runs RedBeat, whose Redis lock lets a second beat process stand by instead of
scheduling everything twice.
"""

from __future__ import annotations

from worker.app import create_app

app = create_app()

__all__ = ["app"]
