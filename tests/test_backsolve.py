"""BacksolveAdjoint: continuous adjoint with a backward re-solve of the state.

References: hand-written forward sensitivity equations solved by SciPy
(``problems.lotka_volterra_sensitivities``) and closed forms (the expm check of the linear
system is in test_sensitivity_agreement.py, shared with InterpolatingAdjoint).
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import diffode
from diffode import problems
from diffode.sensitivity.backsolve import BacksolveAdjoint

from .test_errors import SOLVE_ERRORS, own_message

TS_LV = np.array([0.0, 1.3, 2.9, 5.0, 7.7, 10.0])
W_LV = np.random.default_rng(0).normal(size=(len(TS_LV), 2))


def lv_loss(sens, solver=None, tol=1e-10):
    def loss(y0, ts, args):
        sol = diffode.solve(
            problems.lotka_volterra_rhs,
            y0,
            ts,
            args,
            solver=solver,
            rtol=tol,
            atol=tol,
            sensitivity=sens,
            max_steps=100_000,
        )
        return jnp.sum(jnp.asarray(W_LV) * sol.ys)

    return loss


def lv_reference():
    return problems.lotka_volterra_weighted_gradient(TS_LV, W_LV)


def assert_close_relative(got, want, rel):
    for name, g, w in zip(("y0", "ts", "args"), got, want):
        err = np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w))
        assert err < rel, f"d/d{name}: relative error {err:.2e} (got {g}, want {w})"


@pytest.mark.parametrize("seminorm", [False, True])
def test_lotka_volterra_all_derivatives(seminorm):
    # At rtol = atol = 1e-10 the adjoint's errors are ~1e-10 relative (measured
    # 2e-10 to 5e-10); 1e-6 leaves room for platform differences only.
    p = problems.lotka_volterra()
    loss = jax.jit(jax.grad(lv_loss(BacksolveAdjoint(seminorm=seminorm)), argnums=(0, 1, 2)))
    got = loss(p.y0, jnp.asarray(TS_LV), p.args)
    assert_close_relative(got, lv_reference(), 1e-6)
    # ts[0] and ts[-1] are covered by the max above; check them on their own too.
    ref_ts = lv_reference()[1]
    for i in (0, -1):
        assert abs(got[1][i] - ref_ts[i]) < 1e-6 * abs(ref_ts[i])


def test_lotka_volterra_implicit_solver():
    # Kvaerno5 (Newton while_loops in every step: the backward solve only runs
    # it forwards, on the augmented system with a jacfwd Jacobian).
    p = problems.lotka_volterra()
    loss = jax.jit(
        jax.grad(lv_loss(BacksolveAdjoint(), solver=diffode.Kvaerno5(), tol=1e-9), argnums=(0, 1, 2))
    )
    got = loss(p.y0, jnp.asarray(TS_LV), p.args)
    assert_close_relative(got, lv_reference(), 1e-5)


def exact_decay_loss(y0, ts, k):
    return jnp.sum((y0[None] * jnp.exp(-k[None] * (ts[:, None] - ts[0]))) ** 2)


@pytest.mark.parametrize("ts", [[0.0, 0.5, 2.0], [2.0, 1.0, -0.5]], ids=["increasing", "decreasing"])
def test_exponential_decay_closed_form(ts):
    p = problems.exponential_decay()
    ts = jnp.asarray(ts)

    def loss(y0, ts, k):
        ys = diffode.solve(
            problems.exponential_decay_rhs, y0, ts, k, rtol=1e-10, atol=1e-10, sensitivity=BacksolveAdjoint()
        ).ys
        return jnp.sum(ys**2)

    got = jax.grad(loss, argnums=(0, 1, 2))(p.y0, ts, p.args)
    want = jax.grad(exact_decay_loss, argnums=(0, 1, 2))(p.y0, ts, p.args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-9)


def test_jit_vmap_pytree_state():
    # vmap over initial conditions of a pytree state, inside jit: each batch
    # member must match its own un-batched gradient.
    p = problems.lotka_volterra()
    ts = jnp.linspace(0.0, 3.0, 4)

    def f(t, y, args):
        out = problems.lotka_volterra_rhs(t, jnp.stack([y["prey"], y["pred"]]), args)
        return {"prey": out[0], "pred": out[1]}

    def loss(args, prey):
        ys = diffode.solve(
            f,
            {"prey": prey, "pred": jnp.asarray(1.0)},
            ts,
            args,
            rtol=1e-8,
            atol=1e-8,
            sensitivity=BacksolveAdjoint(),
        ).ys
        return jnp.sum(ys["prey"] * ys["pred"])

    prey = jnp.asarray([0.5, 1.0, 2.0])
    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(p.args, prey)
    single = jax.jit(jax.grad(loss))
    for j in range(3):
        np.testing.assert_allclose(batched[j], single(p.args, prey[j]), rtol=1e-10)
    assert np.all(np.isfinite(batched)) and np.ptp(batched[:, 0]) > 1e-3  # members differ


def test_equinox_mlp_args():
    key = jax.random.PRNGKey(0)
    mlp = eqx.nn.MLP(2, 2, width_size=8, depth=1, activation=jnp.tanh, key=key)
    y0 = jnp.asarray([0.5, -0.3])
    ts = jnp.linspace(0.0, 1.0, 3)

    def f(t, y, m):
        return m(y)

    def loss(diff, sens):
        m = eqx.combine(diff, static)
        return jnp.sum(diffode.solve(f, y0, ts, m, rtol=1e-9, atol=1e-9, sensitivity=sens).ys ** 2)

    diff, static = eqx.partition(mlp, eqx.is_inexact_array)
    got = ravel_pytree(jax.grad(loss)(diff, BacksolveAdjoint()))[0]
    # Directional derivative by forward mode through the loop (sensitivity=None).
    flat, unravel = ravel_pytree(diff)
    v = jnp.asarray(np.random.default_rng(2).normal(size=flat.shape))
    _, want = jax.jvp(lambda x: loss(unravel(x), diffode.Direct()), (flat,), (v,))
    np.testing.assert_allclose(jnp.dot(got, v), want, rtol=1e-6)


def test_forward_mode_falls_back_to_the_loop():
    p = problems.lotka_volterra()
    loss = lv_loss(BacksolveAdjoint())
    ts = jnp.asarray(TS_LV)
    fwd = jax.jacfwd(loss, argnums=2)(p.y0, ts, p.args)
    np.testing.assert_allclose(fwd, lv_reference()[2], rtol=1e-6)


def test_memory_does_not_grow_with_max_steps():
    p = problems.lotka_volterra()
    ts = p.ts(11)

    def temp_bytes(max_steps):
        def loss(args):
            return jnp.sum(
                diffode.solve(p.f, p.y0, ts, args, sensitivity=BacksolveAdjoint(), max_steps=max_steps).ys
                ** 2
            )

        return jax.jit(jax.grad(loss)).lower(p.args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1000), temp_bytes(100_000)
    assert large <= small, (small, large)


def test_failed_backward_solve_raises_or_gives_nan():
    # f's value is exact, but its VJP is NaN (the gradient of a norm at 0): the
    # backward solve fails at once. throw=True raises an error naming the method
    # and the failure; throw=False makes every cotangent NaN.
    def f(t, y, k):
        return -k * y + jnp.linalg.norm(y - y)

    p = problems.exponential_decay()

    def loss(y0, k, throw):
        sol = diffode.solve(f, y0, jnp.asarray([0.0, 1.0]), k, sensitivity=BacksolveAdjoint(), throw=throw)
        return jnp.sum(sol.ys)

    assert np.isfinite(loss(p.y0, p.args, True))
    with pytest.raises(SOLVE_ERRORS) as info:
        jax.grad(loss, argnums=(0, 1))(p.y0, p.args, True)
    assert "BacksolveAdjoint: the backward (adjoint) solve failed. " + diffode.MESSAGES[
        diffode.Status.NONFINITE_RHS
    ] in own_message(info.value)
    g_y0, g_k = jax.grad(loss, argnums=(0, 1))(p.y0, p.args, False)
    assert np.all(np.isnan(g_y0)) and np.all(np.isnan(g_k))


def test_stiff_backward_solve_failure_is_an_error():
    """Robertson: the backward re-solve of y cannot follow the decaying fast modes
    (they grow backwards in time); the gradient raises instead of returning NaN."""
    p = problems.robertson()
    ts = jnp.asarray([0.0, 1e-3, 0.1, 1.0, 10.0, 100.0])

    def loss(k):
        ys = diffode.solve(
            p.f,
            p.y0,
            ts,
            k,
            solver=diffode.Radau5(),
            rtol=1e-8,
            atol=1e-12,
            sensitivity=BacksolveAdjoint(),
            max_steps=5000,
        ).ys
        return jnp.sum(ys @ jnp.asarray([1.0, 1e4, 1.0]))

    with pytest.raises(SOLVE_ERRORS) as info:
        jax.block_until_ready(eqx.filter_jit(jax.grad(loss))(p.args))
    assert re.search("BacksolveAdjoint: the backward .* InterpolatingAdjoint", own_message(info.value))


def closed_over_decay_loss(k, y0, ts):
    """``exact_decay_loss`` through a solve whose f captures k instead of taking it in args."""
    return jnp.sum(
        diffode.solve(
            lambda t, y, a: -k * y, y0, ts, rtol=1e-10, atol=1e-10, sensitivity=BacksolveAdjoint()
        ).ys
        ** 2
    )


def test_value_closed_over_by_f_is_differentiated():
    # A parameter captured by f instead of passed in args still gets its gradient.
    p = problems.exponential_decay()
    ts = jnp.asarray([0.0, 1.0])
    got = jax.grad(closed_over_decay_loss)(p.args, p.y0, ts)
    want = jax.grad(lambda k: exact_decay_loss(p.y0, ts, k))(p.args)
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_forward_mode_through_a_closed_over_value():
    p = problems.exponential_decay()
    ts = jnp.asarray([0.0, 1.0])
    v = jnp.asarray([1.0, -2.0, 0.5])
    _, got = jax.jvp(lambda k: closed_over_decay_loss(k, p.y0, ts), (p.args,), (v,))
    want = jnp.dot(jax.grad(lambda k: exact_decay_loss(p.y0, ts, k))(p.args), v)
    np.testing.assert_allclose(got, want, rtol=1e-7)
