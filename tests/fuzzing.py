"""How the reader fuzzers run: few examples in `make test`, many in `make fuzz`, each bounded.

A fuzzer is a Hypothesis test decorated with `@fuzzer(...)` instead of `@given(...)`: it is
marked `fuzz` (so `make fuzz`, which selects `-m fuzz`, runs it), takes the `ci` settings profile
(200 examples) or, with LORAMERGE_FUZZ=1, the `fuzz` one (FUZZ_EXAMPLES), and every example runs
with at most EXAMPLE_MEMORY more address space (RLIMIT_AS: an allocation past it raises
MemoryError, a failure) and EXAMPLE_SECONDS of time (past it the process prints every thread's
stack and exits: a hang).
"""

from __future__ import annotations

import faulthandler
import functools
import os
import resource
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings

FUZZING = os.environ.get("LORAMERGE_FUZZ") == "1"
FUZZ_EXAMPLES = 10_000
EXAMPLE_MEMORY = 1 << 30
EXAMPLE_SECONDS = 30

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("fuzz", settings.get_profile("ci"), max_examples=FUZZ_EXAMPLES)
PROFILE = settings.get_profile("fuzz" if FUZZING else "ci")


def _address_space() -> int:
    """Bytes of address space this process holds now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def fuzzer(**strategies) -> Callable:
    """`@given(**strategies)` with the active profile, the `fuzz` mark and per-example bounds."""

    def decorate(test: Callable) -> Callable:
        @functools.wraps(test)
        def bounded(*args, **kwargs):
            limits = resource.getrlimit(resource.RLIMIT_AS)
            bound = _address_space() + EXAMPLE_MEMORY
            if limits[1] != resource.RLIM_INFINITY:
                bound = min(bound, limits[1])
            resource.setrlimit(resource.RLIMIT_AS, (bound, limits[1]))
            faulthandler.dump_traceback_later(EXAMPLE_SECONDS, exit=True)
            try:
                return test(*args, **kwargs)
            finally:
                faulthandler.cancel_dump_traceback_later()
                resource.setrlimit(resource.RLIMIT_AS, limits)

        return pytest.mark.fuzz(PROFILE(given(**strategies)(bounded)))

    return decorate
