"""Radau5 (Radau IIA, order 5): coefficients, convergence order, stiff problems against
analytic solutions and SciPy, dense output, Jacobian reuse, transformations, float32
and Newton failures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems
from diffode.solvers.radau import (
    RADAU_A,
    RADAU_ALPHA,
    RADAU_BETA,
    RADAU_C,
    RADAU_E,
    RADAU_GAMMA,
    RADAU_T,
    RADAU_TI,
    RADAU_VINV,
    Radau5,
)

# ----------------------------------------------------------------------------
# References. NumPy right-hand sides and Jacobians for SciPy (its Python loop
# over ~2e5 evaluations would take minutes with JAX callbacks).
# ----------------------------------------------------------------------------
K1, K2, K3 = problems.ROBERTSON_K
_rob_np, _rob_jac_np = problems.robertson_np, problems.robertson_jac_np


def scipy_reference(name: str, t1: float):
    """:func:`diffode.problems.scipy_radau_reference` (dense), for ``t1`` its end time."""
    assert t1 == (1e5 if name == "robertson" else problems.van_der_pol_stiff().t1)
    return problems.scipy_radau_reference(name)


def scaled_error(ys, ref, rtol, atol):
    """Global error in units of the local tolerance, per component."""
    ys, ref = np.asarray(ys), np.asarray(ref)
    return (np.abs(ys - ref) / (atol + rtol * np.abs(ref))).max(axis=0)


ROB = problems.robertson()
ROB_TS = jnp.asarray(np.concatenate([[0.0], np.logspace(-5, 5, 11)]))


DEFAULT = Radau5()


@functools.partial(jax.jit, static_argnames="solver")
def rob_solve(y0, rtol, atol, solver=DEFAULT):
    return diffode.solve(
        ROB.f,
        y0,
        ROB_TS,
        ROB.args,
        solver=solver,
        rtol=rtol,
        atol=atol,
        max_steps=20000,
        dense=True,
        throw=False,
    )


# ----------------------------------------------------------------------------
# Coefficients.
# ----------------------------------------------------------------------------


def test_coefficients():
    # Radau IIA: c_i are the row sums, c_3 = 1, stiffly accurate (b = last row of A),
    # quadrature order 5 (sum b c^(k-1) = 1/k, k <= 5) and stage order 3.
    b = RADAU_A[2]
    np.testing.assert_allclose(RADAU_A.sum(axis=1), RADAU_C, atol=1e-15)
    for k in range(1, 6):
        assert abs(b @ RADAU_C ** (k - 1) - 1 / k) < 1e-15, k
    for k in range(1, 4):
        np.testing.assert_allclose(RADAU_A @ RADAU_C ** (k - 1), RADAU_C**k / k, atol=1e-15)
    # The published T and T^-1 (16-20 digits) are inverses and block-diagonalise A^-1.
    np.testing.assert_allclose(RADAU_TI @ RADAU_T, np.eye(3), atol=1e-14)
    block = np.array([[RADAU_GAMMA, 0, 0], [0, RADAU_ALPHA, -RADAU_BETA], [0, RADAU_BETA, RADAU_ALPHA]])
    np.testing.assert_allclose(RADAU_TI @ np.linalg.inv(RADAU_A) @ RADAU_T, block, atol=1e-13)
    # Error weights: gamma * (b_hat - b)^T A^-1 for the third-order embedded formula
    # with weight gamma0 = 1/gamma on f(t0, y0) (HW IV.8, (8.19)).
    g0 = 1 / RADAU_GAMMA
    vander = np.stack([np.ones(3), RADAU_C, RADAU_C**2])
    b_hat = np.linalg.solve(vander, [1 - g0, 1 / 2, 1 / 3])
    np.testing.assert_allclose(RADAU_GAMMA * (b_hat - b) @ np.linalg.inv(RADAU_A), RADAU_E, rtol=1e-13)
    # Dense output: q(theta) = sum_j d_j theta^(j+1) with q(c_i) = z_i, so q(1) = z_3.
    np.testing.assert_allclose(np.ones(3) @ RADAU_VINV, [0, 0, 1], atol=1e-13)


def test_properties():
    s = Radau5()
    assert s.order == 5 and s.error_order == 4 and s.embedded
    assert s.stat_names == ("num_jac_evals", "num_lu_decomps", "num_newton_iters")
    with pytest.raises(ValueError):
        Radau5(max_iters=0)
    with pytest.raises(ValueError):
        Radau5(newton_tol=0.0)


# ----------------------------------------------------------------------------
# Convergence order with fixed steps.
# ----------------------------------------------------------------------------

LINEAR = problems.linear_system()
KEPLER = problems.rescaled_kepler(t1=6.0)


def fixed_step_run(problem, n_save, dts, dense_theta=None):
    """Max errors at the save times (and, with ``dense_theta``, at ``t0 + (k + theta) dt``,
    k < 40, inside the steps) for fixed steps ``dts``."""
    ts = problem.ts(n_save)
    k = jnp.arange(40)

    # rtol = atol = 1e-14: Newton converges to roundoff, so only the
    # discretisation error is measured. dt0 is traced: one compilation.
    @jax.jit
    def run(dt):
        sol = diffode.solve(
            problem.f,
            problem.y0,
            ts,
            problem.args,
            solver=Radau5(),
            dt0=dt,
            adaptive=False,
            rtol=1e-14,
            atol=1e-14,
            max_steps=1024,
            dense=dense_theta is not None,
        )
        if dense_theta is None:
            return sol.ys, None
        return sol.ys, sol.evaluate(problem.t0 + (k + dense_theta) * dt)

    exact = np.asarray(jax.vmap(problem.exact)(ts))
    errors, dense_errors = [], []
    for dt in dts:
        ys, yd = run(jnp.asarray(dt))
        errors.append(np.abs(np.asarray(ys) - exact).max())
        if dense_theta is not None:
            tq = problem.t0 + (np.arange(40) + dense_theta) * dt
            dense_errors.append(
                np.abs(np.asarray(yd) - np.asarray(jax.vmap(problem.exact)(jnp.asarray(tq)))).max()
            )
    return np.array(errors), np.array(dense_errors)


def order_slope(dts, errors):
    return np.polyfit(np.log(dts), np.log(errors), 1)[0]


def test_convergence_order_and_dense_output():
    # y' = A y (LINEAR, exact expm): errors 2e-6 .. 2e-12 on this dt range (inspected:
    # asymptotic, observed slope 4.97-5.00). The dense output at theta = 0.37 is the
    # collocation polynomial (degree 3, stage order 3): O(h^4), observed slope
    # 3.9-4.0 on errors 3e-6 .. 8e-10. +-0.3: far too narrow for the neighbouring orders.
    dts = 2.0 ** -np.arange(2, 7)
    errors, dense_errors = fixed_step_run(LINEAR, 6, dts, dense_theta=0.37)
    assert np.all(errors > 1e-13) and np.all(errors < 1e-5), errors
    assert abs(order_slope(dts, errors) - 5) < 0.3, errors
    assert np.all(dense_errors > 1e-13) and np.all(dense_errors < 1e-5), dense_errors
    assert abs(order_slope(dts, dense_errors) - 4) < 0.3, dense_errors


def test_convergence_order_nonlinear():
    # Nonlinear and non-autonomous (the nodes c matter): errors 8e-8 .. 3e-12,
    # observed slope 5.0. Newton no longer converges in 7 iterations at rtol 1e-14
    # from dt = 1/8 on (see test_newton_failure_fixed_steps).
    dts = 2.0 ** -np.arange(4, 8)
    errors, _ = fixed_step_run(KEPLER, 4, dts)
    assert np.all(errors > 1e-13) and np.all(errors < 1e-6), errors
    assert abs(order_slope(dts, errors) - 5) < 0.3, errors


def test_local_error_and_estimate_orders():
    # One step from the exact solution of the nonlinear Kepler problem: the local
    # error is O(h^6) (order 5) and the embedded estimate O(h^4) (a third-order
    # formula), which is why error_order is 4. Observed slopes 5.9-6.05 and
    # 3.99-4.15 for h = 1/8 .. 1/64.
    from diffode._controller import rms_norm
    from diffode.solvers.base import FlatRHS, Tolerances

    f = FlatRHS(lambda t, y: KEPLER.f(t, y, None))
    tol = Tolerances(jnp.asarray(1e-14), jnp.asarray(1e-14), rms_norm)
    t0 = jnp.asarray(0.3)
    y0 = KEPLER.exact(t0)
    solver = Radau5()
    state = solver.init(f, t0, y0, f(t0, y0))
    step = jax.jit(lambda h: solver.step(f, t0, y0, h, state, tol))
    hs = 2.0 ** -np.arange(3, 7)
    local, estimate = [], []
    for h in hs:
        res = step(jnp.asarray(h))
        assert bool(res.ok)
        local.append(float(jnp.abs(res.y1 - KEPLER.exact(t0 + h)).max()))
        estimate.append(float(jnp.abs(res.y_error).max()))
    assert abs(order_slope(hs, local) - 6) < 0.3, local
    assert abs(order_slope(hs, estimate) - 4) < 0.3, estimate


# ----------------------------------------------------------------------------
# Stiff linear system: eigenvalues -1, -10, ..., -1e6.
# ----------------------------------------------------------------------------

LAM = -(10.0 ** np.arange(0, 7))
_V = np.eye(7) + 0.5 * np.triu(np.random.default_rng(0).standard_normal((7, 7)), 1)  # cond ~4.6
STIFF_A = _V @ np.diag(LAM) @ np.linalg.inv(_V)
STIFF_TS = np.concatenate([[0.0, 1e-6, 1e-4, 1e-2], np.linspace(0.1, 10.0, 8)])


def stiff_exact(t, scale=1.0):
    """``expm(scale A t) y0`` from the eigendecomposition (jax.scipy.linalg.expm
    overflows to NaN for ``||A t|| ~ 1e7``; it is used where it is accurate)."""
    return _V @ (np.exp(scale * LAM * t) * np.linalg.solve(_V, np.ones(7)))


def linear_f(t, y, a):
    return a @ y


def test_stiff_exact_solution_matches_expm():
    # The eigendecomposition formula agrees with expm where expm is reliable.
    for t in (1e-6, 1e-4, 1e-2):
        ex = jax.scipy.linalg.expm(jnp.asarray(STIFF_A) * t) @ jnp.ones(7)
        np.testing.assert_allclose(stiff_exact(t), np.asarray(ex), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-8, 1e-10), (np.float32, 1e-4, 1e-6)])
def test_stiff_linear(dtype, rtol, atol):
    a = jnp.asarray(STIFF_A, dtype)
    sol = diffode.solve(
        linear_f, jnp.ones(7, dtype), jnp.asarray(STIFF_TS, dtype), a, solver=Radau5(), rtol=rtol, atol=atol
    )
    assert sol.ys.dtype == dtype
    exact = np.stack([stiff_exact(t) for t in STIFF_TS])
    # Observed global error <= 0.5 tol (float64); float32 adds roundoff of
    # ~1e-6 relative in A itself. 5x tolerance keeps a clear margin and still
    # fails for any order-of-magnitude defect.
    assert scaled_error(sol.ys, exact, rtol, atol).max() < 5, scaled_error(sol.ys, exact, rtol, atol)
    # f is linear: J is exact and never needs refreshing (observed 2-3 evaluations
    # over ~1000 steps: the first step and after rejections).
    steps = int(sol.stats["num_steps"])
    assert int(sol.stats["num_jac_evals"]) <= 5 < steps


def test_jvp_stiff_linear():
    # d/ds of y(t) for y' = s A y at s = 1 is t A y(t): forward mode through the
    # loop (and the Newton while_loop) on a stiff problem (Direct's forward rule).
    def fn(s):
        return diffode.solve(
            linear_f,
            jnp.ones(7),
            jnp.asarray(STIFF_TS),
            s * jnp.asarray(STIFF_A),
            solver=Radau5(),
            rtol=1e-10,
            atol=1e-12,
            sensitivity=diffode.Direct(),
        ).ys

    _, dys = jax.jvp(fn, (1.0,), (1.0,))
    exact = np.stack([t * STIFF_A @ stiff_exact(t) for t in STIFF_TS])
    # Relative to the scale of the derivative at each time (|t A y| reaches 1e4
    # in its fast components at t ~ 1e-6): observed 3e-8.
    scale = np.abs(exact).max(axis=1, keepdims=True) + 1e-12
    assert (np.abs(np.asarray(dys) - exact) / scale).max() < 1e-6


# ----------------------------------------------------------------------------
# Robertson and stiff Van der Pol against SciPy Radau at rtol 1e-12.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rtol, atol", [(1e-6, 1e-12), (1e-10, 1e-16)])
def test_robertson(rtol, atol):
    sol = rob_solve(ROB.y0, rtol, atol)
    assert int(sol.status) == 0
    ref = scipy_reference("robertson", 1e5)
    # Observed max scaled global error 0.15 (rtol 1e-6) and 0.38 (rtol 1e-10)
    # at the save times, and 0.22 / 0.45 at the midpoints of every step (dense
    # output). Bound 2: a clear margin, yet a 5x loss of accuracy fails.
    assert scaled_error(sol.ys, ref(np.asarray(ROB_TS)).T, rtol, atol).max() < 2
    d = sol.dense_output
    m = int(d.num_pieces)
    tm = np.asarray(d.t_start[:m] + 0.5 * d.h[:m])
    assert scaled_error(sol.evaluate(jnp.asarray(tm)), ref(tm).T, rtol, atol).max() < 2
    # Mass conservation: sum(y) = 1 is linear, preserved by RK methods up to
    # Newton's error (~kappa tol).
    np.testing.assert_allclose(np.asarray(sol.ys).sum(axis=1), 1.0, atol=10 * rtol)


def test_robertson_stats():
    rtol, atol = 1e-8, 1e-14
    st = {k: int(v) for k, v in rob_solve(ROB.y0, rtol, atol).stats.items()}
    steps = st["num_steps"]
    # SciPy Radau needs 573 steps at rtol 1e-8: the same method, a similar count.
    assert 300 < steps < 1200, st
    # Real + complex per attempted step, skipped where neither h nor J changed.
    lu = st["num_lu_decomps"]
    assert lu % 2 == 0 and steps < lu <= 2 * steps, st
    assert steps <= st["num_newton_iters"] <= 7 * steps
    # 3 f per iteration, f(t1, y1) per step, the extra estimate on the first
    # step / after rejections, plus f0 and the initial-step probe.
    base = 3 * st["num_newton_iters"] + steps + 2
    assert base <= st["num_fevals"] <= base + st["num_rejected"] + 1, st
    # Jacobian reuse with RADAU5's default threshold (observed 379 of 605), and
    # much more with a lax one (observed 20 of 529) at no loss of accuracy.
    assert 1 <= st["num_jac_evals"] < 0.8 * steps, st
    lax_sol = rob_solve(ROB.y0, rtol, atol, solver=Radau5(jac_reuse_theta=0.1))
    assert int(lax_sol.stats["num_jac_evals"]) < 0.1 * int(lax_sol.stats["num_steps"])
    ref = scipy_reference("robertson", 1e5)
    assert scaled_error(lax_sol.ys, ref(np.asarray(ROB_TS)).T, rtol, atol).max() < 2


def test_van_der_pol_stiff():
    p = problems.van_der_pol_stiff()  # mu = 1000, two relaxation periods
    ts = jnp.linspace(0.0, p.t1, 11)
    rtol = atol = 1e-8
    sol = diffode.solve(p.f, p.y0, ts, p.args, solver=Radau5(), rtol=rtol, atol=atol, max_steps=20000)
    ref = scipy_reference("van_der_pol", p.t1)(np.asarray(ts)).T
    # The global error of a relaxation oscillation exceeds the local tolerance
    # (the phase error grows through every jump): observed 2.6 tol in x, 5.0 tol
    # in x' (2.5 / 6.0 at rtol 1e-6). Bound 20.
    assert scaled_error(sol.ys, ref, rtol, atol).max() < 20
    st = {k: int(v) for k, v in sol.stats.items()}
    # SciPy Radau: 2854 steps at this tolerance. Observed here: 3004 attempts.
    assert 1500 < st["num_steps"] < 6000, st
    assert st["num_jac_evals"] < st["num_steps"]


# ----------------------------------------------------------------------------
# Transformations, pytrees, float32.
# ----------------------------------------------------------------------------


def test_jit_and_vmap_over_y0():
    rtol, atol = 1e-6, 1e-12
    y0s = jnp.array([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1], [0.5, 1e-5, 0.5 - 1e-5]])
    batched = jax.jit(jax.vmap(rob_solve, in_axes=(0, None, None)))(y0s, rtol, atol)
    for i in range(3):
        single = rob_solve(y0s[i], rtol, atol)
        # Per-member step sequences: each member takes exactly its own steps.
        for k in ("num_steps", "num_fevals", "num_jac_evals", "num_newton_iters"):
            assert int(batched.stats[k][i]) == int(single.stats[k]), (i, k)
        np.testing.assert_allclose(batched.ys[i], single.ys, rtol=1e-10, atol=1e-20)
    assert len({int(n) for n in batched.stats["num_steps"]}) > 1  # they really differ


def test_jacfwd_exponential_decay():
    p = problems.exponential_decay()
    ts = jnp.linspace(0.0, 2.0, 5)

    def fn(k):
        return diffode.solve(p.f, p.y0, ts, k, solver=Radau5(), rtol=1e-10, atol=1e-12).ys[-1]

    jac = jax.jit(jax.jacfwd(fn))(p.args)
    exact = np.diag(-2.0 * np.asarray(p.y0) * np.exp(-2.0 * np.asarray(p.args)))
    np.testing.assert_allclose(jac, exact, rtol=1e-7, atol=1e-10)


def _rob_sensitivity_np(t, u):
    """Robertson plus its forward sensitivity to k1: s' = J s + df/dk1."""
    y, s = u[:3], u[3:]
    return np.concatenate([_rob_np(t, y), _rob_jac_np(t, y) @ s + np.array([-y[0], y[0], 0.0])])


def _rob_sensitivity_jac_np(t, u):
    y, s = u[:3], u[3:]
    hess_s = np.array(
        [  # d(J(y) s)/dy + d(df/dk1)/dy
            [-1.0, K3 * s[2], K3 * s[1]],
            [1.0, -K3 * s[2] - 2 * K2 * s[1], -K3 * s[1]],
            [0.0, 2 * K2 * s[1], 0.0],
        ]
    )
    jac = _rob_jac_np(t, y)
    return np.block([[jac, np.zeros((3, 3))], [hess_s, jac]])


def test_jvp_robertson_sensitivity():
    # Forward mode through the adaptive loop and the Newton iterations on a
    # nonlinear stiff problem, against the forward sensitivity equations solved
    # by SciPy Radau at rtol 1e-12.
    from scipy.integrate import solve_ivp

    ref = solve_ivp(
        _rob_sensitivity_np,
        (0.0, 1e5),
        np.array([1.0, 0, 0, 0, 0, 0]),
        method="Radau",
        rtol=1e-12,
        atol=1e-16,
        jac=_rob_sensitivity_jac_np,
        t_eval=np.asarray(ROB_TS),
    )
    assert ref.success
    sens = ref.y[3:].T

    def fn(k1):
        return diffode.solve(
            ROB.f,
            ROB.y0,
            ROB_TS,
            ROB.args.at[0].set(k1),
            solver=Radau5(),
            rtol=1e-8,
            atol=1e-14,
            max_steps=20000,
        ).ys

    _, dys = jax.jit(lambda k: jax.jvp(fn, (k,), (1.0,)))(ROB.args[0])
    # Error relative to each component's largest sensitivity: observed 9e-10
    # (5e-8 and 1e-11 at rtol 1e-6 and 1e-10: it tracks the tolerance). Bound 10 rtol.
    err = np.abs(np.asarray(dys) - sens) / np.abs(sens).max(axis=0)
    assert err.max() < 1e-7, err.max(axis=0)


def test_pytree_state():
    def f(t, y, k):
        a, b = y["a"], y["b"]
        full = ROB.f(t, jnp.concatenate([a, b]), k)
        return {"a": full[:1], "b": full[1:]}

    y0 = {"a": ROB.y0[:1], "b": ROB.y0[1:]}
    sol = diffode.solve(f, y0, ROB_TS, ROB.args, solver=Radau5(), rtol=1e-6, atol=1e-12)
    flat = rob_solve(ROB.y0, 1e-6, 1e-12)
    got = np.concatenate([np.asarray(sol.ys["a"]), np.asarray(sol.ys["b"])], axis=1)
    np.testing.assert_allclose(got, flat.ys, rtol=1e-10, atol=1e-20)


def test_float32_robertson():
    p = problems.robertson(dtype=np.float32)
    ts = jnp.asarray([0.0, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e5], np.float32)
    rtol, atol = 1e-4, 1e-8
    sol = diffode.solve(p.f, p.y0, ts, p.args, solver=Radau5(), rtol=rtol, atol=atol)
    assert sol.ys.dtype == np.float32 and int(sol.status) == 0
    ref = scipy_reference("robertson", 1e5)(np.asarray(ts, np.float64)).T
    # Observed 0.04 tol; bound 2 as in float64 (float32 roundoff, 1e-7, is far below rtol).
    assert scaled_error(sol.ys, ref, rtol, atol).max() < 2, scaled_error(sol.ys, ref, rtol, atol)


# ----------------------------------------------------------------------------
# Newton failures: rejections or a clear status, never a silent wrong answer.
# ----------------------------------------------------------------------------


def nan_beyond_one(t, y, args):
    """``y' = 1`` while ``y < 1``, NaN beyond: no solution past ``t = 1`` from ``y(0) = 0``."""
    return jnp.where(y < 1.0, jnp.ones_like(y), jnp.nan)


def test_newton_nan_rhs():
    ts = jnp.linspace(0.0, 2.0, 5)
    sol = diffode.solve(nan_beyond_one, jnp.zeros(1), ts, solver=Radau5(), throw=False)
    # Newton fails on the NaNs, and the status blames their source: f.
    assert int(sol.status) == diffode.Status.NONFINITE_RHS
    ys = np.asarray(sol.ys)[:, 0]
    # Radau is exact on y' = 1 before the wall; unreached times are NaN.
    np.testing.assert_allclose(ys[:2], [0.0, 0.5], atol=1e-12)
    assert np.all(np.isnan(ys[3:]))
    assert int(sol.stats["num_rejected"]) > 0
    with pytest.raises(Exception, match="returned NaN or inf"):
        diffode.solve(nan_beyond_one, jnp.zeros(1), ts, solver=Radau5(), throw=True).ys.block_until_ready()


@pytest.mark.parametrize("max_iters", [1, 2])
def test_newton_iteration_cap(max_iters):
    # A tiny cap makes Newton fail often; the failed steps are rejected and
    # retried smaller, the cap holds, and the answer is as accurate as with the
    # default cap. (Observed: max_iters=1 takes ~4400 attempts, half of them
    # rejected; max_iters=2 rejects 46 of 317, the default 1 of 205.) The first
    # step, from the init state, polishes its root with up to 3 max_iters.
    rtol, atol = 1e-6, 1e-12
    sol = rob_solve(ROB.y0, rtol, atol, solver=Radau5(max_iters=max_iters))
    assert int(sol.status) == 0
    st = {k: int(v) for k, v in sol.stats.items()}
    assert st["num_newton_iters"] <= max_iters * (st["num_steps"] + 2)
    default = rob_solve(ROB.y0, rtol, atol)
    assert st["num_rejected"] > int(default.stats["num_rejected"])
    ref = scipy_reference("robertson", 1e5)
    assert scaled_error(sol.ys, ref(np.asarray(ROB_TS)).T, rtol, atol).max() < 2


def test_newton_failure_fixed_steps():
    # Fixed steps too large for Newton at this tolerance (see the order test):
    # NEWTON_FAILED, not an unconverged result.
    ts = KEPLER.ts(4)
    sol = diffode.solve(
        KEPLER.f, KEPLER.y0, ts, solver=Radau5(), dt0=0.5, adaptive=False, rtol=1e-14, atol=1e-14, throw=False
    )
    assert int(sol.status) == diffode.Status.NEWTON_FAILED
    assert np.all(np.isnan(np.asarray(sol.ys)[1:]))
