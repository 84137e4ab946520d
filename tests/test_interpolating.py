"""InterpolatingAdjoint: continuous adjoint reading y(t) from the forward dense output.

References: hand-written forward sensitivity equations solved by SciPy (Lotka-Volterra
from ``problems``; Robertson written out below) and closed forms (the expm check of the
linear system is in test_sensitivity_agreement.py, shared with BacksolveAdjoint).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import diffode
from diffode import problems
from diffode.sensitivity.interpolating import InterpolatingAdjoint, dense_bytes

TS_LV = np.array([0.0, 1.3, 2.9, 5.0, 7.7, 10.0])
W_LV = np.random.default_rng(0).normal(size=(len(TS_LV), 2))


def lv_grad(sens, solver=None, tol=1e-10, ts=TS_LV, throw=True):
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
            max_steps=20_000,
            throw=throw,
        )
        return jnp.sum(jnp.asarray(W_LV) * sol.ys)

    p = problems.lotka_volterra()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(p.y0, jnp.asarray(ts), p.args)


def lv_reference():
    return problems.lotka_volterra_weighted_gradient(TS_LV, W_LV)


def assert_close_relative(got, want, rel):
    for name, g, w in zip(("y0", "ts", "args"), got, want):
        err = np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w))
        assert err < rel, f"d/d{name}: relative error {err:.2e} (got {g}, want {w})"


@pytest.mark.parametrize("checkpoints", [None, 2], ids=["dense", "checkpoints"])
def test_lotka_volterra_all_derivatives(checkpoints):
    # Measured relative errors ~1e-10 at rtol = atol = 1e-10 (both variants).
    got = lv_grad(InterpolatingAdjoint(checkpoints=checkpoints))
    want = lv_reference()
    assert_close_relative(got, want, 1e-6)
    for i in (0, -1):  # ts[0] and ts[-1] on their own
        assert abs(got[1][i] - want[1][i]) < 1e-6 * abs(want[1][i])


def test_lotka_volterra_decreasing_ts():
    # Integrate from t = 10 back to 0, starting from the reference y(10):
    # ys reversed must have the same derivatives w.r.t. the save times.
    ts_rev = TS_LV[::-1].copy()
    y10 = problems.lotka_volterra_reference(TS_LV)[-1]
    p = problems.lotka_volterra()

    def loss(ts):
        ys = diffode.solve(
            problems.lotka_volterra_rhs,
            jnp.asarray(y10),
            ts,
            p.args,
            rtol=1e-10,
            atol=1e-10,
            sensitivity=InterpolatingAdjoint(),
        ).ys
        return jnp.sum(jnp.asarray(W_LV[::-1]) * ys)

    got = jax.grad(loss)(jnp.asarray(ts_rev))
    # The same trajectory: d/d ts[i] = <w_i, f(ts[i], y_i)> for every i but the
    # start; at the start (t = 10) -<lam, f> with lam from the forward problem.
    # Check the interior ones against the forward-direction reference.
    want = lv_reference()[1][::-1]
    np.testing.assert_allclose(got[1:-1], want[1:-1], rtol=1e-6)
    ys_ref = problems.lotka_volterra_reference(TS_LV)
    f_end = problems._lotka_volterra_rhs_numpy(0.0, ys_ref[0], problems.LV_PARAMS)
    np.testing.assert_allclose(got[-1], W_LV[0] @ f_end, rtol=1e-6)


def test_exponential_decay_closed_form_under_vmap():
    # vmap over the rate constants, inside jit; closed-form reference per member.
    p = problems.exponential_decay()
    ts = jnp.asarray([0.0, 0.5, 2.0])

    def loss(k, y0):
        ys = diffode.solve(
            problems.exponential_decay_rhs,
            y0,
            ts,
            k,
            rtol=1e-10,
            atol=1e-10,
            sensitivity=InterpolatingAdjoint(),
        ).ys
        return jnp.sum(ys**2)

    def exact(k, y0):
        return jnp.sum((y0[None] * jnp.exp(-k[None] * ts[:, None])) ** 2)

    ks = p.args[None] * jnp.asarray([[1.0], [0.5], [2.0]])
    got = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(ks, p.y0)
    want = jax.vmap(jax.grad(exact, argnums=(0, 1)), in_axes=(0, None))(ks, p.y0)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-10)


def test_equinox_mlp_args():
    mlp = eqx.nn.MLP(2, 2, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    y0 = jnp.asarray([0.5, -0.3])
    ts = jnp.linspace(0.0, 1.0, 3)
    diff, static = eqx.partition(mlp, eqx.is_inexact_array)

    def loss(diff, sens):
        m = eqx.combine(diff, static)
        return jnp.sum(
            diffode.solve(lambda t, y, m: m(y), y0, ts, m, rtol=1e-9, atol=1e-9, sensitivity=sens).ys ** 2
        )

    got = ravel_pytree(jax.grad(loss)(diff, InterpolatingAdjoint()))[0]
    flat, unravel = ravel_pytree(diff)
    v = jnp.asarray(np.random.default_rng(2).normal(size=flat.shape))
    _, want = jax.jvp(
        lambda x: loss(unravel(x), diffode.Direct()), (flat,), (v,)
    )  # forward mode through the loop
    np.testing.assert_allclose(jnp.dot(got, v), want, rtol=1e-6)


# --- stiff: Robertson ------------------------------------------------------------

TS_ROB = np.array([0.0, 1e-3, 0.1, 1.0, 10.0, 100.0])
W_ROB = np.array([1.0, 1e4, 1.0])  # y2 is ~1e-5: weight it up


@functools.lru_cache(maxsize=1)
def robertson_reference() -> np.ndarray:
    """d(sum_i W . ys[i]) / dk by the forward sensitivity equations (SciPy Radau, rtol 1e-12)."""
    from scipy.integrate import solve_ivp

    k1, k2, k3 = problems.ROBERTSON_K

    def aug(t, z):
        y1, y2, y3 = z[:3]
        f = [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2**2, k2 * y2**2]
        jac = np.array([[-k1, k3 * y3, k3 * y2], [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2], [0, 2 * k2 * y2, 0]])
        f_k = np.array([[-y1, 0, y2 * y3], [y1, -(y2**2), -y2 * y3], [0, y2**2, 0]])
        return np.concatenate([f, (jac @ z[3:].reshape(3, 3) + f_k).ravel()])

    z0 = np.concatenate([[1.0, 0.0, 0.0], np.zeros(9)])
    sol = solve_ivp(aug, (0.0, TS_ROB[-1]), z0, method="Radau", t_eval=TS_ROB, rtol=1e-12, atol=1e-20)
    assert sol.success
    return np.einsum("j,ijk->k", W_ROB, sol.y.T[:, 3:].reshape(-1, 3, 3))


def test_stiff_robertson_rate_constants():
    # Radau5 at rtol 1e-8: measured relative errors 1e-10 to 1e-9 per rate
    # constant (Rodas5P: ~2e-8). BacksolveAdjoint on the same problem fails its
    # backward solve (the decaying fast modes explode backwards in time): see
    # tests/test_backsolve.py.
    p = problems.robertson()

    def loss(k):
        ys = diffode.solve(
            p.f,
            p.y0,
            jnp.asarray(TS_ROB),
            k,
            solver=diffode.Radau5(),
            rtol=1e-8,
            atol=1e-12,
            sensitivity=InterpolatingAdjoint(),
            max_steps=5000,
        ).ys
        return jnp.sum(ys @ jnp.asarray(W_ROB))

    got = np.asarray(jax.jit(jax.grad(loss))(p.args))
    want = robertson_reference()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_checkpoint_memory_is_bounded():
    # With checkpoints and a fixed per-interval budget, the compiled temporary
    # memory does not depend on max_steps. Without, a max_steps above RECORD_STEPS
    # (4096) records a window of steps instead of the dense output (35 MB at 1e5
    # steps here): what grows is the step times and sizes, 16 bytes per step.
    p = problems.lotka_volterra()
    ts = p.ts(11)

    def temp_bytes(sens, max_steps):
        def loss(args):
            return jnp.sum(diffode.solve(p.f, p.y0, ts, args, sensitivity=sens, max_steps=max_steps).ys ** 2)

        return jax.jit(jax.grad(loss)).lower(p.args).compile().memory_analysis().temp_size_in_bytes

    sens = InterpolatingAdjoint(checkpoints=4, checkpoint_max_steps=200)
    assert temp_bytes(sens, 100_000) <= temp_bytes(sens, 1000)
    small, large = temp_bytes(InterpolatingAdjoint(), 10_000), temp_bytes(InterpolatingAdjoint(), 100_000)
    assert large - small <= 1.25 * 16 * 90_000, (small, large)
    assert large < dense_bytes(diffode.Tsit5(), p.y0, ts, 100_000) / 10


def test_checkpoint_budget_too_small_raises_or_gives_nan():
    # A re-solve that runs out of steps must not pass for a gradient: an error that
    # names the method and the failure (throw=True), or NaN (throw=False).
    sens = InterpolatingAdjoint(checkpoints=1, checkpoint_max_steps=5)
    with pytest.raises((eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)) as info:
        jax.block_until_ready(lv_grad(sens, tol=1e-8))
    assert "InterpolatingAdjoint: the backward (adjoint) solve failed. " + diffode.MESSAGES[
        diffode.Status.MAX_STEPS_REACHED
    ] in str(info.value)
    for g in lv_grad(sens, tol=1e-8, throw=False):
        assert np.all(np.isnan(g))


def test_bad_arguments():
    with pytest.raises(ValueError, match="InterpolatingAdjoint: checkpoints"):
        InterpolatingAdjoint(checkpoints=0)
    with pytest.raises(ValueError, match="InterpolatingAdjoint: checkpoint_max_steps needs checkpoints"):
        InterpolatingAdjoint(checkpoint_max_steps=10)
