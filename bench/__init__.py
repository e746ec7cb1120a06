"""Benchmarks: each module runs with one command, e.g. ``.venv/bin/python -m bench.scan_cost``.

See bench/README.md for what each one measures, its floor and its target.
"""
