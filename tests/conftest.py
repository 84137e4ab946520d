"""Test-session configuration.

The tests compare against references to ~1e-10 and below, so they run in
float64. diffode never enables x64 itself (tests/test_errors.py checks that in a
clean subprocess); the test session turns it on here, at import, before any
array exists. Float32 tests pass explicit float32 arrays.
"""

import os

# The suite is compile-bound (hundreds of small programs, each run a few times), so it
# compiles at XLA's lowest backend optimisation level: measured 16% less wall time on
# test_transform_matrix and test_solve. The programs compute the same numbers (within
# rounding); set before jax creates its CPU backend, added to any flags already given.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
