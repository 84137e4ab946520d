"""Derivatives through dense output (``solve(..., dense=True)`` and ``Solution.evaluate``).

Reference: exponential decay ``y(t) = y0 exp(-k t)`` (closed form), and the
agreement of forward mode (JVP through the loop) with reverse mode (replay of the
recorded steps): both are exact derivatives of the same discrete interpolant, so
they agree to rounding error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode

Y0 = jnp.array([1.0, 2.0])


def decay(t, y, k):
    return -k * y


def _evaluate(k, tq, y0=Y0, method=None):
    sol = diffode.solve(
        decay, y0, jnp.array([0.0, 2.0]), k, dense=True, sensitivity=method, rtol=1e-10, atol=1e-10
    )
    return sol.evaluate(tq)


def _loss(k, tq):
    return jnp.sum(_evaluate(k, tq))


@pytest.mark.parametrize(
    "method",
    [None, diffode.Direct(checkpoints="recursive"), diffode.BacksolveAdjoint()],
    ids=["Auto", "Direct-recursive", "BacksolveAdjoint"],
)
def test_gradient_of_evaluate_matches_closed_form(method):
    k, tq = 0.7, jnp.array([0.3, 1.3, 1.9])

    def loss(k, tq):
        return jnp.sum(_evaluate(k, tq, method=method))

    dk, dt = jax.jit(jax.grad(loss, argnums=(0, 1)))(k, tq)
    e = np.exp(-k * np.asarray(tq)) * 3.0
    np.testing.assert_allclose(dk, np.sum(-np.asarray(tq) * e), rtol=1e-7)
    np.testing.assert_allclose(dt, -k * e, rtol=1e-7)
    # Eager reverse mode and forward mode: the same discrete derivative.
    dk_eager = jax.grad(loss)(k, tq)
    dk_fwd = jax.jvp(lambda k: loss(k, tq), (k,), (1.0,))[1]
    np.testing.assert_allclose(dk_eager, dk, rtol=1e-12)
    np.testing.assert_allclose(dk_fwd, dk, rtol=1e-10)


def test_gradient_with_respect_to_y0_and_under_vmap():
    g = jax.jit(
        jax.vmap(jax.grad(lambda y0, k: jnp.sum(_evaluate(k, jnp.array(1.1), y0=y0))), in_axes=(None, 0))
    )(Y0, jnp.array([0.5, 0.9]))
    np.testing.assert_allclose(g, np.exp(-np.array([0.5, 0.9]) * 1.1)[:, None] * np.ones((1, 2)), rtol=1e-7)


def test_hessian_of_evaluate():
    k, tq = 0.7, jnp.array(1.3)
    h = jax.jit(jax.hessian(_loss))(k, tq)
    np.testing.assert_allclose(h, 3.0 * 1.3**2 * np.exp(-k * 1.3), rtol=1e-6)


def test_reverse_over_reverse_raises_a_clear_error():
    with pytest.raises(NotImplementedError, match="dense output"):
        jax.grad(jax.grad(_loss))(0.7, jnp.array(1.3))
