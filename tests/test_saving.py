"""Saving every accepted step: ``solve(..., dense=True).steps()``.

Reference: exponential decay ``y' = -k y``, ``y(t) = y0 e^{-k t}``; the states at the
step ends carry the solver's global error, below 1e-6 relative at rtol 1e-8. The
derivative is checked between forward mode (through the loop) and reverse mode
(Direct's replay), two independent computations; the step ends themselves depend on
``k`` through the step-size controller, which both treat alike (the steps are the
solver's discrete choices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode

Y0 = {"a": jnp.array([1.0, 2.0])}


def decay(t, y, k):
    return {"a": -k * y["a"]}


def steps(k, ts=jnp.array([0.0, 2.0])):
    return diffode.solve(decay, Y0, ts, k, dense=True, max_steps=64, rtol=1e-8, atol=1e-10).steps()


def test_every_accepted_step_is_kept():
    sol = diffode.solve(decay, Y0, jnp.array([0.0, 2.0]), 0.5, dense=True, max_steps=64, rtol=1e-8, atol=1e-10)
    t, y, count = sol.steps()
    n = int(count)
    assert n == int(sol.stats["num_accepted"]) + 1 and t.shape == (65,)
    assert float(t[0]) == 0.0 and float(t[n - 1]) == 2.0 and np.all(np.diff(np.asarray(t[:n])) > 0)
    np.testing.assert_allclose(y["a"][:n], np.exp(-0.5 * np.asarray(t[:n]))[:, None] * np.array([1.0, 2.0]),
                               rtol=1e-6)
    assert np.all(np.isnan(np.asarray(t[n:]))) and np.all(np.isnan(np.asarray(y["a"][n:])))
    back = steps(0.5, jnp.array([2.0, 0.0]))  # backwards: times run from 2 down to 0
    assert float(back[0][0]) == 2.0 and float(back[0][int(back[2]) - 1]) == 0.0
    with pytest.raises(ValueError, match="dense=True"):
        diffode.solve(decay, Y0, jnp.array([0.0, 2.0]), 0.5).steps()


def test_steps_are_differentiable_and_batch():
    loss = lambda k: jnp.nansum(steps(k)[1]["a"] ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(0.5), jax.jacfwd(loss)(0.5), rtol=1e-10)
    ks = jnp.array([0.5, 1.0, 2.0])
    t, y, count = jax.vmap(steps)(ks)
    assert t.shape == (3, 65) and y["a"].shape == (3, 65, 2)
    for m, k in enumerate(ks):
        tm, ym, cm = steps(k)
        assert int(count[m]) == int(cm)
        np.testing.assert_allclose(y["a"][m, : int(cm)], ym["a"][: int(cm)], rtol=1e-12)
