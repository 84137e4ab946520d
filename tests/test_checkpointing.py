"""Direct's checkpointing: recursive bisection stores O(log N) states and gives the same
gradient as storing every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode.sensitivity.direct import stored_states


def _field(t, y, k):
    # A 200-component linear decay with a periodic forcing: many steps, smooth.
    return -k * y + jnp.sin(t) * jnp.linspace(0.0, 1.0, y.shape[0])


Y0 = jnp.linspace(1.0, 2.0, 200)


def _grad(method, max_steps, t1=30.0):
    def loss(k):
        ys = diffode.solve(
            _field, Y0, jnp.array([0.0, t1]), k, sensitivity=method, rtol=1e-8, atol=1e-8, max_steps=max_steps
        ).ys
        return jnp.sum(ys[-1] ** 2)

    return jax.jit(jax.grad(loss))


@pytest.mark.parametrize("checkpoints", ["recursive", 7])
def test_gradient_equals_storing_every_step(checkpoints):
    k = jnp.array(0.3)
    full = _grad(diffode.Direct(), 4096)(k)
    got = _grad(diffode.Direct(checkpoints=checkpoints), 4096)(k)
    # The recomputed steps repeat the recorded ones exactly (same t, h, arithmetic).
    np.testing.assert_allclose(got, full, rtol=1e-12)
    # vmap: members with different step counts share the bisection's loop.
    ks = jnp.array([0.3, 1.7])
    np.testing.assert_allclose(
        jax.vmap(_grad(diffode.Direct(checkpoints=checkpoints), 4096))(ks),
        jax.vmap(_grad(diffode.Direct(), 4096))(ks),
        rtol=1e-12,
    )


def test_recursive_storage_grows_like_log_of_max_steps():
    counts = {n: stored_states(diffode.Direct(checkpoints="recursive"), n) for n in (2**8, 2**12, 2**16)}
    assert counts[2**16] - counts[2**8] == 8  # one state per doubling
    assert all(c <= np.log2(n) + 2 for n, c in counts.items())
    assert stored_states(diffode.Direct(), 2**12) == 2**12


def _temp_bytes(method, max_steps):
    compiled = _grad(method, max_steps).lower(jnp.array(0.3)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_recursive_compiled_memory_does_not_follow_max_steps():
    # Compiled temporaries: storing every step grows with max_steps * n; the recursive
    # schedule only with log(max_steps) * n (the step times and sizes, two scalars per
    # step, are always stored).
    state = Y0.size * 8
    full = _temp_bytes(diffode.Direct(), 2**13) - _temp_bytes(diffode.Direct(), 2**10)
    rec = _temp_bytes(diffode.Direct(checkpoints="recursive"), 2**13) - _temp_bytes(
        diffode.Direct(checkpoints="recursive"), 2**10
    )
    assert full > (2**13 - 2**10) * state * 0.9
    assert rec < 4 * 2 * 8 * (2**13 - 2**10) + 8 * state
