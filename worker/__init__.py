"""The Celery application: ``celery -A worker worker`` and ``celery -A worker beat``.

Configuration comes from grantkeeper's settings, read once when the process imports this
module. Beat runs RedBeat, whose Redis lock lets a second beat process stand by instead of
scheduling everything twice.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from config.settings import describe_validation_error
from worker.app import create_app

try:
    app = create_app()
except ValidationError as _exc:
    # One line per problem, no traceback, inputs never echoed (they hold secrets).
    print(f"grantkeeper: invalid configuration: {describe_validation_error(_exc)}", file=sys.stderr)
    raise SystemExit(78) from None

__all__ = ["app"]
