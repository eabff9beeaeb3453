"""Benchmarks for ``make bench``.

Each module here defines ``run(quick: bool = False)``, a generator of result
dicts ``{"name": ..., "value": ..., "unit": ..., **context}``; ``sim/bench.py``
prints each as one JSON line. Wall-clock figures belong here, never in tests.
"""
