"""Thin Celery tasks: ids in, one service call, nothing secret in or out."""
