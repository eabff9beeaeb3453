"""Hypothesis settings of the property tests (tests/test_asm_fuzz.py, tests/test_driver_fuzz.py).

``FAST`` runs in ``make test``: a bounded number of examples, derandomized (the examples follow from the test's
name, so a failure recurs on every run and machine). ``LONG`` runs under ``make test-long`` (tests marked
``long``): at least 10,000 examples from a random seed, or from ``IANUS_FUZZ_SEED``; the seed is printed with a
failing example (``IANUS_FUZZ_SEED=N pytest -m long ...`` reruns it), and hypothesis prints a
``@reproduce_failure`` blob too.
"""

import os
import random

from hypothesis import HealthCheck, settings

FAST_EXAMPLES = int(os.environ.get("IANUS_FUZZ_FAST_EXAMPLES", "300"))
LONG_EXAMPLES = int(os.environ.get("IANUS_FUZZ_LONG_EXAMPLES", "10000"))
SEED = int(os.environ.get("IANUS_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))

settings.register_profile("ianus-fast", max_examples=FAST_EXAMPLES, derandomize=True, deadline=None,
                          print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ianus-long", max_examples=LONG_EXAMPLES, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings.get_profile("ianus-fast")
LONG = settings.get_profile("ianus-long")


SEED_NOTE = f"long run seeded with IANUS_FUZZ_SEED={SEED}: `IANUS_FUZZ_SEED={SEED} make test-long` reruns it"
