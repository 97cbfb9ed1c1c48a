"""Property-based fuzzing (hypothesis), bounded for CI: a fixed number of examples per test, derandomized (the
same examples on every run, so a failure reproduces), no example database written to the tree."""

import os

from hypothesis import HealthCheck, settings

# About a minute for the whole folder on a 2-core CI machine; raise with HYPOTHESIS_PROFILE=long for a deeper run.
settings.register_profile(
    "ci",
    max_examples=500,
    deadline=None,  # shared CPUs: per-example timing is noise, the work bounds are asserted by the tests
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", max_examples=5000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
