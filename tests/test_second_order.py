"""Second derivatives in every mode, as jax's own ``odeint`` tests check them.

Problems ported from ``jax.experimental.ode``'s test suite (tests/ode_test.py:
pendulum, decay, swoop, pytree state), written with diffode's ``f(t, y, args)``.
``jax.test_util.check_grads(order=2, modes=["fwd", "rev"])`` compares JVPs and VJPs
of the solve and of its derivatives with finite differences: forward over forward,
reverse over forward, forward over reverse and reverse over reverse.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import diffode

from .test_transform_matrix import METHODS

# Solves at 1e-10 leave derivative errors of ~1e-8; check_grads' finite differences
# (eps 1e-4 here) are accurate to ~1e-8 on these smooth problems.
TOL = dict(atol=1e-4, rtol=1e-4, eps=1e-4)


def _solver(f, method):
    def run(y0, ts, *args):
        return diffode.solve(f, y0, ts, args, sensitivity=method, rtol=1e-10, atol=1e-10).ys

    return run


def pendulum(t, y, args):
    b, c = args
    theta, omega = y[0], y[1]
    return jnp.stack([omega, -b * omega - c * jnp.sin(theta)])


def decay(t, y, args):
    a1, a2 = args
    return -jnp.sqrt(t) - y + a1 - jnp.mean((y + a2) ** 2)


def swoop(t, y, args):
    a1, a2 = args
    return y - jnp.sin(t) - jnp.cos(t) * a1 + a2


def tree_negative(t, y, args):
    return jax.tree_util.tree_map(jnp.negative, y)


# Auto is left out: on this problem (n (p + 1) = 6) it is ForwardSensitivity.
@pytest.mark.parametrize("method", [m for m in METHODS if m != "Auto"])
def test_pendulum(method):
    y0 = jnp.array([np.pi - 0.1, 0.0])
    ts = jnp.linspace(0.0, 2.0, 5)
    check_grads(
        jax.jit(_solver(pendulum, METHODS[method])), (y0, ts, 0.25, 9.8), order=2, modes=["fwd", "rev"], **TOL
    )


def test_decay_swoop_and_pytree_state():
    """The other three problems of jax's suite, in one function (one set of compilations),
    with the default method: reverse mode and reverse over reverse (the pendulum checks
    the mixed orders for every method)."""
    rng = np.random.default_rng(0)
    y_decay = jnp.asarray(rng.standard_normal(3))
    y_swoop = jnp.linspace(0.1, 0.9, 10)
    y_tree = (jnp.array(-0.1), jnp.array([[[0.1]]]))
    ts = jnp.array([0.1, 0.2])

    def run(y_decay, y_swoop, y_tree, ts, a1, a2):
        def solve(f, y0, args):
            return diffode.solve(f, y0, ts, args, rtol=1e-10, atol=1e-10).ys

        return (
            solve(decay, y_decay, (a1, a2)),
            solve(swoop, y_swoop, (a1, a2)),
            solve(tree_negative, y_tree, None),
        )

    check_grads(jax.jit(run), (y_decay, y_swoop, y_tree, ts, 0.3, 0.7), order=2, modes=["rev"], **TOL)
