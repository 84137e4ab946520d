"""Saving options: every accepted step (``solve(..., dense=True).steps()``) and a function
of the state instead of the state (``save_fn``).

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
    sol = diffode.solve(
        decay, Y0, jnp.array([0.0, 2.0]), 0.5, dense=True, max_steps=64, rtol=1e-8, atol=1e-10
    )
    t, y, count = sol.steps()
    n = int(count)
    assert n == int(sol.stats["num_accepted"]) + 1 and t.shape == (65,)
    assert float(t[0]) == 0.0 and float(t[n - 1]) == 2.0 and np.all(np.diff(np.asarray(t[:n])) > 0)
    np.testing.assert_allclose(
        y["a"][:n], np.exp(-0.5 * np.asarray(t[:n]))[:, None] * np.array([1.0, 2.0]), rtol=1e-6
    )
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


# save_fn: a function of the state kept at each save time. Reference: the same
# function applied to a full solve's saved states, differentiated by
# ForwardSensitivity (an independent method); both solves at rtol 1e-10.


def lotka_volterra(t, y, p):
    return jnp.stack([p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1]])


P = jnp.array([1.5, 1.0, 3.0, 1.0])
LV_TS = jnp.linspace(0.0, 5.0, 21)
SCALE = jnp.asarray(2.0)  # closed over by the observation


def observe(t, y, p):  # depends on t, the state, args and a closed-over array; a pytree
    return {"log_prey": jnp.log(y[0] * SCALE) + p[0] * t, "total": jnp.sum(y)}


def observed(p, ts, y0, **kw):
    return diffode.solve(lotka_volterra, y0, ts, p, rtol=1e-10, atol=1e-12, save_fn=observe, **kw).ys


def reference(p, ts, y0, **kw):
    ys = diffode.solve(
        lotka_volterra, y0, ts, p, rtol=1e-10, atol=1e-12, sensitivity=diffode.ForwardSensitivity(), **kw
    ).ys
    return jax.vmap(lambda t, y: observe(t, y, p))(ts, ys)


@pytest.mark.parametrize(
    "kw", [{}, dict(tstops=[1.3]), dict(adaptive=False, dt0=0.01)], ids=["adaptive", "tstops", "fixed"]
)
def test_save_fn_values_and_derivatives(kw):
    """Values equal the function of the full solve's states; jit(jacrev) and jacfwd with
    respect to args, ts and y0 match the reference (1e-6 absolute on entries up to ~1e2:
    the ts-derivatives of the reference carry its own 1e-10-tolerance error)."""
    y0 = jnp.array([1.0, 1.0])
    got = observed(P, LV_TS, y0, **kw)
    ref = reference(P, LV_TS, y0, **kw)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12)
    ref_j = jax.jacfwd(lambda *a: reference(*a, **kw), argnums=(0, 1, 2))(P, LV_TS, y0)
    for jac in (
        jax.jit(jax.jacrev(lambda *a: observed(*a, **kw), argnums=(0, 1, 2))),
        jax.jacfwd(lambda *a: observed(*a, **kw), argnums=(0, 1, 2)),
    ):
        for g, r in zip(jax.tree_util.tree_leaves(jac(P, LV_TS, y0)), jax.tree_util.tree_leaves(ref_j)):
            np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-6)


def test_save_fn_batched_memory_and_errors():
    """jit(vmap(grad)) agrees with the reference; a large state's solve keeps no
    state-sized save buffer; unsupported combinations raise."""
    y0s = jnp.array([[1.0, 1.0], [1.2, 0.8]])
    loss = lambda fn: lambda y0: jnp.sum(fn(P, LV_TS, y0)["log_prey"])  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(loss(observed))))(y0s), jax.vmap(jax.grad(loss(reference)))(y0s), rtol=1e-8
    )

    n, ts = 20_000, jnp.linspace(0.0, 1.0, 100)  # all the states saved: 16 MB

    def compiled_bytes(**kw):
        fn = jax.jit(lambda y0: diffode.solve(lambda t, y, k: -k * y, y0, ts, 0.5, **kw).ys)
        m = fn.lower(jnp.ones(n)).compile().memory_analysis()
        return m.temp_size_in_bytes + m.output_size_in_bytes

    assert compiled_bytes() > 100 * n * 8
    assert compiled_bytes(save_fn=lambda t, y, k: jnp.mean(y)) < 100 * n * 8 / 4

    with pytest.raises(ValueError, match="differentiated by Direct"):
        observed(P, LV_TS, y0s[0], sensitivity=diffode.BacksolveAdjoint())
    with pytest.raises(NotImplementedError, match="events"):
        observed(P, LV_TS, y0s[0], events=diffode.Event(lambda t, y, p: y[0] - 0.5))
    with pytest.raises(ValueError, match="real floating arrays"):
        diffode.solve(lotka_volterra, y0s[0], LV_TS, P, save_fn=lambda t, y, p: y[0] > 1)
