"""Test-session configuration.

The tests compare against references to ~1e-10 and below, so they run in
float64. diffode never enables x64 itself (tests/test_errors.py checks that in a
clean subprocess); the test session turns it on here, at import, before any
array exists. Float32 tests pass explicit float32 arrays.
"""

import jax

jax.config.update("jax_enable_x64", True)
